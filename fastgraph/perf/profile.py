"""Profile training steps of a model file per graph node: torch.profiler trace, NVTX ranges, a table.

``fastgraph profile MODEL.py`` traces the model (and applies a recipe's passes with
``--recipe``), wraps every module call in a named range (the ``nvtx_ranges`` pass), and
runs training steps (forward, cross-entropy, backward, SGD with momentum; a model that
returns several outputs gets the loss ``fastgraph optimize`` times,
:func:`fastgraph.training.evaluation.training_loss`) on real CIFAR-10 training batches
under ``torch.profiler`` (CPU activity, plus CUDA on a GPU; ``record_shapes``,
``with_flops``). Each step is itself split into ``step``, ``data``, ``forward``,
``backward`` and ``optimizer`` ranges. It writes the Chrome trace and prints one row per
module call of the graph.

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

:func:`profile` is the job (``fastgraph.profile``), :func:`nsys_capture` the run for
Nsight Systems; the ``fastgraph profile`` command parses its options, prints the
:class:`ProfileReport` and writes it as JSON.
"""

from __future__ import annotations

import os
import shlex
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console, Group
from rich.text import Text
from torch import nn

from fastgraph.core.errors import UserError
from fastgraph.core.outputs import report_header
from fastgraph.perf.record import report_text
from fastgraph.perf.roofline import DEFAULT_PROFILE, HardwareProfile

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


# ---------------------------------------------------------------------- the report


def profile_view(result: dict) -> Group:
    """The per-node table and the phase summary of a profile record (the same numbers as
    its JSON) as one rich renderable; print it with ``crop=False`` so the paths and the
    ``nsys`` command stay whole."""
    from fastgraph.core.console import fitting_table, number, seconds, si

    title = (f"Per node, mean of {result['steps']} training steps of {result['batch_size']} images on "
             f"{result['device']} ({result['timing_method'].split(',')[1].strip()}): forward, backward "
             "time and their sum (each inclusive of the ops inside the node), share of the step, FLOPs "
             "and achieved rate")
    on_profile = result.get("measured_on_profile", False)
    # Short headers, so that node names keep their width in 80 columns.
    # "sum": forward + backward; not torch.profiler's "self" time, which excludes child ops.
    columns = ["node", "fwd ms", "bwd ms", "sum ms", "% step", "FLOPs", "GFLOP/s", "FLOP/B"]
    if on_profile:
        columns.insert(7, f"% {result['profile']} peak")
    rows = []
    for r in result["rows"]:
        pct = f"{r['percent_of_step']:.1f}" if r["percent_of_step"] is not None else "-"
        share = f"{100 * r['fraction_of_peak']:.3g}" if r["fraction_of_peak"] is not None else "-"
        achieved = r["achieved_flops_per_second"]
        cells = [r["node"], *(number(r[k] * 1e3) for k in ("forward_seconds", "backward_seconds", "seconds")),
                 pct, si(r["flops"]), number(achieved / 1e9 if achieved is not None else None),
                 f"{r['arithmetic_intensity']:.3g}"]
        if on_profile:
            cells.insert(7, share)
        rows.append(cells)
    justify = {c: "left" if c == "node" else "right" for c in columns}
    parts = [fitting_table(title, justify, rows, compact=True)]
    phases = result["phases"]
    step_s = result["step_seconds"] or 1.0
    parts.append(Text("Step " + seconds(result["step_seconds"]) + ": " + ", ".join(
        f"{name} {seconds(phases.get(name, 0.0))} ({100 * phases.get(name, 0.0) / step_s:.0f}%)"
        for name in PHASES[1:]) + f"; graph modules {seconds(result['nodes_seconds'])} "
        f"({100 * result['nodes_seconds'] / step_s:.0f}%), other backward ops "
        f"{seconds(result['backward_unattributed_seconds'])}"))
    share = (f" = {100 * result['step_flops'] / step_s / result['peak_flops_per_second']:.3g}% of the "
             f"{result['profile']} {result['precision']} peak" if on_profile else
             f" (measured on {result['device']}, not on the {result['profile']} profile: "
             "no share of its peak)")
    parts.append(Text(f"Model FLOPs per step {si(result['step_flops'])} ({result['flops_method']}); achieved "
                      f"{si(result['step_flops'] / step_s, 'FLOP/s')}{share}"))
    # Paths and the command are printed unbroken, so they can be copied.
    lines = [f"Chrome trace (chrome://tracing, ui.perfetto.dev): {result['trace']}"]
    if result.get("nsys_command"):
        lines.append(f"Nsight Systems, same steps with NVTX ranges:\n  {result['nsys_command']}")
    parts += [Text(line, no_wrap=True, overflow="ignore") for line in lines]
    return Group(*parts)


