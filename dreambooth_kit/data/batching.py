"""How many images go through the UNet together: a fixed number, or ``"auto"``, the largest batch
that fits in memory, measured on the device at hand.

Batching pays even on 2 CPU cores for small models (bench/class_batch.py, DPM-Solver++ 15 steps,
s/image at batch 1 / 2 / 4 / 8 / 16: the tiny model at 64 px 0.117 / 0.068 / 0.050 / 0.040 / 0.032,
the toy model at 32 px 0.186 / 0.109 / 0.076 / 0.056 / 0.051), while at SD 2.1-base's shapes at
512 px the CPU is busy at any batch (25.0 / 23.7 / 25.5 s at batch 1 / 2 / 4) and each image adds
~0.7 GiB (peak growth 0.97 / 1.59 / 3.14 GiB). What fits depends on the device, the size and the
dtype: a T4 is not an A100, 512 px is not 768. So ``"auto"`` measures instead of guessing. The
first batch is one image and its peak memory growth is the cost of an image; then each batch is as
many images as the free memory holds with a margin, at most :data:`AUTO_MAX` (the gain flattens out
by 16 above, and a killed run loses at most one batch).

* CUDA: peak from ``torch.cuda.max_memory_allocated``, free from ``torch.cuda.mem_get_info`` plus
  what torch's allocator holds unused; margin 0.9. The estimate is linear in the batch and the batch
  of one also carries fixed costs, so it errs on the small side; an out-of-memory error anyway halves
  the batch and retries the same images (nothing is lost, nothing is skipped).
* CPU on Linux: peak resident memory (``VmHWM``, reset through ``/proc/self/clear_refs`` before the
  measured batch), free from ``MemAvailable``; margin 0.5, because running out of RAM does not raise
  an error to back off from: the kernel kills the process, and the machine's RAM is shared with
  everything else on it (Colab's own processes, the data loader).
* Elsewhere (MPS, CPU on other systems): no measurement; batches of :data:`UNMEASURED` with the same
  back-off on an out-of-memory error.

Measuring resets the peak counters it reads, once per ``generate`` call with "auto" and never with a
fixed batch size: torch.cuda's peak statistics, and on Linux VmHWM, which ``getrusage``'s
``ru_maxrss`` also reports.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from dreambooth_kit.errors import InvalidInput, UserError

log = logging.getLogger("dreambooth_kit")

AUTO = "auto"
AUTO_MAX = 16
UNMEASURED = 4  # the fixed default before "auto" existed (an out-of-memory error still halves it)
CUDA_MARGIN = 0.9
RAM_MARGIN = 0.5

T = TypeVar("T")
R = TypeVar("R")


class OutOfMemory(UserError, RuntimeError):
    """Even one image does not fit; the message says what to lower (``what``: the failure alone,
    for callers that name their own settings instead)."""

    def __init__(self, what: str, hint: str):
        self.what = what
        super().__init__(f"{what}; {hint}")


def check_batch_size(value: object, field: str) -> int | str:
    """``value`` as a batch size: an int >= 1 or "auto"; otherwise an error naming ``field``."""
    if value == AUTO or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value  # type: ignore[return-value]
    raise InvalidInput(f"{field}={value!r}: use a whole number >= 1, or {AUTO!r} (the largest that fits)")


def batch_for(per_image: int, free: int, margin: float, most: int = AUTO_MAX) -> int:
    """Images per batch when one image costs ``per_image`` bytes and ``free`` bytes are free."""
    return max(1, min(most, int(free * margin) // max(per_image, 1)))


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA raises ``torch.OutOfMemoryError``; MPS and XPU a RuntimeError saying "out of memory"."""
    import torch

    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower()
    )


class MemoryProbe:
    """No measurement: the base for devices we cannot measure."""

    measurable = False
    margin = 0.0

    def reset(self) -> None:
        """Start a measurement: what is in use now is the baseline, the peak is reset."""

    def peak_growth(self) -> int | None:
        """Bytes the peak grew since :meth:`reset`; None: not measurable here."""
        return None

    def free(self) -> int:
        return 0

    def release(self) -> None:
        """Return cached memory after an out-of-memory error, so the smaller batch can use it."""


