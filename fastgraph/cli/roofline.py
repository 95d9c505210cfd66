"""Roofline of a model on a hardware profile, node by node: a table, a log-log PNG and JSON.

``fastgraph roofline MODEL.py --profile h100`` is a thin layer over
:func:`fastgraph.roofline` (``fastgraph.perf.record``): every graph node on the profile's
roofline, the whole step as one more point; with ``--measured`` (the JSON of
``fastgraph profile``) the measured FLOP/s of each node are plotted and tabled beside
the prediction. With ``--gpus N [--nodes M]`` a second table predicts data-parallel
training on N GPUs over M nodes, each GPU at ``--batch-size`` images: the gradient
all-reduce per step (:mod:`fastgraph.perf.communication`), the step with and without
overlap, its scaling efficiency and the images/s of the whole system.
"""

from __future__ import annotations

import argparse

from fastgraph.cli.common import positive
from fastgraph.core.errors import UserError
from fastgraph.core.outputs import check_outputs, write_json
from fastgraph.perf.roofline import DEFAULT_PROFILE


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``fastgraph roofline`` options to its subparser."""
    p.add_argument("model", help="plain PyTorch model file (.py)")
    p.add_argument("--entry", help="function or class in the file that builds the model")
    p.add_argument("--profile", default=DEFAULT_PROFILE,
                   help=f"hardware profile name or .toml file (default {DEFAULT_PROFILE})")
    p.add_argument("--precision", default="bf16", help="fp32, tf32, fp16 or bf16 (default bf16)")
    p.add_argument("--mode", choices=("train", "infer"), default="train",
                   help="a training step (default) or an inference batch")
    p.add_argument("--batch-size", type=positive(int), default=None,
                   help="images per step (default 512, or the --measured profile's)")
    p.add_argument("--input-shape", default="3,32,32", metavar="C,H,W",
                   help="one input image: channels, height, width (default 3,32,32, CIFAR-10; "
                        "3,224,224 for ImageNet)")
    p.add_argument("--out", default="roofline.png", help="the PNG to write (default roofline.png)")
    p.add_argument("--json", metavar="FILE",
                   help="write one entry per node, the step (and with --gpus the communication) as JSON")
    p.add_argument("--measured", metavar="PROFILE_JSON",
                   help="the --json of `fastgraph profile`: plot measured FLOP/s per node")
    p.add_argument("--gpus", type=int, metavar="N",
                   help="predict data-parallel training on N GPUs (--batch-size per GPU): "
                        "gradient all-reduce and scaling efficiency")
    p.add_argument("--nodes", type=int, metavar="M",
                   help="the N GPUs are spread over M nodes (default 1; N a multiple of M)")
    p.add_argument("--grad-precision", metavar="PRECISION",
                   help="dtype of the all-reduced gradients (default --precision; fp32 for "
                        "mixed precision with fp32 weights)")


def run(args: argparse.Namespace) -> int:
    """Run ``fastgraph roofline``; returns the exit code (a ``UserError`` is one line, exit 2)."""
    from rich.console import Console

    from fastgraph import roofline
    from fastgraph.compiler.optimize import parse_input_shape
    from fastgraph.core.figures import check_figure_path
    from fastgraph.perf.record import read_measured
    from fastgraph.perf.roofline import load_profile

    input_shape = parse_input_shape(args.input_shape)
    profile = load_profile(args.profile)
    profile.peak(args.precision)
    if args.gpus is not None:
        from fastgraph.perf.communication import check_system

        check_system(profile, args.gpus, 1 if args.nodes is None else args.nodes)
    elif args.nodes is not None or args.grad_precision is not None:
        raise UserError("--nodes and --grad-precision need --gpus")
    measured = read_measured(args.measured) if args.measured else None
    # Outputs fail here, before the tracing; the plot goes exactly where --out says.
    check_outputs({"--out": args.out, "--json": args.json},
                  inputs={"model file": args.model, "measured profile": args.measured})
    check_figure_path(args.out, "--out")
    record = roofline(args.model, profile=profile, precision=args.precision, mode=args.mode,
                      batch_size=args.batch_size, measured=measured, entry=args.entry,
                      gpus=args.gpus, nodes=args.nodes, gradient_precision=args.grad_precision,
                      input_shape=input_shape)
    plot = record.plot(args.out)
    if args.json:
        write_json(args.json, record.to_dict())
    console = Console()
    console.print(record)
    console.print(f"Roofline plot written to {plot}", soft_wrap=True)
    return 0