def print_report(result: dict, console: Console | None = None) -> None:
    """Print :func:`profile_view` of a profile record (``ProfileReport.to_dict()`` or its JSON)."""
    (console or Console()).print(profile_view(result), crop=False)


@dataclass
class ProfileReport:
    """Measured time per graph node of training steps, as ``fastgraph profile --json`` writes it.

    Attributes:
        model: the model file's absolute path, or ``"<Class> (nn.Module)"``. recipe: the
            recipe whose passes were applied, or None.
        device, torch: where it ran and the torch version. batch_size, steps, warmup:
            images per step, profiled steps, unprofiled steps before them.
        precision: autocast precision on CUDA and the peak held against; run_precision:
            what the steps ran in (always fp32 on a CPU).
        profile, peak_flops_per_second: the hardware profile and its peak (FLOP/s);
            measured_on_profile: the run was on that GPU (else no share of peak is given).
        nvtx_backend: what emitted the ranges. timing_method, flops_method: how times and
            FLOPs were obtained.
        step_seconds: wall seconds per step; step_flops: model FLOPs per step;
            phases: seconds per step of ``step``, ``data``, ``forward``, ``backward``,
            ``optimizer``; nodes_seconds: the nodes' summed seconds;
            backward_unattributed_seconds: backward ops no node owns.
        trace: the Chrome trace's path. nsys_command: the ``nsys profile`` command that
            captures the same steps (None for a module, which has no file to name).
        rows: one per graph module call, in graph order (:func:`table_rows`): forward,
            backward and total seconds per step, % of step, FLOPs, achieved FLOP/s,
            fraction of peak, arithmetic intensity, the profiler's forward FLOPs.
        header: schema, versions, commit and date (``fastgraph.core.outputs.report_header``).
    """

    model: str
    recipe: str | None
    device: str
    torch: str
    batch_size: int
    steps: int
    warmup: int
    precision: str
    run_precision: str
    profile: str
    peak_flops_per_second: float
    measured_on_profile: bool
    nvtx_backend: str
    timing_method: str
    flops_method: str
    step_seconds: float
    step_flops: float
    phases: dict
    nodes_seconds: float
    backward_unattributed_seconds: float
    trace: str
    nsys_command: str | None
    rows: list[dict]
    header: dict = field(default_factory=report_header, repr=False)

    def to_dict(self) -> dict:
        """Exactly the JSON ``fastgraph profile --json`` writes."""
        return {**self.header, **{k: v for k, v in asdict(self).items() if k != "header"}}

    def __rich__(self) -> Group:
        """The table and summary ``fastgraph profile`` prints."""
        return profile_view(self.to_dict())

    __str__ = report_text


# ---------------------------------------------------------------------- the job


