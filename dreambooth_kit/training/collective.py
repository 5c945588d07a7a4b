"""What the processes of a multi-process run must agree on, each at the same step boundary: whether to
stop (a signal that reached any process; train.stop=auto's decision, which only the main process
scores), the logged loss (averaged over processes) and whether DeepSpeed runs the optimizer step."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator

    from dreambooth_kit.training.stopping import AutoStop, Decision


def agreed_decision(acc: Accelerator, auto_stop: AutoStop | None) -> Decision | None:
    """train.stop=auto: the main process's decision over the scores (only it scores), the same on
    every process; None without auto stop."""
    if auto_stop is None:
        return None
    decision = auto_stop.decide() if acc.is_main_process else None
    if acc.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        decision = broadcast_object_list([decision])[0]
    return decision


def agreed_signal(acc: Accelerator, signum: int | None) -> int | None:
    """The stop decision of all processes, taken at the same step boundary: a signal that reached any
    process stops every one (the first signal number seen, by rank). Each process reading only its own
    flag let a signal that landed between two processes' checks send one into the checkpoint's
    collectives and the other into the next step's: a hang, and the preemption checkpoint lost.
    One process: its own flag, no collective."""
    if acc.num_processes == 1:
        return signum
    seen = acc.gather(torch.tensor([signum or 0], device=acc.device)).tolist()
    return next((int(s) for s in seen if s), None)


def mean_over_processes(acc: Accelerator, loss: torch.Tensor, parts: dict[str, float]):
    """The loss and its parts averaged over processes, in one all-gather: with equal rows in every
    process this is the loss of the whole batch, as one process at the summed batch size logs it."""
    local = torch.tensor([[loss.item(), *parts.values()]], device=loss.device)
    mean = acc.gather(local).mean(0).tolist()
    return mean[0], dict(zip(parts, mean[1:], strict=True))


def under_deepspeed(acc: Accelerator) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.DEEPSPEED
