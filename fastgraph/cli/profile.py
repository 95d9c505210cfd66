"""``fastgraph profile``: its options, then :func:`fastgraph.profile` (a Chrome trace and the
per-node table) or, with ``--nsys``, the steps captured for Nsight Systems
(``fastgraph.perf.profile.nsys_capture``)."""

from __future__ import annotations

import argparse

from fastgraph.cli.common import data_input
from fastgraph.core.devices import resolve_device
from fastgraph.core.errors import UserError
from fastgraph.core.outputs import check_outputs, write_json
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


def run(args: argparse.Namespace) -> int:
    """Run ``fastgraph profile``; returns the exit code (a ``UserError`` is one line, exit 2)."""
    from rich.console import Console

    from fastgraph import profile
    from fastgraph.perf.profile import nsys_capture
    from fastgraph.perf.roofline import load_profile

    if args.steps < 1 or args.warmup < 0 or (args.batch_size is not None and args.batch_size < 2):
        raise UserError("--steps must be >= 1, --warmup >= 0 and --batch-size >= 2")
    cuda = resolve_device(args.device).type == "cuda"
    if args.nsys and not cuda:
        raise UserError("--nsys captures CUDA work for Nsight Systems: it needs a CUDA device")
    hardware = load_profile(args.profile)
    hardware.peak(args.precision or ("bf16" if cuda else "fp32"))
    # Outputs and the model file are checked before the data is looked for (it may be absent,
    # or take seconds to decode).
    out = check_outputs({"--out": args.out, "--json": args.json},
                        inputs={"model file": args.model, "data": data_input(args.data)},
                        folders=("--out",))["--out"]
    options = {"recipe": args.recipe, "steps": args.steps, "warmup": args.warmup,
               "batch_size": args.batch_size, "data": args.data, "device": args.device, "profile": hardware,
               "precision": args.precision, "entry": args.entry}
    if args.nsys:
        timed = nsys_capture(args.model, **options)
        print(f"{args.steps} steps captured for Nsight Systems: median "
              f"{timed['median_seconds'] * 1e3:.3g} ms per step ({timed['method']}); open the .nsys-rep, "
              "NVTX ranges name the graph's modules")
        return 0
    report = profile(args.model, out=out, **options)
    if args.json:
        write_json(args.json, report.to_dict())
    Console().print(report, crop=False)
    return 0
