"""Profile training steps of a model file per graph node: torch.profiler trace, NVTX ranges, a table.

``fastgraph profile MODEL.py`` traces the model (and applies a recipe's passes with
``--recipe``), wraps every module call in a named range (the ``nvtx_ranges`` pass), and
runs training steps (forward, cross-entropy, backward, SGD with momentum) on real
CIFAR-10 training batches under ``torch.profiler`` (CPU activity, plus CUDA on a GPU;
``record_shapes``, ``with_flops``). Each step is itself split into ``step``, ``data``,
``forward``, ``backward`` and ``optimizer`` ranges. It writes the Chrome trace and prints
one row per module call of the graph.

Attribution: a node's forward time is its range's; its backward time is that of the
autograd functions (``autograd::engine::evaluate_function: ...`` events) whose sequence
number is one of the forward ops inside its range, the link PyTorch's profiler records
between a forward op and its backward. Times are CPU times of the ops on CPU and their
CUDA kernel times on a GPU, averaged over the profiled steps; the step time is the wall
time of the ``step`` range, which ends with a device synchronisation on a GPU. Profiler
overhead is included in CPU times.

FLOPs per node are the model of :mod:`fastgraph.perf.nodes` (forward FLOPs from
``FlopCounterMode`` times the batch, times 2 or 3 for the backward), not the profiler's
``with_flops`` counts, which cover the forward only (DESIGN.md, known traps); those are
kept in the JSON as ``profiler_forward_flops`` for comparison.

With ``--nsys`` the same steps run without torch.profiler, between
``cudaProfilerStart``/``Stop``, for ``nsys profile -t cuda,nvtx
--capture-range=cudaProfilerApi``; the command line is printed at the end of a normal run.
"""

from __future__ import annotations

from collections import defaultdict

import torch

PHASES = ("step", "data", "forward", "backward", "optimizer")
BACKWARD_PREFIX = "autograd::engine::evaluate_function: "


# ---------------------------------------------------------------------- attribution


def _seconds(event, cuda: bool) -> float:
    return (event.device_time_total if cuda else event.cpu_time_total) / 1e6  # profiler reports microseconds


def _descendants(event):
    stack = list(event.cpu_children)
    while stack:
        child = stack.pop()
        yield child
        stack.extend(child.cpu_children)


def attribute(events, labels: list[str], *, cuda: bool, steps: int) -> dict:
    """Per-node and per-phase seconds per step from a profiler's events.

    Args:
        events: ``prof.events()`` (``FunctionEvent`` list) of ``steps`` profiled steps.
        labels: the range names of the graph's nodes (module paths).
        cuda: take CUDA kernel time (``device_time_total``) instead of CPU time.

    Returns:
        ``{"nodes": {label: {"forward_seconds", "backward_seconds", "calls", "profiler_forward_flops"}},
        "phases": {phase: seconds}, "backward_unattributed_seconds": s}``, all per step.
    """
    wanted = set(labels)
    nodes = {name: {"forward_seconds": 0.0, "backward_seconds": 0.0, "calls": 0, "profiler_forward_flops": 0}
             for name in labels}
    phases: dict[str, float] = defaultdict(float)
    owner: dict[int, str] = {}  # forward op sequence number -> node label
    cpu_ranges = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    for e in cpu_ranges:
        if e.name in wanted:
            node = nodes[e.name]
            node["forward_seconds"] += _seconds(e, cuda)
            node["calls"] += 1
            for child in _descendants(e):
                if child.sequence_nr >= 0:
                    owner[child.sequence_nr] = e.name
            # top-level ops only: the profiler gives aten::conv2d and its aten::convolution the same FLOPs
            node["profiler_forward_flops"] += sum(int(c.flops or 0) for c in e.cpu_children)
        elif e.name == "step":  # wall time: the step ends with a device synchronisation
            phases[e.name] += e.cpu_time_total / 1e6
        elif e.name in PHASES:
            phases[e.name] += _seconds(e, cuda)
    unattributed = backward = 0.0
    for e in cpu_ranges:
        if e.name.startswith(BACKWARD_PREFIX):
            seconds = _seconds(e, cuda)
            backward += seconds
            name = owner.get(e.sequence_nr)
            if name is None:
                unattributed += seconds
            else:
                nodes[name]["backward_seconds"] += seconds
    if cuda:  # on a GPU the autograd engine launches the backward kernels from its own thread,
        phases["backward"] = backward  # outside the caller's "backward" range
    per_step = 1.0 / max(steps, 1)
    for node in nodes.values():
        node["forward_seconds"] *= per_step
        node["backward_seconds"] *= per_step
        node["calls"] = node["calls"] / max(steps, 1)
        node["profiler_forward_flops"] = node["profiler_forward_flops"] * per_step
    return {"nodes": nodes, "phases": {k: v * per_step for k, v in phases.items()},
            "backward_unattributed_seconds": unattributed * per_step}


def table_rows(attributed: dict, points: dict, labels: list[str], peak: float | None,
               ) -> tuple[list[dict], float]:
    """One row per node label (graph order): times, % of step, FLOPs, FLOP/s, share of peak
    (None when ``peak`` is None: the run was not on the profile's hardware), intensity."""
    step_seconds = attributed["phases"].get("step", 0.0)
    rows = []
    for label in labels:
        timing = attributed["nodes"][label]
        point = points.get(label)
        seconds = timing["forward_seconds"] + timing["backward_seconds"]
        flops = point.flops if point else 0.0
        achieved = flops / seconds if seconds and flops else None
        rows.append({"node": label, "forward_seconds": timing["forward_seconds"],
                     "backward_seconds": timing["backward_seconds"], "seconds": seconds,
                     "percent_of_step": 100 * seconds / step_seconds if step_seconds else None,
                     "flops": flops, "bytes": point.bytes if point else 0.0,
                     "achieved_flops_per_second": achieved,
                     "fraction_of_peak": achieved / peak if achieved and peak else None,
                     "arithmetic_intensity": point.arithmetic_intensity if point else 0.0,
                     "profiler_forward_flops": timing["profiler_forward_flops"]})
    return rows, step_seconds


# ---------------------------------------------------------------------- command


