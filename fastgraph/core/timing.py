"""Wall-clock timing of runs and steps: CUDA events on a GPU, ``time.perf_counter`` on CPU.

Two tools:
- :class:`Timer`, named phases of a run, each counted or not in the reported time (the
  rule is in its docstring), as in Page's cifar10-fast timer and airbench's timing;
- :func:`measure_step_time`, the median time of a zero-argument step (a training or
  inference step) with warm-up excluded, for before/after comparisons of graph passes.
"""

from __future__ import annotations

import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from fastgraph.core.console import progress
from fastgraph.core.errors import UserError


class CompiledInCountedPhase(RuntimeError):
    """``torch.compile`` compiled a graph inside a counted phase, so the compile time was
    counted: the warm-up did not run the graph as the timed work runs it (dtype, layout,
    shapes, train/eval mode, which parameters require gradients)."""


def compiled_graphs() -> int:
    """Graphs ``torch.compile`` has handed to a backend in this process so far (an int >= 0).

    Dynamo's ``counters["stats"]["unique_graphs"]`` rises by one per graph compiled: a
    frame's first compile, a recompile after a guard failed (another dtype, layout, batch
    size, ``requires_grad``, train/eval mode) and each piece of a graph break alike, and
    stays put when a call hits an already compiled graph. A difference of two readings
    counts the compiles in between. ``torch._dynamo.config.error_on_recompile`` would catch
    only the second kind of compile (a guard failure of a frame compiled before), not a
    frame first reached inside a timed phase, and it raises from deep inside the call
    without saying which phase it was; the counter catches both and can be reported.
    Dynamo not yet imported means nothing has been compiled: 0, without importing it.
    """
    utils = sys.modules.get("torch._dynamo.utils")
    return 0 if utils is None else int(utils.counters["stats"]["unique_graphs"])


def _resolve_device(device: torch.device | str | None) -> torch.device:
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device} requested but CUDA is not available in this PyTorch")
    return device


def _method_name(device: torch.device) -> str:
    return "CUDA events" if device.type == "cuda" else "time.perf_counter"


@dataclass
class _Phase:
    counted: bool
    seconds: float = 0.0
    calls: int = 0
    compiles: int = 0


class Timer:
    """Named phases of a run, each counted in the reported time or not.

    The rule (airbench's, which times "exactly what counts"): a phase counts when a
    user pays for it on every run of the method. Data upload to the device, compilation
    (``torch.compile``, Triton autotuning) and cuDNN/kernel warm-up are *not* counted:
    they are one-off costs of the machine, not of the method. Whitening initialisation
    from data, training and (test-time-augmented) evaluation *are* counted. The rule is
    enforced for ``torch.compile``: every phase records how many graphs were compiled
    during it (:func:`compiled_graphs`), and a counted phase in which any was compiled
    raises :class:`CompiledInCountedPhase` when it ends (warm up on the timed work's
    dtype, layout and shapes first).

    On a CUDA device a phase is timed with two CUDA events on the device's current
    stream and one synchronisation at its end (so the phase's GPU work is included and
    nothing inside is serialised); on CPU with ``time.perf_counter``. A phase entered
    again under the same name accumulates (e.g. one ``train`` phase per epoch, with
    uncounted evaluation in between). No phase may open inside a counted phase: a counted
    one would count twice, an uncounted one would be counted anyway. Phases may nest
    inside an uncounted phase (e.g. a whole-run wrapper).

    Example::

        timer = Timer(device)
        with timer.phase("upload", counted=False):
            images = images.to(device)
        with timer.phase("train"):
            train(...)
        timer.total()            # seconds of counted phases
        timer.as_dict()          # for JSON reports

    Args:
        device: where the timed work runs (``"cuda"``, ``"cuda:1"``, ``"cpu"``...).

    Raises:
        UserError: a CUDA device on a PyTorch without CUDA.
    """

    def __init__(self, device: torch.device | str | None = "cpu"):
        self.device = _resolve_device(device)
        self._phases: dict[str, _Phase] = {}
        self._open: list[tuple[str, bool]] = []  # phases entered and not yet left

    @property
    def method(self) -> str:
        """How phases are timed: ``"CUDA events"`` or ``"time.perf_counter"``."""
        return _method_name(self.device)

    @contextmanager
    def phase(self, name: str, counted: bool = True):
        """Time the body of a ``with`` block as phase ``name``; seconds add up per name.

        Raises:
            ValueError: ``name`` reused with a different ``counted``, or any phase
                opened inside a counted phase.
            CompiledInCountedPhase: at the end of a counted phase during which
                ``torch.compile`` compiled a graph (the phase's time is recorded first).
        """
        known = self._phases.get(name)
        if known is not None and known.counted != counted:
            raise ValueError(f"phase {name!r} was counted={known.counted}, now counted={counted}")
        outer = next((n for n, c in self._open if c), None)
        if outer is not None:
            raise ValueError(f"phase {name!r} opened inside counted phase {outer!r}: "
                             "counted time must not nest")
        self._open.append((name, counted))
        compiled_before = compiled_graphs()
        try:
            if self.device.type == "cuda":
                stream = torch.cuda.current_stream(self.device)
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record(stream)
                yield
                end.record(stream)
                end.synchronize()
                seconds = start.elapsed_time(end) / 1e3  # elapsed_time is in milliseconds
            else:
                start_s = time.perf_counter()
                yield
                seconds = time.perf_counter() - start_s
        finally:
            self._open.pop()
        entry = self._phases.setdefault(name, _Phase(counted))
        entry.seconds += seconds
        entry.calls += 1
        compiles = compiled_graphs() - compiled_before
        entry.compiles += compiles
        if counted and compiles:
            raise CompiledInCountedPhase(
                f"torch.compile compiled {compiles} graph(s) inside counted phase {name!r}, so "
                "compile time was counted: the warm-up must run the graph with the same dtype, "
                "layout, shapes and train/eval mode (or train without compile)")

    def seconds(self, name: str) -> float:
        """Seconds spent in phase ``name`` (summed over its entries).

        Raises:
            KeyError: no phase of that name has finished.
        """
        if name not in self._phases:
            raise KeyError(f"no phase {name!r}; phases: {', '.join(self._phases) or 'none'}")
        return self._phases[name].seconds

    def compiles(self) -> dict[str, int]:
        """Graphs ``torch.compile`` compiled during each phase, summed over its entries
        (:func:`compiled_graphs`), by phase name."""
        return {name: p.compiles for name, p in self._phases.items()}

    def total(self, counted_only: bool = True) -> float:
        """Seconds of the counted phases, or of all phases with ``counted_only=False``."""
        return sum(p.seconds for p in self._phases.values() if p.counted or not counted_only)

    def as_dict(self) -> dict:
        """JSON-ready record: per phase seconds, counted flag and entries; totals; method."""
        return {
            "method": self.method,
            "device": str(self.device),
            "phases": {name: {"seconds": p.seconds, "counted": p.counted, "calls": p.calls}
                       for name, p in self._phases.items()},
            "counted_seconds": self.total(counted_only=True),
            "total_seconds": self.total(counted_only=False),
        }


