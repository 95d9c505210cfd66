"""``fastgraph export``: its options, and the run that prints the summary and writes it.

A thin layer over :func:`fastgraph.export` (``fastgraph.deploy.pipeline``): options and
outputs are checked before any slow work, then the summary table is printed and written
as JSON; the exit code is 1 when the engine's logits or accuracy disagree with PyTorch's
(see :func:`fastgraph.deploy.pipeline.compare`).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from fastgraph.cli.common import data_input, positive
from fastgraph.core.errors import UserError
from fastgraph.core.outputs import check_outputs, write_json
from fastgraph.deploy.pipeline import TTA_LEVELS, UntrainedWeightsWarning, check_export_options

SUFFIXES = {"onnx": ".onnx", "tensorrt": ".ep"}  # --format -> the engine file's suffix (--out)


def _batch_arg(text: str) -> int | None:
    """``--batch``: ``dynamic`` (None) or a positive integer."""
    if text == "dynamic":
        return None
    try:
        return positive(int)(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (give a positive integer or 'dynamic')") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``fastgraph export`` options to its subparser."""
    p.add_argument("model", help="plain PyTorch model file (.py)")
    p.add_argument("--entry", help="function or class in the file that builds the model")
    p.add_argument("--checkpoint", metavar="CKPT", help="trained weights: a state_dict file, or a "
                   "`fastgraph train --checkpoint` folder or file (default: the file's initial weights)")
    p.add_argument("--weights", choices=("auto", "trained", "ema"), default="auto",
                   help="of a training checkpoint (needs --checkpoint): the trained or the EMA "
                        "weights (default: those the recipe evaluates)")
    p.add_argument("--format", choices=tuple(SUFFIXES), default="onnx",
                   help="engine format: onnx (a .onnx file, the default) or tensorrt (a .ep file)")
    p.add_argument("--tta", choices=tuple(TTA_LEVELS), default="flip",
                   help="test-time augmentation folded into the graph (default flip)")
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32",
                   help="engine precision (default fp32)")
    p.add_argument("--batch", type=_batch_arg, default=None, metavar="N|dynamic",
                   help="fixed batch size, or dynamic (default)")
    p.add_argument("--opset", type=int, default=18,
                   help="ONNX opset, from 17 to the newest the installed onnx knows (default 18)")
    p.add_argument("--out", help="engine file, named .onnx or .ep as --format writes (default <model>.onnx "
                   "or <model>.ep in the current folder); its folder must exist; an existing file is "
                   "replaced")
    p.add_argument("--data", help="CIFAR-10 (folder or archive; default $FASTGRAPH_DATA)")
    p.add_argument("--verify-images", type=int, default=10_000, metavar="N",
                   help="test images to verify on, spread over all classes (default all 10,000)")
    p.add_argument("--device", default=None,
                   help="device for PyTorch and the engine (default cuda if present)")
    p.add_argument("--json", metavar="FILE", help="write the summary as JSON")


def _say_untrained(message, category, *_args, **_kwargs) -> None:
    """``warnings.showwarning`` while exporting: the untrained-weights warning as one line."""
    if issubclass(category, UntrainedWeightsWarning):
        print("fastgraph export: no --checkpoint: exporting the model file's initial (untrained) weights",
              file=sys.stderr)
    else:
        print(f"fastgraph export: warning: {message}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Run ``fastgraph export``; returns the exit code (a ``UserError`` is one line, exit 2)."""
    from rich.console import Console

    from fastgraph import export

    device = check_export_options(args.format, args.opset, args.device, weights=args.weights,
                                  checkpoint=args.checkpoint)
    # Unwritable outputs are named before the model, the checkpoint and the data are read.
    suffix = SUFFIXES[args.format]
    inputs = {"model file": args.model, "checkpoint": args.checkpoint, "data": data_input(args.data)}
    out = check_outputs({"--out": args.out or Path.cwd() / f"{Path(args.model).stem}{suffix}",
                         "--json": args.json}, inputs=inputs)["--out"]
    if out.suffix.lower() != suffix:
        raise UserError(f"--out {out}: --format {args.format} writes a {suffix} file; name it *{suffix}")
    with warnings.catch_warnings():  # the API's warning, said as one line of the command's
        warnings.simplefilter("always", UntrainedWeightsWarning)
        warnings.showwarning = _say_untrained
        report = export(args.model, out, tta=args.tta, format=args.format, checkpoint=args.checkpoint,
                        weights=args.weights, precision=args.precision, batch=args.batch, opset=args.opset,
                        data=args.data, verify_images=args.verify_images, device=device, entry=args.entry)
    if args.json:
        write_json(args.json, report.to_dict())
    Console().print(report)
    return 0 if report.passed else 1
