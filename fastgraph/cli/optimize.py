"""``fastgraph optimize``: its options, and the run that prints the report and writes the files.

A thin layer over :func:`fastgraph.optimize` (``fastgraph.compiler.optimize``): the options
are checked and the outputs found writable before any slow work, then the report is
printed and written as JSON.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fastgraph.cli.common import data_input
from fastgraph.compiler.optimize import DEFAULT_PASSES, parse_input_shape
from fastgraph.core.devices import resolve_device
from fastgraph.core.errors import UserError
from fastgraph.core.figures import check_figure_path
from fastgraph.core.outputs import check_outputs, write_json
from fastgraph.perf.roofline import DEFAULT_PROFILE, load_profile


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``fastgraph optimize`` options to its subparser."""
    p.add_argument("model", help="plain PyTorch model file (.py)")
    p.add_argument("--entry", help="function or class in the file that builds the model, or a module-level "
                   "nn.Module instance")
    p.add_argument("--input-shape", default="3,32,32", metavar="C,H,W",
                   help="one input image: channels, height, width (default 3,32,32). With 3 channels the "
                   "real CIFAR-10 images are resized to HxW; with any other count random normal data "
                   "stands in, and the report says so")
    p.add_argument("--mode", choices=("train", "infer"), default="train",
                   help="optimise the training step (default) or inference")
    defaults = "; ".join(f"{mode}: {','.join(names)}" for mode, names in DEFAULT_PASSES.items())
    p.add_argument("--passes", help=f"comma-separated pass names, in order (default: the exact passes "
                   f"for the mode, {defaults})")
    p.add_argument("--profile", default=DEFAULT_PROFILE,
                   help=f"hardware profile for the roofline (default {DEFAULT_PROFILE})")
    p.add_argument("--precision", default="bf16", help="fp32, tf32, fp16 or bf16 (default bf16)")
    p.add_argument("--epochs", type=int, default=10,
                   help="epochs of 50,000 images in the roofline (default 10)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="batch of the measured step (default 512 on CUDA, 32 on CPU)")
    p.add_argument("--steps", type=int, default=5,
                   help="timed steps of each graph, alternated before/after (default 5)")
    p.add_argument("--device", default=None, help="device for the measured step (default cuda if present)")
    p.add_argument("--data", help="CIFAR-10: python-format dir, ImageFolder dir or archive "
                   "(default $FASTGRAPH_DATA, then ~/.cache/fastgraph/cifar10)")
    p.add_argument("--out", help="where to save the optimised GraphModule (default <model>.optimized.pt)")
    p.add_argument("--emit-code", metavar="FILE.py", help="write the rewritten graph as readable Python")
    p.add_argument("--json", metavar="FILE", help="write the whole report as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="draw the predicted roofline time per pass as a "
                   "waterfall, beside the measured step times and their spread")


def run(args: argparse.Namespace) -> int:
    """Run ``fastgraph optimize``; returns the exit code (a ``UserError`` is one line, exit 2)."""
    from rich.console import Console

    from fastgraph import optimize

    if args.epochs <= 0 or args.steps <= 0 or (args.batch_size is not None and args.batch_size <= 1):
        raise UserError("--epochs and --steps must be positive and --batch-size at least 2")
    shape = parse_input_shape(args.input_shape)
    profile = load_profile(args.profile)
    profile.peak(args.precision)  # raises a one-line error for a precision the profile lacks
    device = resolve_device(args.device)
    if args.plot:
        check_figure_path(args.plot, "--plot")
    # Unwritable outputs fail here, before the slow work.
    outputs = check_outputs({"--out": args.out or Path.cwd() / f"{Path(args.model).stem}.optimized.pt",
                             "--emit-code": args.emit_code, "--json": args.json, "--plot": args.plot},
                            inputs={"model file": args.model, "data": data_input(args.data)})
    _, report = optimize(args.model, mode=args.mode, passes=args.passes, data=args.data, profile=profile,
                         precision=args.precision, batch_size=args.batch_size, input_shape=shape,
                         measure_steps=args.steps, epochs=args.epochs, device=device, entry=args.entry,
                         out=outputs["--out"], emit_code=outputs.get("--emit-code"))
    if args.json:
        write_json(args.json, report.to_dict())
    Console().print(report, crop=False)
    if args.plot:
        from fastgraph.compiler.waterfall import plot_waterfall

        plot = plot_waterfall(report.to_dict(), args.plot, profile=profile)
        Console().print(f"Waterfall plot written to {plot}", soft_wrap=True)
    return 0
