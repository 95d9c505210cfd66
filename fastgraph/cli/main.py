"""The ``fastgraph`` command line: one subcommand per module, errors as one line.

Each subcommand lives in its own module, which defines ``add_arguments(parser)`` and
``run(args) -> int``. Exit codes: 0 ok, 2 user error (one line on stderr, no traceback),
1 internal error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import fastgraph
from fastgraph.core.errors import UserError

# subcommand -> (module, one-line help). A command module keeps heavy and optional
# imports (onnx, torch_tensorrt, matplotlib) inside ``run`` so that `fastgraph --help`
# stays fast and a missing optional extra breaks only the command that needs it.
COMMANDS: dict[str, tuple[str, str]] = {
    "optimize": ("fastgraph.cli.optimize",
                 "trace a model file, rewrite it with passes, verify and report"),
    "train": ("fastgraph.cli.train", "train a model file on CIFAR-10 with a recipe"),
    "export": ("fastgraph.cli.export", "export the inference graph (with TTA) to ONNX or TensorRT"),
    "profile": ("fastgraph.cli.profile", "profile training steps per graph node (torch.profiler, NVTX)"),
    "roofline": ("fastgraph.cli.roofline", "roofline table and plot of a model on a hardware profile"),
    "advise": ("fastgraph.cli.advise", "which tricks apply to a model, where, and their predicted gain"),
    "data": ("fastgraph.cli.data", "download or inspect CIFAR-10"),
}

# subcommand -> what `fastgraph COMMAND --help` says it does: one complete sentence for
# users (module docstrings are written for the code's readers).
DESCRIPTIONS: dict[str, str] = {
    "optimize": "Trace a model file, rewrite its graph with passes, check each pass in float64 on "
                "real CIFAR-10 images, and report the roofline and the measured step before and after.",
    "train": "Train a model file on CIFAR-10 with a recipe and report accuracy (plain and TTA) and time.",
    "export": "Export a model's inference graph, with test-time augmentation, to ONNX or TensorRT "
              "and verify it against PyTorch.",
    "profile": "Profile training steps of a model file per graph node (torch.profiler, NVTX ranges): "
               "write a Chrome trace and print each node's time, FLOPs and achieved rate.",
    "roofline": "Place every graph node of a model file on a hardware profile's roofline and print "
                "it as a table, a log-log plot and JSON.",
    "advise": "Say which of fastgraph's tricks apply to a model file, where, and what the roofline "
              "predicts they gain.",
    "data": "Download CIFAR-10 or show what a data location holds.",
}


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors say one line and exit 2, like every other user error."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``fastgraph`` argument parser, with one subparser per command of :data:`COMMANDS`."""
    parser = _Parser(prog="fastgraph", description=fastgraph.__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"fastgraph {fastgraph.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:  # command not built in this version
                continue
            raise
        p = sub.add_parser(name, help=help_text, description=DESCRIPTIONS[name])
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastgraph`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)  # fastgraph train --nproc starts it again
    try:
        return int(args._run(args) or 0)
    except UserError as exc:
        # a process of fastgraph train --nproc (fastgraph.training.distributed.ERRORS_ENV)
        if os.environ.get("FASTGRAPH_RANK_ERRORS"):
            from fastgraph.training.distributed import say_error

            say_error(f"fastgraph: error: {exc}")
        else:
            print(f"fastgraph: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastgraph: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