class CudaProbe(MemoryProbe):
    measurable = True
    margin = CUDA_MARGIN

    def __init__(self, device):
        import torch

        self.cuda, self.device, self.base = torch.cuda, torch.device(device), 0

    def reset(self) -> None:
        self.cuda.reset_peak_memory_stats(self.device)
        self.base = self.cuda.memory_allocated(self.device)

    def peak_growth(self) -> int | None:
        return self.cuda.max_memory_allocated(self.device) - self.base

    def free(self) -> int:
        free, _total = self.cuda.mem_get_info(self.device)
        held = self.cuda.memory_reserved(self.device) - self.cuda.memory_allocated(self.device)
        return free + held

    def release(self) -> None:
        self.cuda.empty_cache()


class LinuxRamProbe(MemoryProbe):
    measurable = True
    margin = RAM_MARGIN
    STATUS, CLEAR, MEMINFO = Path("/proc/self/status"), Path("/proc/self/clear_refs"), Path("/proc/meminfo")

    def __init__(self):
        self.base = 0

    @classmethod
    def available(cls) -> bool:
        try:  # writing "5" to clear_refs resets VmHWM (Linux >= 4.0): only reset() does it
            return (
                os.access(cls.CLEAR, os.W_OK)
                and cls._kib(cls.STATUS, "VmHWM") > 0
                and cls._kib(cls.MEMINFO, "MemAvailable") > 0
            )
        except (OSError, AttributeError, ValueError):
            return False

    @staticmethod
    def _kib(path: Path, field: str) -> int:
        return int(re.search(rf"^{field}:\s+(\d+) kB", path.read_text(), re.M).group(1)) * 1024  # type: ignore[union-attr]

    def reset(self) -> None:
        self.CLEAR.write_text("5")
        self.base = self._kib(self.STATUS, "VmRSS")

    def peak_growth(self) -> int | None:
        return self._kib(self.STATUS, "VmHWM") - self.base

    def free(self) -> int:
        return self._kib(self.MEMINFO, "MemAvailable")


def probe_for(device) -> MemoryProbe:
    """The memory probe of ``device`` (a torch device or its name)."""
    import torch

    kind = torch.device(device).type
    if kind == "cuda":
        return CudaProbe(device)
    if kind == "cpu" and LinuxRamProbe.available():
        return LinuxRamProbe()
    return MemoryProbe()


class BatchSizer:
    """One run's batch sizes: ``batch_size`` fixed, or "auto" (measured, see the module docstring)."""

    def __init__(self, batch_size: int | str, probe: MemoryProbe | None = None, what: str = "images"):
        self.auto = batch_size == AUTO
        self.probe, self.what = probe or MemoryProbe(), what
        measurable = self.auto and self.probe.measurable
        self.size = (1 if measurable else UNMEASURED) if self.auto else int(batch_size)
        self.measuring = measurable  # the next batch is the measured one

    def next_size(self, remaining: int) -> int:
        return max(1, min(self.size, remaining))

    def measured(self, n: int) -> None:
        """After a batch of ``n`` went through: the first one sizes the rest."""
        if not self.measuring:
            return
        self.measuring = False
        per_image = (self.probe.peak_growth() or 0) // n
        free = self.probe.free()
        self.size = batch_for(per_image, free, self.probe.margin)
        log.info(
            "batch size auto: %d %s per batch (one image's peak %.2f GiB, %.1f GiB free, margin %.1f)",
            self.size, self.what, per_image / 2**30, free / 2**30, self.probe.margin,
        )  # fmt: skip

    def out_of_memory(self, n: int, err: str, hint: str) -> None:
        """A batch of ``n`` did not fit: halve it (the same images are retried), or at one image say
        what to lower."""
        self.probe.release()
        if n <= 1:
            raise OutOfMemory(f"out of memory with a single image ({err})", hint)
        self.size = max(1, n // 2)
        log.warning("out of memory with %d %s per batch: retrying with %d", n, self.what, self.size)


def run_batches(
    items: Sequence[T], run: Callable[[Sequence[T]], list[R]], sizer: BatchSizer, hint: str
) -> Iterator[list[R]]:
    """``run`` on consecutive batches of ``items`` as ``sizer`` sizes them; yields each batch's results.
    An out-of-memory error retries the same items in a smaller batch (``hint``: what to lower when
    even one image does not fit)."""
    start = 0
    while start < len(items):
        n = sizer.next_size(len(items) - start)
        if sizer.measuring:
            sizer.probe.reset()
        try:
            out = run(items[start : start + n])
        except Exception as err:  # noqa: BLE001 - only out-of-memory is handled; the rest re-raised
            if not is_out_of_memory(err):
                raise
            failed = str(err)  # handled below, once the traceback and the tensors it holds are gone
        else:
            sizer.measured(n)
            yield out
            start += n
            continue
        sizer.out_of_memory(n, failed, hint)