def nsys_command(model: str | os.PathLike, out: str | os.PathLike, **options) -> str:
    """The ``nsys profile`` command line that captures the same steps of the model file
    ``model`` with their NVTX ranges; ``options`` are ``fastgraph profile``'s (``entry``,
    ``recipe``, ``steps``, ``warmup``, ``batch_size``, ``data``, ``device``, ``precision``;
    None ones left out)."""
    argv = ["fastgraph", "profile", str(model)]
    for name in ("entry", "recipe", "steps", "warmup", "batch_size", "data", "device", "precision"):
        if options.get(name) is not None:
            argv += [f"--{name.replace('_', '-')}", str(options[name])]
    nsys = ["nsys", "profile", "-t", "cuda,nvtx", "--capture-range=cudaProfilerApi",
            "--capture-range-end=stop", "-o", str(Path(out) / f"nsys-{Path(model).stem}")]
    return shlex.join(nsys + argv + ["--nsys"])


@dataclass
class _Steps:
    """The training steps to profile, ready to run: ``step(i)`` runs step ``i`` in its ranges."""

    device: torch.device
    precision: str
    hardware: HardwareProfile
    batch_size: int
    points: dict
    labels: list[str]
    step: Callable[[int], None]


def _build(gm, recipe: str | None, device: torch.device, data):
    """(the training GraphModule before ranges, with ranges on the device, real batch for checks)
    from the traced model ``gm``."""
    from fastgraph.core.pass_manager import run_passes, verification_batch
    from fastgraph.core.tracing import check_runs
    from fastgraph.training.trained import spread_training_images, training_graph

    images, labels = spread_training_images(data)
    check_runs(gm, images[:2])
    if recipe:
        from fastgraph.training.recipes import load_recipe

        gm, _ = training_graph(gm, load_recipe(recipe).to_dict(), images=images, labels=labels)
    gm.train()
    ranged, _ = run_passes(gm, ["nvtx_ranges"], mode="train", batch=verification_batch(images, labels))
    module = ranged.to(device)
    if device.type == "cuda":
        module = module.to(memory_format=torch.channels_last)
    return gm, module.train(), images


def _steps(model, *, recipe, steps, warmup, batch_size, data, device, profile, precision, entry,
           nsys: bool, out: str | os.PathLike | None) -> _Steps:
    """Check the options, then trace, rewrite and put on the device the steps to profile.

    Raises:
        UserError: see :func:`profile`.
    """
    from fastgraph.core import nvtx
    from fastgraph.core.devices import resolve_device
    from fastgraph.core.outputs import check_outputs
    from fastgraph.core.tracing import trace, traced_model
    from fastgraph.data import CIFAR10_MEAN, CIFAR10_STD, load_cifar10
    from fastgraph.perf.nodes import node_points
    from fastgraph.perf.roofline import load_profile
    from fastgraph.training.evaluation import check_trainable, training_loss

    if steps < 1 or warmup < 0 or (batch_size is not None and batch_size < 2):
        raise UserError(f"steps must be >= 1, warmup >= 0 and batch_size >= 2, got steps={steps}, "
                        f"warmup={warmup}, batch_size={batch_size}")
    device = resolve_device(device)
    cuda = device.type == "cuda"
    if nsys and not cuda:
        raise UserError("--nsys captures CUDA work for Nsight Systems: it needs a CUDA device")
    precision = precision or ("bf16" if cuda else "fp32")
    hardware = profile if isinstance(profile, HardwareProfile) else load_profile(profile)
    hardware.peak(precision)
    batch_size = batch_size or (512 if cuda else 32)
    # Outputs and the model file are checked before the data is looked for (it may be absent,
    # or take seconds to decode).
    source = None if isinstance(model, nn.Module) else model
    check_outputs({"out": out}, inputs={"model file": source, "data": data}, folders=("out",))
    traced = trace(model) if source is None else traced_model(source, entry)
    check_trainable(traced, str(source or type(model).__name__), "it has no training step to profile")
    cifar = load_cifar10(data)
    total = batch_size * (warmup + steps)
    if total > len(cifar.train_images):
        raise UserError(f"{warmup + steps} steps of {batch_size} images exceed the "
                        f"{len(cifar.train_images)} training images")

    gm, module, images = _build(traced, recipe, device, cifar)
    points = {p.label: p for p in node_points(gm, hardware, precision, mode="train", batch_size=batch_size,
                                              example=images[:2])}
    labels = list(dict.fromkeys(nvtx.range_names(module)))  # a module called twice is one row
    order = torch.randperm(len(cifar.train_images), generator=torch.Generator().manual_seed(0))[:total]
    pixels = cifar.train_images[order].to(device)
    targets = cifar.train_labels[order].to(device)
    top = int(targets.max())  # read once: per step it would wait for the device mid-step
    mean = torch.tensor(CIFAR10_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD, device=device).view(1, 3, 1, 1)
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9, nesterov=True, weight_decay=5e-4)
    low = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    if cuda and precision == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    def step(i: int) -> None:
        with nvtx.range("step"):
            with nvtx.range("data"):
                x = (pixels[i * batch_size:(i + 1) * batch_size].float() - mean) / std
                if cuda:
                    x = x.contiguous(memory_format=torch.channels_last)
                y = targets[i * batch_size:(i + 1) * batch_size]
            with nvtx.range("forward"):
                with torch.autocast(device.type, dtype=low, enabled=cuda and low is not None):
                    loss = training_loss(module(x), y, top)  # also a tuple or dict of outputs
            with nvtx.range("backward"):
                loss.backward()
            with nvtx.range("optimizer"):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize(device)

    return _Steps(device, precision, hardware, batch_size, points, labels, step)