@dataclass(frozen=True)
class StepTime:
    """Result of :func:`measure_step_time`.

    Attributes:
        median_seconds: median seconds per step over the timed iterations.
        all_seconds: seconds of each timed iteration, in order.
        method: how it was timed, e.g. ``"CUDA events, 3 warm-up excluded, median of 10"``.
    """

    median_seconds: float
    all_seconds: tuple[float, ...]
    method: str


def measure_step_time(step_fn, device: torch.device | str | None = "cpu", warmup: int = 3,
                      iters: int = 10) -> StepTime:
    """Median wall time of ``step_fn()`` (a training or inference step), warm-up excluded.

    ``warmup`` calls run first and are not timed (cuDNN algorithm search, lazy
    initialisation, allocator growth, compilation). Then each of ``iters`` calls is timed:
    on CUDA with a pair of events per call on the current stream and a single
    synchronisation after the last (so consecutive steps overlap as in training); on CPU
    with ``time.perf_counter``. The median resists the odd slow step.

    Args:
        step_fn: callable with no arguments; its return value is ignored.
        device: where the step's work runs.
        warmup: untimed calls first (>= 0). iters: timed calls (>= 1).

    Raises:
        ValueError: ``warmup < 0`` or ``iters < 1``.
        UserError: a CUDA device on a PyTorch without CUDA.
    """
    if warmup < 0 or iters < 1:
        raise ValueError("measure_step_time needs warmup >= 0 and iters >= 1")
    device = _resolve_device(device)
    with progress(f"timing {iters} steps", total=warmup + iters) as update:
        times = _timed_calls(step_fn, device, warmup, iters, update)
    method = f"{_method_name(device)}, {warmup} warm-up excluded, median of {iters}"
    return StepTime(statistics.median(times), times, method)


def _timed_calls(step_fn, device: torch.device, warmup: int, iters: int, update) -> tuple[float, ...]:
    """Seconds of each timed call (see :func:`measure_step_time`); ``update`` advances a bar
    between calls, outside the timed regions."""
    for _ in range(warmup):
        step_fn()
        update(advance=1, note="warm-up")
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # warm-up work must not leak into the first timing
        stream = torch.cuda.current_stream(device)
        events = []
        for _ in range(iters):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record(stream)
            step_fn()
            end.record(stream)
            events.append((start, end))
            update(advance=1, note="")
        torch.cuda.synchronize(device)
        return tuple(s.elapsed_time(e) / 1e3 for s, e in events)
    times = []
    for _ in range(iters):
        start_s = time.perf_counter()
        step_fn()
        times.append(time.perf_counter() - start_s)
        update(advance=1, note="")
    return tuple(times)


def compare_step_times(before: list[float], after: list[float]) -> dict:
    """How two sets of step times (seconds, timed in alternation) compare, honestly.

    Returns ``{"speedup", "before", "after", "verdict", "text"}``: ``speedup`` is median
    before / median after; ``before`` and ``after`` are ``{"median", "min", "max", "n"}``
    in seconds; ``verdict`` is ``"n too small to tell"`` when a side has a single time (no
    spread to compare against), ``"within noise"`` when the [min, max] ranges overlap (one
    step's spread covers the difference), else ``"faster"`` or ``"slower"``; ``text`` says
    it in one line. Raises ``ValueError`` for an empty list.
    """
    if not before or not after:
        raise ValueError("compare_step_times needs at least one time on each side")

    def summary(times):
        return {"median": statistics.median(times), "min": min(times), "max": max(times), "n": len(times)}

    b, a = summary(before), summary(after)
    speedup = b["median"] / a["median"]
    if min(b["n"], a["n"]) < 2:
        verdict = "n too small to tell"
    elif a["min"] <= b["max"] and b["min"] <= a["max"]:
        verdict = "within noise"
    else:
        verdict = "faster" if speedup > 1 else "slower"
    text = (f"{speedup:.3f}x, {verdict} (median {1e3 * b['median']:.3g} ms, range {1e3 * b['min']:.3g}-"
            f"{1e3 * b['max']:.3g} before; {1e3 * a['median']:.3g} ms, {1e3 * a['min']:.3g}-"
            f"{1e3 * a['max']:.3g} after; n = {b['n']} each)")
    return {"speedup": speedup, "before": b, "after": a, "verdict": verdict, "text": text}
