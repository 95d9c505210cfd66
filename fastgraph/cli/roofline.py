"""Roofline of a model on a hardware profile, node by node: a table, a log-log PNG and JSON.

``fastgraph roofline MODEL.py --profile h100`` traces the model file and places every
graph node on the profile's roofline: FLOPs and bytes of one training step (or one
inference batch) from :mod:`fastgraph.perf.nodes`, the arithmetic intensity, the
attainable FLOP/s and the roofline time, and the whole step as one more point. With
``--measured`` (the JSON of ``fastgraph profile``) the measured FLOP/s of each node are
plotted and tabled beside the prediction.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

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
    p.add_argument("--batch-size", type=positive(int), default=512, help="images per step (default 512)")
    p.add_argument("--out", default="roofline.png", help="the PNG to write (default roofline.png)")
    p.add_argument("--json", metavar="FILE", help="write one entry per node, and the step, as JSON")
    p.add_argument("--measured", metavar="PROFILE_JSON",
                   help="the --json of `fastgraph profile`: plot measured FLOP/s per node")


def read_measured(path: str) -> dict:
    """The ``fastgraph profile --json`` record at ``path``.

    Raises:
        UserError: missing file, invalid JSON, or not a ``fastgraph profile`` record.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"--measured file not found: {file}")
    try:
        record = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"--measured {file}: not valid JSON ({exc})") from None
    if not isinstance(record, dict) or not isinstance(record.get("rows"), list) or "batch_size" not in record:
        raise UserError(f"--measured {file} is not the --json output of `fastgraph profile`")
    return record


def check_plot_type(path: str | Path) -> None:
    """Refuse a plot path whose suffix matplotlib cannot write.

    Without a suffix matplotlib would append ``.png`` on its own and the plot would land
    beside the name the user gave (``--out DIR`` would become ``DIR.png``).

    Raises:
        UserError: no suffix, or one that is not a format matplotlib writes (png, pdf, svg...).
    """
    from matplotlib.backend_bases import FigureCanvasBase

    kinds = FigureCanvasBase.get_supported_filetypes()
    suffix = Path(path).suffix.lower().removeprefix(".")
    if suffix not in kinds:
        what = f"matplotlib cannot write .{suffix} files" if suffix else "no file type"
        others = ", ".join(f".{k}" for k in sorted(kinds) if k != "png")
        raise UserError(f"--out {path}: {what}; end the name with .png (or {others})")


def roofline_record(gm, profile, precision: str, mode: str, batch_size: int,
                    measured: dict | None = None) -> dict:
    """The roofline of ``gm`` as a JSON-ready dict: profile, one entry per node, the step.

    With ``measured`` (a profile record), nodes gain ``measured_seconds`` (per step),
    ``achieved_flops_per_second`` and ``fraction_of_attainable``, matched by label
    (module path); the step gains the measured step time.

    Raises:
        UserError: see :func:`fastgraph.perf.nodes.node_points`; a measured record
            that matches no node of the graph.
    """
    from fastgraph.perf.nodes import node_points, step_point

    points = node_points(gm, profile, precision, mode=mode, batch_size=batch_size)
    nodes = [p.as_dict() for p in points]
    step = step_point(points, profile, precision)
    if measured is not None:
        rows = {r["node"]: r for r in measured["rows"]}
        matched = 0
        for n in nodes:
            row = rows.get(n["label"])
            if row is None or not row.get("seconds"):
                continue
            matched += 1
            n["measured_seconds"] = row["seconds"]
            n["achieved_flops_per_second"] = n["flops"] / row["seconds"]
            n["fraction_of_attainable"] = (n["achieved_flops_per_second"] / n["attainable_flops_per_second"]
                                           if n["attainable_flops_per_second"] else None)
        if not matched:
            raise UserError("--measured: no row matches a node of this graph (profiled from another model?)")
        step_seconds = measured.get("step_seconds")
        if step_seconds:
            step["measured_seconds"] = step_seconds
            step["achieved_flops_per_second"] = step["flops"] / step_seconds
    return {"profile": profile.name, "display_name": profile.display_name, "precision": precision,
            "mode": mode, "batch_size": batch_size, "peak_flops_per_second": profile.peak(precision),
            "memory_bandwidth": profile.memory_bandwidth, "ridge_point": profile.ridge_point(precision),
            "nodes": nodes, "step": step}


