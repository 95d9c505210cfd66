"""``fastgraph advise``: which tricks apply to a model, where, and what they are predicted to gain."""

from __future__ import annotations

import argparse

from fastgraph.cli.common import data_input, positive
from fastgraph.compiler.optimize import parse_input_shape
from fastgraph.core.outputs import check_outputs, write_json
from fastgraph.perf.roofline import DEFAULT_PROFILE


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``fastgraph advise`` options to its subparser."""
    p.add_argument("model", help="plain PyTorch model file (.py)")
    p.add_argument("--entry", help="function or class in the file that builds the model, or a module-level "
                   "nn.Module instance")
    p.add_argument("--mode", choices=("train", "infer"), default="train",
                   help="advise on the training step (default) or on inference")
    p.add_argument("--profile", default=DEFAULT_PROFILE,
                   help=f"hardware profile for the roofline (default {DEFAULT_PROFILE})")
    p.add_argument("--precision", default="bf16", help="fp32, tf32, fp16 or bf16 (default bf16)")
    p.add_argument("--batch-size", type=positive(int), default=512,
                   help="images per step of the roofline (default 512)")
    p.add_argument("--input-shape", default="3,32,32", metavar="C,H,W",
                   help="one input image: channels, height, width (default 3,32,32)")
    p.add_argument("--data", help="CIFAR-10 for the passes that need images (whitening): python-format dir, "
                   "ImageFolder dir or archive (default $FASTGRAPH_DATA, then ~/.cache/fastgraph/cifar10; "
                   "without any, those passes are not evaluated)")
    p.add_argument("--json", metavar="FILE", help="write the advice as JSON")


def run(args: argparse.Namespace) -> int:
    """Run ``fastgraph advise``; returns the exit code (a ``UserError`` is one line, exit 2)."""
    from rich.console import Console

    from fastgraph.compiler.advise import advise
    from fastgraph.perf.roofline import load_profile

    shape = parse_input_shape(args.input_shape)
    load_profile(args.profile).peak(args.precision)  # one line for a bad profile or precision
    # An unwritable --json fails here, before the model is traced and costed.
    check_outputs({"--json": args.json}, inputs={"model file": args.model, "data": data_input(args.data)})
    advice = advise(args.model, mode=args.mode, profile=args.profile, precision=args.precision,
                    batch_size=args.batch_size, data=args.data, input_shape=shape, entry=args.entry)
    if args.json:
        write_json(args.json, advice.to_dict())
    Console().print(advice)
    return 0
