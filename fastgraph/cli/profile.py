"""``fastgraph profile``: its options, the run (Chrome trace, Nsight Systems capture) and the
per-node table."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import torch
import torch.nn.functional as F

from fastgraph.core.devices import device_name, resolve_device
from fastgraph.core.errors import UserError
from fastgraph.core.outputs import check_outputs, write_json
from fastgraph.core.tracing import traced_model
from fastgraph.perf.profile import PHASES, attribute, table_rows
from fastgraph.perf.roofline import DEFAULT_PROFILE


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``fastgraph profile`` options to its subparser."""
    p.add_argument("model", help="plain PyTorch model file (.py)")
    p.add_argument("--entry", help="function or class in the file that builds the model")
    p.add_argument("--recipe", help="apply this training recipe's passes first (shipped name or .toml)")
    p.add_argument("--steps", type=int, default=5, help="profiled training steps (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="unprofiled steps first (default 2)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per step (default 512 on CUDA, 32 on CPU)")
    p.add_argument("--out", default="fastgraph-profile",
                   help="folder for trace.json (default fastgraph-profile)")
    p.add_argument("--data", help="CIFAR-10 (folder or archive; default $FASTGRAPH_DATA)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default cuda if present)")
    p.add_argument("--profile", default=DEFAULT_PROFILE,
                   help=f"hardware profile for the share of peak (default {DEFAULT_PROFILE})")
    p.add_argument("--precision", choices=("fp32", "tf32", "fp16", "bf16"), default=None,
                   help="autocast precision on CUDA and the peak it is held against (default bf16 on CUDA, "
                        "fp32 on CPU, where steps always run in fp32)")
    p.add_argument("--json", metavar="FILE", help="write the table and settings as JSON")
    p.add_argument("--nsys", action="store_true",
                   help="run the steps for Nsight Systems (NVTX ranges, cudaProfilerStart/Stop) "
                        "instead of torch.profiler")


def nsys_command(args: argparse.Namespace, out: Path) -> str:
    """The ``nsys profile`` command line that captures the same steps with their NVTX ranges."""
    argv = ["fastgraph", "profile", args.model]
    for flag, value in (("--entry", args.entry), ("--recipe", args.recipe), ("--steps", args.steps),
                        ("--warmup", args.warmup), ("--batch-size", args.batch_size), ("--data", args.data),
                        ("--device", args.device), ("--precision", args.precision)):
        if value is not None:
            argv += [flag, str(value)]
    nsys = ["nsys", "profile", "-t", "cuda,nvtx", "--capture-range=cudaProfilerApi",
            "--capture-range-end=stop", "-o", str(out / f"nsys-{Path(args.model).stem}")]
    return shlex.join(nsys + argv + ["--nsys"])


def _build(args, gm, device: torch.device, data):
    """(the training GraphModule before ranges, with ranges on the device, real batch for checks)
    from the traced model file ``gm``."""
    from fastgraph.core.pass_manager import run_passes, verification_batch
    from fastgraph.core.tracing import check_runs
    from fastgraph.training.trained import spread_training_images, training_graph

    images, labels = spread_training_images(data)
    check_runs(gm, images[:2])
    if args.recipe:
        from fastgraph.training.recipes import load_recipe

        gm, _ = training_graph(gm, load_recipe(args.recipe).to_dict(), images=images, labels=labels)
    gm.train()
    ranged, _ = run_passes(gm, ["nvtx_ranges"], mode="train", batch=verification_batch(images, labels))
    module = ranged.to(device)
    if device.type == "cuda":
        module = module.to(memory_format=torch.channels_last)
    return gm, module.train(), images


def run(args: argparse.Namespace) -> int:
    """Run ``fastgraph profile``; returns the exit code (a ``UserError`` is one line, exit 2)."""
    from fastgraph.core import nvtx
    from fastgraph.data import CIFAR10_MEAN, CIFAR10_STD, load_cifar10
    from fastgraph.perf.nodes import node_points
    from fastgraph.perf.roofline import load_profile

    if args.steps < 1 or args.warmup < 0 or (args.batch_size is not None and args.batch_size < 2):
        raise UserError("--steps must be >= 1, --warmup >= 0 and --batch-size >= 2")
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    if args.nsys and not cuda:
        raise UserError("--nsys captures CUDA work for Nsight Systems: it needs a CUDA device")
    precision = args.precision or ("bf16" if cuda else "fp32")
    hardware = load_profile(args.profile)
    peak = hardware.peak(precision)
    batch_size = args.batch_size or (512 if cuda else 32)
    # Outputs and the model file are checked before the data is looked for (it may be absent,
    # or take seconds to decode).
    out = check_outputs({"--out": args.out, "--json": args.json},
                        inputs={"model file": args.model, "data": args.data}, folders=("--out",))["--out"]
    traced = traced_model(args.model, args.entry)
    data = load_cifar10(args.data)
    total = batch_size * (args.warmup + args.steps)
    if total > len(data.train_images):
        raise UserError(f"{args.warmup + args.steps} steps of {batch_size} images exceed the "
                        f"{len(data.train_images)} training images")

    gm, module, images = _build(args, traced, device, data)
    points = {p.label: p for p in node_points(gm, hardware, precision, mode="train", batch_size=batch_size,
                                              example=images[:2])}
    labels = list(dict.fromkeys(nvtx.range_names(module)))  # a module called twice is one row
    order = torch.randperm(len(data.train_images), generator=torch.Generator().manual_seed(0))[:total]
    pixels = data.train_images[order].to(device)
    targets = data.train_labels[order].to(device)
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
                    loss = F.cross_entropy(module(x).float(), y)
            with nvtx.range("backward"):
                loss.backward()
            with nvtx.range("optimizer"):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize(device)

    if args.nsys:
        return _run_for_nsys(step, args, device)

    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    try:  # checked writable at the start; made only now, so a failed run leaves no empty folder
        out.mkdir(exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot write --out {out}: {exc.strerror or exc}") from None
    trace_path = out / "trace.json"
    captured = []

    def ready(prof) -> None:  # end of the active steps: the events are cleared after this
        prof.export_chrome_trace(str(trace_path))
        captured.append(prof.events())

    plan = schedule(wait=0, warmup=args.warmup, active=args.steps, repeat=1)
    with profile(activities=activities, schedule=plan, on_trace_ready=ready, record_shapes=True,
                 with_flops=True) as prof:
        for i in range(args.warmup + args.steps):
            step(i)
            prof.step()
    attributed = attribute(captured[0], labels, cuda=cuda, steps=args.steps)
    # A share of a GPU's peak is only meaningful for a run on that GPU: never next to a
    # CPU measurement, nor an A100 run held against the H100 profile.
    on_profile = cuda and hardware.name.lower() in device_name(device).lower().replace(" ", "")
    rows, step_seconds = table_rows(attributed, points, labels, peak if on_profile else None)
    node_seconds = sum(r["seconds"] for r in rows)
    result = {
        "model": str(Path(args.model).resolve()), "recipe": args.recipe, "device": device_name(device),
        "torch": torch.__version__, "batch_size": batch_size, "steps": args.steps, "warmup": args.warmup,
        "precision": precision, "run_precision": precision if cuda else "fp32",
        "profile": hardware.name, "peak_flops_per_second": peak, "measured_on_profile": on_profile,
        "nvtx_backend": nvtx.backend(),
        "timing_method": (f"torch.profiler, {'CUDA kernel' if cuda else 'CPU op'} times per node, "
                          "wall time of "
                          f"the step range, mean of {args.steps} steps after {args.warmup} warm-up"),
        "flops_method": "node_costs forward FLOPs x batch x (1 + input gradient + weight gradient)",
        "step_seconds": step_seconds, "step_flops": sum(p.flops for p in points.values()),
        "phases": attributed["phases"], "nodes_seconds": node_seconds,
        "backward_unattributed_seconds": attributed["backward_unattributed_seconds"],
        "trace": str(trace_path.resolve()), "nsys_command": nsys_command(args, out), "rows": rows,
    }
    if args.json:
        write_json(args.json, result)
    print_report(result)
    return 0


def _run_for_nsys(step, args, device: torch.device) -> int:
    """Warm-up, then the steps between cudaProfilerStart/Stop; prints the mean step time."""
    from fastgraph.core.timing import measure_step_time

    counter = iter(range(args.warmup + args.steps))
    for _ in range(args.warmup):
        step(next(counter))
    torch.cuda.synchronize(device)
    torch.cuda.profiler.start()
    timed = measure_step_time(lambda: step(next(counter)), device, warmup=0, iters=args.steps)
    torch.cuda.profiler.stop()
    print(f"{args.steps} steps captured for Nsight Systems: median {timed.median_seconds * 1e3:.3g} ms "
          f"per step ({timed.method}); open the .nsys-rep, NVTX ranges name the graph's modules")
    return 0


def print_report(result: dict, console=None) -> None:
    """The per-node table and the phase summary (the same numbers as the JSON)."""
    from rich.console import Console

    from fastgraph.core.console import fitting_table, number, seconds, si

    console = console or Console()
    title = (f"Per node, mean of {result['steps']} training steps of {result['batch_size']} images on "
             f"{result['device']} ({result['timing_method'].split(',')[1].strip()}): forward, backward "
             "and self time, share of the step, FLOPs and achieved rate")
    on_profile = result.get("measured_on_profile", False)
    # Short headers, so that node names keep their width in 80 columns.
    columns = ["node", "fwd ms", "bwd ms", "self ms", "% step", "FLOPs", "GFLOP/s", "FLOP/B"]
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
    console.print(fitting_table(title, {c: "left" if c == "node" else "right" for c in columns}, rows,
                                compact=True))
    phases = result["phases"]
    step_s = result["step_seconds"] or 1.0
    console.print("Step " + seconds(result["step_seconds"]) + ": " + ", ".join(
        f"{name} {seconds(phases.get(name, 0.0))} ({100 * phases.get(name, 0.0) / step_s:.0f}%)"
        for name in PHASES[1:]) + f"; graph modules {seconds(result['nodes_seconds'])} "
        f"({100 * result['nodes_seconds'] / step_s:.0f}%), other backward ops "
        f"{seconds(result['backward_unattributed_seconds'])}")
    share = (f" = {100 * result['step_flops'] / step_s / result['peak_flops_per_second']:.3g}% of the "
             f"{result['profile']} {result['precision']} peak" if on_profile else
             f" (measured on {result['device']}, not on the {result['profile']} profile: "
             "no share of its peak)")
    console.print(f"Model FLOPs per step {si(result['step_flops'])} ({result['flops_method']}); achieved "
                  f"{si(result['step_flops'] / step_s, 'FLOP/s')}{share}")
    # Paths and the command are printed unbroken, so they can be copied.
    console.print(f"Chrome trace (chrome://tracing, ui.perfetto.dev): {result['trace']}", soft_wrap=True)
    console.print(f"Nsight Systems, same steps with NVTX ranges:\n  {result['nsys_command']}", soft_wrap=True)