def roofline_table(record: dict):
    """One row per node and one for the step: FLOPs, bytes, intensity, bound, roofline time, measured."""
    from fastgraph.core.console import fitting_table, number, si

    measured = any("measured_seconds" in n for n in record["nodes"])
    title = (f"Roofline per node: {record['mode']} step of {record['batch_size']} images on "
             f"{record['display_name']} at {record['precision']} "
             f"(ridge {record['ridge_point']:.3g} FLOPs/B); "
             "roof: the node's time on the roofline" + ("; meas: measured time, achieved rate and its share "
                                                          "of the roof's" if measured else ""))
    # Short headers and units in them, so that 11 columns fit 80 with the node names whole.
    cols = ["node", "FLOPs", "bytes", "FLOP/B", "bound", "roof µs", "% step"]
    cols += ["meas µs", "TFLOP/s", "% roof"] if measured else ["attainable TFLOP/s"]
    rows = []
    total = record["step"]["roofline_seconds"] or 1.0
    for n in record["nodes"] + [dict(record["step"], label="step (sum)", bound="-")]:
        row = [n["label"], si(n["flops"]), si(n["bytes"], "B"), f"{n['arithmetic_intensity']:.3g}",
               n["bound"], number(n["roofline_seconds"] * 1e6), f"{100 * n['roofline_seconds'] / total:.1f}"]
        if measured:
            frac = n.get("fraction_of_attainable")
            seconds, achieved = n.get("measured_seconds"), n.get("achieved_flops_per_second")
            row += [number(seconds * 1e6 if seconds is not None else None),
                    number(achieved / 1e12 if achieved is not None else None),
                    f"{100 * frac:.1f}" if frac is not None else "-"]
        else:
            row.append(number(n["attainable_flops_per_second"] / 1e12))
        rows.append(row)
    return fitting_table(title, {c: "left" if c in ("node", "bound") else "right" for c in cols}, rows,
                         compact=True)


def run(args: argparse.Namespace) -> int:
    """Run ``fastgraph roofline``; returns the exit code (a ``UserError`` is one line, exit 2)."""
    from rich.console import Console

    from fastgraph.core.loading import load_model
    from fastgraph.core.tracing import trace
    from fastgraph.perf.plot import plot_roofline
    from fastgraph.perf.roofline import load_profile

    profile = load_profile(args.profile)
    profile.peak(args.precision)
    measured = read_measured(args.measured) if args.measured else None
    # Outputs fail here, before the tracing; the plot goes exactly where --out says.
    check_outputs({"--out": args.out, "--json": args.json},
                  inputs={"model file": args.model, "measured profile": args.measured})
    check_plot_type(args.out)
    batch_size = args.batch_size
    if measured is not None:
        if args.mode != "train":
            raise UserError("--measured comes from training steps (`fastgraph profile`): use --mode train")
        batch_size = int(measured["batch_size"])  # FLOPs per step must be those of the measured steps
    gm = trace(load_model(args.model, args.entry), args.model)
    record = roofline_record(gm, profile, args.precision, args.mode, batch_size, measured)
    record["model"] = str(Path(args.model).resolve())
    title = (f"{Path(args.model).name}: {args.mode} step of {batch_size} images on {profile.display_name}, "
             f"{args.precision}" + (" (measured: " + str(measured.get("device")) + ")" if measured else ""))
    measured_points = None
    if measured is not None:
        measured_points = [n for n in record["nodes"] if "achieved_flops_per_second" in n]
    plot = plot_roofline(args.out, profile=profile, precision=args.precision, points=record["nodes"],
                         step=record["step"], title=title, measured=measured_points)
    record["plot"] = str(plot.resolve())
    if args.json:
        write_json(args.json, record)
    console = Console()
    console.print(roofline_table(record))
    console.print(f"Roofline plot written to {plot}", soft_wrap=True)
    return 0
