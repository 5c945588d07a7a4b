from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from dreambooth_kit.data.batching import (
    AUTO_MAX,
    BatchSizer,
    LinuxRamProbe,
    MemoryProbe,
    OutOfMemory,
    batch_for,
    check_batch_size,
    run_batches,
)
from dreambooth_kit.errors import InvalidInput

GIB = 2**30


class FakeProbe(MemoryProbe):
    """A device where one image costs ``per_image`` bytes and ``free`` bytes are free."""

    measurable = True
    margin = 0.5

    def __init__(self, per_image: int, free: int):
        self.per_image, self.free_bytes, self.resets, self.released = per_image, free, 0, 0

    def reset(self) -> None:
        self.resets += 1

    def peak_growth(self) -> int:
        return self.per_image

    def free(self) -> int:
        return self.free_bytes

    def release(self) -> None:
        self.released += 1


def oom_above(limit: int, seen: list[list[int]]):
    """A batch runner that runs out of memory above ``limit`` images (as CUDA does: the error, no
    output) and records every batch it was asked to run."""

    def run(chunk):
        seen.append(list(chunk))
        if len(chunk) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [x * 10 for x in chunk]

    return run


@pytest.mark.parametrize(
    ("per_image", "free", "margin", "want"),
    [
        (1 * GIB, 10 * GIB, 0.9, 9),  # T4-like: 9 GiB usable at 1 GiB an image
        (3 * GIB, 10 * GIB, 0.9, 3),
        (20 * GIB, 10 * GIB, 0.9, 1),  # never below one image: the back-off says the rest
        (1, 10 * GIB, 0.9, AUTO_MAX),  # tiny images: capped
        (0, 10 * GIB, 0.5, AUTO_MAX),  # an unmeasurable zero does not divide by zero
    ],
)
def test_batch_for_fills_the_free_memory_with_a_margin(per_image, free, margin, want):
    assert batch_for(per_image, free, margin) == want


@pytest.mark.parametrize("bad", [0, -2, "big", 2.5, True, None])
def test_bad_batch_size_is_named(bad):
    with pytest.raises(InvalidInput, match=r"batch_size=.*whole number >= 1, or 'auto'"):
        check_batch_size(bad, "batch_size")
    assert check_batch_size("auto", "x") == "auto" and check_batch_size(3, "x") == 3


def test_auto_measures_one_image_then_sizes_the_rest():
    probe = FakeProbe(per_image=100, free=1000)  # margin 0.5: 500 bytes -> 5 images
    sizer, seen = BatchSizer("auto", probe), []
    out = [y for batch in run_batches(list(range(12)), oom_above(99, seen), sizer, "hint") for y in batch]
    assert [len(b) for b in seen] == [1, 5, 5, 1]
    assert out == [x * 10 for x in range(12)]  # every item once, in order
    assert probe.resets == 1  # only the first batch is measured


def test_out_of_memory_halves_and_retries_the_same_items(caplog):
    probe, seen = FakeProbe(per_image=1, free=10**9), []
    sizer = BatchSizer(8, probe)
    with caplog.at_level(logging.WARNING, logger="dreambooth_kit"):
        out = [y for batch in run_batches(list(range(10)), oom_above(3, seen), sizer, "hint") for y in batch]
    assert [len(b) for b in seen] == [8, 4, 2, 2, 2, 2, 2]  # 8 and 4 fail; then 2 at a time
    assert seen[0][:2] == seen[1][:2] == seen[2] == [0, 1]  # the failed images are retried, not skipped
    assert out == [x * 10 for x in range(10)]
    assert probe.released == 2  # cached memory returned before each retry
    assert "out of memory with 8 images per batch: retrying with 4" in caplog.text


def test_out_of_memory_with_one_image_says_what_to_lower():
    sizer = BatchSizer(2, FakeProbe(1, 1))
    with pytest.raises(
        OutOfMemory, match=r"out of memory with a single image \(CUDA out of memory.*\); lower it"
    ):
        list(run_batches([1, 2, 3], oom_above(0, []), sizer, "lower it"))


def test_other_errors_are_not_taken_for_out_of_memory():
    def broken(chunk):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        list(run_batches([1, 2], broken, BatchSizer(2, FakeProbe(1, 1)), "hint"))


def test_unmeasurable_device_uses_a_fixed_batch():
    seen: list[list[int]] = []
    list(run_batches(list(range(6)), oom_above(99, seen), BatchSizer("auto", MemoryProbe()), "hint"))
    assert [len(b) for b in seen] == [4, 2]


@pytest.mark.skipif(not LinuxRamProbe.available(), reason="needs Linux's /proc/self/clear_refs")
def test_linux_probe_sees_a_peak_that_is_already_freed():
    probe = LinuxRamProbe()
    probe.reset()
    block = torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MiB, touched
    del block  # freed again: only the peak remembers it
    assert probe.peak_growth() >= 60 * 2**20
    probe.reset()
    assert probe.peak_growth() < 60 * 2**20  # the reset forgot it
    assert probe.free() > 0


def test_generate_auto_encodes_the_prompt_once_and_matches_batch_one(tiny_model, monkeypatch):
    """The real pipeline on CPU: "auto" measures one image, then batches the rest; the frozen text
    encoder runs once per call (prompt + negative), not once per batch."""
    from dreambooth_kit.inference.generate import generate
    from dreambooth_kit.inference.pipeline import load_pipeline

    pipe = load_pipeline(str(tiny_model))
    calls = []
    pipe.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    monkeypatch.setattr("dreambooth_kit.inference.generate.probe_for", lambda device: FakeProbe(100, 600))
    sizes: list[int] = []
    auto = generate(pipe, "a photo of a dog", seed=5, num_images=7, steps=2, batch_size="auto",
                    on_batch=lambda b: sizes.append(len(b)))  # fmt: skip
    assert sizes == [1, 3, 3] and len(calls) == 2
    assert [p.seed for _, p in auto] == list(range(5, 12))
    single = generate(pipe, "a photo of a dog", seeds=[9], steps=2)
    diff = np.abs(np.asarray(auto[4].image, dtype=int) - np.asarray(single[0].image, dtype=int))
    assert diff.max() <= 2  # batched matmuls may round differently: within 2/255


def test_a_fixed_batch_size_measures_nothing(tiny_model, monkeypatch):
    """Measuring resets the process's peak counters (VmHWM, which ru_maxrss reports; torch.cuda's
    peak): only "auto" may do that."""
    from dreambooth_kit.inference.generate import generate
    from dreambooth_kit.inference.pipeline import load_pipeline

    def no_probe(device):
        raise AssertionError("a memory probe was made for a fixed batch size")

    monkeypatch.setattr("dreambooth_kit.inference.generate.probe_for", no_probe)
    monkeypatch.setattr(LinuxRamProbe, "reset", lambda self: no_probe(None))
    out = generate(
        load_pipeline(str(tiny_model)), "a photo of a dog", seed=1, num_images=3, steps=1, batch_size=2
    )
    assert len(out) == 3
