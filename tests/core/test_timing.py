"""Timer phases (counted or not) and step timing, on CPU with real sleeps; CUDA when present.

Sleeps are a few milliseconds; bounds below are loose upward because a shared CI
machine can oversleep, but never undersleeps.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from fastgraph.core.errors import UserError
from fastgraph.core.timing import Timer, measure_step_time


def test_timer_counts_only_counted_phases():
    timer = Timer("cpu")
    with timer.phase("upload", counted=False):
        time.sleep(0.02)
    for _ in range(2):  # one train phase per epoch, accumulating
        with timer.phase("train"):
            time.sleep(0.01)
        with timer.phase("warmup", counted=False):
            time.sleep(0.005)
    with timer.phase("eval_tta"):
        time.sleep(0.01)
    assert 0.02 <= timer.seconds("upload") < 0.5
    assert 0.02 <= timer.seconds("train") < 0.5
    assert timer.total() == pytest.approx(timer.seconds("train") + timer.seconds("eval_tta"))
    assert timer.total(counted_only=False) == pytest.approx(
        timer.total() + timer.seconds("upload") + timer.seconds("warmup"))
    record = timer.as_dict()
    assert record["method"] == "time.perf_counter" and record["device"] == "cpu"
    assert record["phases"]["train"] == {"seconds": timer.seconds("train"), "counted": True,
                                         "calls": 2}
    assert record["phases"]["upload"]["counted"] is False
    assert record["counted_seconds"] == timer.total()
    json.dumps(record)  # a JSON report can carry it as is


def test_timer_refuses_what_would_miscount():
    timer = Timer()
    with timer.phase("train"):
        pass
    with pytest.raises(ValueError, match="counted=True"):
        with timer.phase("train", counted=False):
            pass
    with pytest.raises(ValueError, match="inside counted phase 'train'"):
        with timer.phase("train"):
            with timer.phase("compile", counted=False):
                pass
    with timer.phase("run", counted=False):  # nesting inside an uncounted phase is fine
        with timer.phase("train"):
            pass
    assert timer.as_dict()["phases"]["train"]["calls"] == 2
    with pytest.raises(KeyError, match="no phase 'eval'"):
        timer.seconds("eval")


def test_a_failed_phase_is_not_recorded():
    timer = Timer()
    with pytest.raises(RuntimeError):
        with timer.phase("train"):
            raise RuntimeError("diverged")
    with timer.phase("eval"):  # the failed phase is no longer open
        pass
    assert "train" not in timer.as_dict()["phases"]


def test_measure_step_time_on_cpu():
    calls = []

    def step():
        calls.append(None)
        time.sleep(0.005)

    result = measure_step_time(step, "cpu", warmup=2, iters=5)
    assert len(calls) == 7 and len(result.all_seconds) == 5
    assert 0.005 <= result.median_seconds < 0.25
    assert min(result.all_seconds) <= result.median_seconds <= max(result.all_seconds)
    assert result.method == "time.perf_counter, 2 warm-up excluded, median of 5"


def test_measure_step_time_excludes_warmup():
    calls = []

    def step():  # the first two calls are slow, as cuDNN autotuning or compilation would be
        calls.append(None)
        time.sleep(0.3 if len(calls) <= 2 else 0.002)

    result = measure_step_time(step, "cpu", warmup=2, iters=3)
    assert max(result.all_seconds) < 0.15  # a warm-up call (0.3 s) would show
    with pytest.raises(ValueError):
        measure_step_time(step, "cpu", warmup=0, iters=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_a_user_error():
    with pytest.raises(UserError, match="CUDA is not available"):
        Timer("cuda")
    with pytest.raises(UserError):
        measure_step_time(lambda: None, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_events_time_gpu_work():
    timer = Timer("cuda")
    cycles = 50_000_000  # torch.cuda._sleep spins the GPU without the CPU waiting
    with timer.phase("spin"):
        torch.cuda._sleep(cycles)
    assert timer.seconds("spin") > 1e-3 and timer.method == "CUDA events"
    result = measure_step_time(lambda: torch.cuda._sleep(cycles // 10), "cuda", warmup=1, iters=5)
    assert result.median_seconds > 1e-4
    assert result.method == "CUDA events, 1 warm-up excluded, median of 5"


def test_step_times_whose_ranges_overlap_are_within_noise():
    from fastgraph.core.timing import compare_step_times

    same = compare_step_times([0.100, 0.104, 0.098], [0.101, 0.097, 0.103])
    assert same["verdict"] == "within noise" and "within noise" in same["text"]
    assert same["speedup"] == pytest.approx(0.100 / 0.101)
    faster = compare_step_times([0.200, 0.210, 0.205], [0.100, 0.104, 0.102])
    assert faster["verdict"] == "faster" and faster["speedup"] == pytest.approx(0.205 / 0.102)
    assert faster["before"] == {"median": 0.205, "min": 0.2, "max": 0.21, "n": 3}
    assert compare_step_times([0.1, 0.11], [0.3, 0.31])["verdict"] == "slower"
    with pytest.raises(ValueError):
        compare_step_times([], [0.1])
