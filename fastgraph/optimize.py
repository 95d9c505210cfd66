"""Trace a model file, rewrite it with graph passes, verify the exact ones on real CIFAR-10, and report.

The report holds, per pass: applied or refused, rewrites, exactness, the measured float64
difference, FLOPs and bytes per image before and after; then the roofline of a training
run (or of inference over the test set) on a hardware profile before and after, with the
step time measured on this device.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn.functional as F

from fastgraph.errors import UserError

# The passes `optimize` runs when --passes is not given: the exact ones for the mode,
# whose results are verified; training-time passes change the function and are named
# explicitly (or applied by `fastgraph train` through a recipe).
DEFAULT_PASSES = {
    "train": ["pool_before_activation"],
    "infer": ["pool_before_activation", "fold_bn"],
}
VERIFY_IMAGES = 32  # float64 check batch: large enough for batch-statistics BN to be meaningful


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="plain PyTorch model file (.py)")
    p.add_argument("--entry", help="function or class in the file that builds the model")
    p.add_argument("--mode", choices=("train", "infer"), default="train",
                   help="optimise the training step (default) or inference")
    defaults = "; ".join(f"{mode}: {','.join(names)}" for mode, names in DEFAULT_PASSES.items())
    p.add_argument("--passes", help=f"comma-separated pass names, in order (default: the exact passes "
                   f"for the mode, {defaults})")
    p.add_argument("--profile", default="a100", help="hardware profile for the roofline (default a100)")
    p.add_argument("--precision", default="bf16", help="fp32, tf32, fp16 or bf16 (default bf16)")
    p.add_argument("--epochs", type=int, default=10,
                   help="epochs of 50,000 images in the roofline (default 10)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="batch of the measured step (default 512 on CUDA, 32 on CPU)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per measurement (default 3)")
    p.add_argument("--device", default=None, help="device for the measured step (default cuda if present)")
    p.add_argument("--data", help="CIFAR-10: python-format dir, ImageFolder dir or archive "
                   "(default $FASTGRAPH_DATA, then ~/.cache/fastgraph/cifar10)")
    p.add_argument("--out", help="where to save the optimised GraphModule (default <model>.optimized.pt)")
    p.add_argument("--emit-code", metavar="FILE.py", help="write the rewritten graph as readable Python")
    p.add_argument("--json", metavar="FILE", help="write the whole report as JSON")


def _step_fn(gm: fx.GraphModule, mode: str, x: torch.Tensor, y: torch.Tensor, device: torch.device,
             precision: str):
    """A zero-argument training step (forward, cross-entropy, backward, SGD) or inference
    forward of a copy of ``gm`` on (x, y) on ``device``; ``gm`` is untouched."""
    model = copy.deepcopy(gm).to(device).train(mode == "train")
    x, y = x.to(device), y.to(device)
    low = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    use_autocast = device.type == "cuda" and low is not None  # CPU runs fp32: no fast low precision there

    def forward():
        with torch.autocast(device.type, dtype=low, enabled=use_autocast):
            return model(x)

    if mode == "train":
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(forward().float(), y).backward()
            opt.step()
    else:
        def step():
            with torch.no_grad():
                forward()
    return step


def _measure_alternating(steps: dict, device: torch.device, rounds: int) -> dict:
    """Median seconds per step of each named step function, timed in alternation.

    One warm-up call each (not timed), then ``rounds`` rounds that time one call of every
    function in turn, so a change in machine load between them (a shared CPU, GPU clocks)
    falls on all of them alike rather than on whichever was timed second.
    Returns {name: (median seconds, method)}.
    """
    from fastgraph.timing import measure_step_time

    times = {name: [] for name in steps}
    for fn in steps.values():
        measure_step_time(fn, device, warmup=1, iters=1)
    for _ in range(rounds):
        for name, fn in steps.items():
            one = measure_step_time(fn, device, warmup=0, iters=1)
            times[name].append(one.median_seconds)
    clock = one.method.split(",")[0]
    method = f"{clock}, 1 warm-up excluded, median of {rounds}, before/after alternated"
    return {name: (statistics.median(t), method) for name, t in times.items()}


def _readable_code(gm: fx.GraphModule, passes_applied: list[str], source: str) -> str:
    """The rewritten graph as Python, headed by what each called submodule is."""
    called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    width = max((len(t) for t in called), default=0)
    modules = "\n".join(f"#   {t:<{width}}  {gm.get_submodule(t)!r}".replace("\n", " ") for t in called)
    header = (f"# Generated by fastgraph optimize from {source}\n"
              f"# Passes applied: {', '.join(passes_applied) or 'none'}\n"
              "# Load the module itself with torch.load(path, weights_only=False).\n"
              f"# Submodules called, in graph order:\n{modules}\n\n")
    return header + gm.print_readable(print_output=False)


def run(args: argparse.Namespace) -> int:
    from fastgraph import report as report_view
    from fastgraph import roofline
    from fastgraph.data import load_cifar10, normalize
    from fastgraph.loading import load_model
    from fastgraph.pass_manager import run_passes
    from fastgraph.tracing import trace

    if args.epochs <= 0 or args.steps <= 0 or (args.batch_size is not None and args.batch_size <= 1):
        raise UserError("--epochs and --steps must be positive and --batch-size at least 2")
    profile = roofline.load_profile(args.profile)
    profile.peak(args.precision)  # raises a one-line error for a precision the profile lacks
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available on this machine")

    model = load_model(args.model, args.entry)
    gm = trace(model, args.model)
    data = load_cifar10(args.data)
    batch_size = args.batch_size or (512 if device.type == "cuda" else 32)
    # Test images of every class: an ImageFolder test split is stored class by class.
    n = max(batch_size, VERIFY_IMAGES)
    index = torch.arange(n) * (len(data.test_images) // n)
    x, y = normalize(data.test_images[index]), data.test_labels[index]
    verify_batch = (x[:VERIFY_IMAGES], y[:VERIFY_IMAGES])
    names = DEFAULT_PASSES[args.mode]
    if args.passes:
        names = [n.strip() for n in args.passes.split(",") if n.strip()]
    if args.mode == "infer":
        gm.eval()  # inference passes such as fold_bn act on eval-mode BatchNorm
        model.eval()

    optimized, pass_report = run_passes(gm, names, mode=args.mode, batch=verify_batch,
                                        cost_example=x[:1], cost_batch_size=batch_size)

    rows = []
    graphs = {"before": gm, "after": optimized}
    measured = _measure_alternating(
        {label: _step_fn(module, args.mode, x[:batch_size], y[:batch_size], device, args.precision)
         for label, module in graphs.items()}, device, args.steps)
    for label, module in graphs.items():
        est = roofline.estimate(module, x[:1], profile, args.precision, mode=args.mode,
                                epochs=args.epochs, batch_size=args.batch_size or 512)
        seconds, method = measured[label]
        images_per_second = batch_size / seconds
        rows.append({"graph": label, **est, "measured_step_seconds": seconds,
                     "measured_images_per_second": images_per_second,
                     "measured_flops_per_second": est["step_flops_per_image"] * images_per_second,
                     "timing_method": method})

    out = Path(args.out) if args.out else Path.cwd() / f"{Path(args.model).stem}.optimized.pt"
    torch.save(optimized, out)
    result = {
        "model": str(Path(args.model).resolve()),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "batch_size": batch_size,
        "verify_images": VERIFY_IMAGES,
        "profile": profile.name,
        "precision": args.precision,
        "epochs": args.epochs,
        **pass_report.to_dict(),
        "roofline": rows,
        "optimized_module": str(out.resolve()),
    }
    if args.emit_code:
        Path(args.emit_code).write_text(_readable_code(optimized, pass_report.applied, args.model))
        result["emitted_code"] = str(Path(args.emit_code).resolve())
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    report_view.print_optimize_report(result)
    return 1 if any(o.status == "error" for o in pass_report.outcomes) else 0