def profile(model: nn.Module | str | os.PathLike, *, recipe: str | None = None, steps: int = 5,
            warmup: int = 2, batch_size: int | None = None, out: str | os.PathLike = "fastgraph-profile",
            data: str | os.PathLike | None = None, device: str | torch.device | None = None,
            profile: str | HardwareProfile = DEFAULT_PROFILE, precision: str | None = None,
            entry: str | None = None) -> ProfileReport:
    """Profile training steps of ``model`` per graph node under ``torch.profiler`` (see the module docstring).

    Args:
        model: an ``nn.Module`` (traced; not modified) or a plain PyTorch model file
            (``entry``: its entry point, see :func:`fastgraph.core.loading.load_model`).
        recipe: apply this training recipe's passes first (shipped name or ``.toml``).
        steps: profiled steps (>= 1); warmup: unprofiled steps before them (>= 0).
        batch_size: real CIFAR-10 training images per step, >= 2 (default 512 on CUDA, 32 on CPU).
        out: folder for ``trace.json`` (made when written; checked first).
        data: CIFAR-10 (default ``$FASTGRAPH_DATA``, then ``~/.cache/fastgraph/cifar10``).
        device: "cpu", "cuda", "cuda:N" (default CUDA if present).
        profile: hardware profile whose peak a GPU run is held against.
        precision: autocast precision on CUDA and the peak's (default bf16 on CUDA; steps
            on a CPU always run in fp32).

    Returns:
        :class:`ProfileReport`: seconds per step per node (forward and backward),
        FLOPs and achieved FLOP/s; its ``to_dict()`` is the ``--json`` record, which
        :func:`fastgraph.roofline` takes as ``measured``.

    Raises:
        UserError: bad sizes, unknown profile or precision, a device that is not there,
            an unwritable ``out``, a bad model file or recipe, missing data, or more
            steps than the training images fill; ``ModelError`` for a model without
            trainable parameters (nothing for a training step to update).
    """
    from torch import profiler

    from fastgraph.core import nvtx
    from fastgraph.core.devices import device_name

    run = _steps(model, recipe=recipe, steps=steps, warmup=warmup, batch_size=batch_size, data=data,
                 device=device, profile=profile, precision=precision, entry=entry, nsys=False, out=out)
    cuda = run.device.type == "cuda"
    activities = [profiler.ProfilerActivity.CPU] + ([profiler.ProfilerActivity.CUDA] if cuda else [])
    out = Path(out).expanduser()
    try:  # checked writable at the start; made only now, so a failed run leaves no empty folder
        out.mkdir(exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot write --out {out}: {exc.strerror or exc}") from None
    trace_path = out / "trace.json"
    captured = []

    def ready(prof) -> None:  # end of the active steps: the events are cleared after this
        prof.export_chrome_trace(str(trace_path))
        captured.append(prof.events())

    plan = profiler.schedule(wait=0, warmup=warmup, active=steps, repeat=1)
    with profiler.profile(activities=activities, schedule=plan, on_trace_ready=ready, record_shapes=True,
                          with_flops=True) as prof:
        for i in range(warmup + steps):
            run.step(i)
            prof.step()
    attributed = attribute(captured[0], run.labels, cuda=cuda, steps=steps)
    # A share of a GPU's peak is only meaningful for a run on that GPU: never next to a
    # CPU measurement, nor an A100 run held against the H100 profile.
    hardware, peak = run.hardware, run.hardware.peak(run.precision)
    on_profile = cuda and hardware.describes(device_name(run.device))
    rows, step_seconds = table_rows(attributed, run.points, run.labels, peak if on_profile else None)
    source = None if isinstance(model, nn.Module) else model
    return ProfileReport(
        model=f"{type(model).__name__} (nn.Module)" if source is None else str(Path(source).resolve()),
        recipe=recipe, device=device_name(run.device), torch=torch.__version__, batch_size=run.batch_size,
        steps=steps, warmup=warmup, precision=run.precision, run_precision=run.precision if cuda else "fp32",
        profile=hardware.name, peak_flops_per_second=peak, measured_on_profile=on_profile,
        nvtx_backend=nvtx.backend(),
        timing_method=(f"torch.profiler, {'CUDA kernel' if cuda else 'CPU op'} times per node, wall time of "
                       f"the step range, mean of {steps} steps after {warmup} warm-up"),
        flops_method="node_costs forward FLOPs x batch x (1 + input gradient + weight gradient)",
        step_seconds=step_seconds, step_flops=sum(p.flops for p in run.points.values()),
        phases=attributed["phases"], nodes_seconds=sum(r["seconds"] for r in rows),
        backward_unattributed_seconds=attributed["backward_unattributed_seconds"],
        trace=str(trace_path.resolve()),
        nsys_command=None if source is None else nsys_command(
            source, out, entry=entry, recipe=recipe, steps=steps, warmup=warmup, batch_size=batch_size,
            data=data, device=None if device is None else str(device), precision=precision),
        rows=rows)


def nsys_capture(model: nn.Module | str | os.PathLike, *, recipe: str | None = None, steps: int = 5,
                 warmup: int = 2, batch_size: int | None = None, data: str | os.PathLike | None = None,
                 device: str | torch.device | None = None, profile: str | HardwareProfile = DEFAULT_PROFILE,
                 precision: str | None = None, entry: str | None = None) -> dict:
    """Run the steps of :func:`profile` for Nsight Systems instead of ``torch.profiler``.

    ``warmup`` steps, then ``steps`` steps between ``cudaProfilerStart``/``Stop``, for
    ``nsys profile -t cuda,nvtx --capture-range=cudaProfilerApi`` (see :func:`nsys_command`).

    Returns:
        ``{"steps", "median_seconds" (per step), "method"}`` of the captured steps.

    Raises:
        UserError: no CUDA device, and as :func:`profile`.
    """
    from fastgraph.core.timing import measure_step_time

    run = _steps(model, recipe=recipe, steps=steps, warmup=warmup, batch_size=batch_size, data=data,
                 device=device, profile=profile, precision=precision, entry=entry, nsys=True, out=None)
    counter = iter(range(warmup + steps))
    for _ in range(warmup):
        run.step(next(counter))
    torch.cuda.synchronize(run.device)
    torch.cuda.profiler.start()
    timed = measure_step_time(lambda: run.step(next(counter)), run.device, warmup=0, iters=steps)
    torch.cuda.profiler.stop()
    return {"steps": steps, "median_seconds": timed.median_seconds, "method": timed.method}
