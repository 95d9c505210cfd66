"""The optimize report for people, from the same dict that is written as JSON for
machines: the pass table, the roofline table and where the module went.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from fastgraph.core.console import fitting_table, seconds, si


def _arrow(before, after, fmt) -> str:
    if before == after:
        return fmt(before)
    return f"{fmt(before)} → {fmt(after)}"




def pass_table(passes: list[dict], mode: str) -> Table:
    """One row per pass: status, rewrites, exactness, verified difference, FLOPs and bytes per image.

    "rel diff" is the largest difference of any output, buffer or gradient relative to
    that tensor's own scale; its tolerance goes in the title when every checked pass
    shares one (the usual case), else in a column of its own.
    """
    styles = {"applied": "green", "refused": "red", "no-op": "dim"}
    tolerances = {p["tolerance"] for p in passes if p["max_output_diff"] is not None}
    one_tol = len(tolerances) <= 1
    rows = []
    for p in passes:
        diff = tol = "-"
        if p["max_output_diff"] is not None:
            diff = f"{max(p['max_output_diff'], p['max_grad_diff'] or 0.0):.2g}"
            tol = f"{p['tolerance']:.1g}"
        rows.append([p["name"], p["exactness"], f"[{styles.get(p['status'], '')}]{p['status']}",
                     str(p["rewrites"]), diff, *([] if one_tol else [tol]),
                     _arrow(p["flops_before"], p["flops_after"], si),
                     _arrow(p["bytes_before"], p["bytes_after"], lambda v: si(v, "B"))])
    columns = {"pass": "left", "kind": "left", "status": "left", "rewrites": "right", "rel diff": "right",
               **({} if one_tol else {"tol": "right"}), "FLOPs": "right", "bytes": "right"}
    checked = f", tolerance {next(iter(tolerances)):.1g}" if one_tol and tolerances else ""
    title = (f"Passes ({mode} mode), checked in float64 on real CIFAR-10 (training-time ones in their "
             f"identity configuration); differences relative to each tensor's scale{checked}; "
             "forward FLOPs and bytes per image")
    return fitting_table(title, columns, rows)


def roofline_table(result: dict) -> Table:
    """Roofline of the run on the profile, and the step measured on this device, before and after."""
    rows = result["roofline"]
    what = f"training, {result['epochs']} epochs" if result["mode"] == "train" else "inference, test set"
    title = (f"Roofline ({what}) on {result['profile']} at {result['precision']}; "
             f"step measured on {result['device']}, batch {result['batch_size']}; FLOPs and bytes "
             "per image; roof time: the step's time on the roofline")
    columns = {"graph": "left", "FLOPs": "right", "bytes": "right", "FLOP/B": "right",
               "roof time": "right", "bound": "left", "step": "right", "img/s": "right", "FLOP/s": "right"}
    cells = [[r["graph"], si(r["step_flops_per_image"]), si(r["step_bytes_per_image"], "B"),
              f"{r['arithmetic_intensity']:.3g}", seconds(r["roofline_seconds"]), r["bound"],
              seconds(r["measured_step_seconds"]), f"{r['measured_images_per_second']:.4g}",
              si(r["measured_flops_per_second"])] for r in rows]
    return fitting_table(title, columns, cells)


def print_optimize_report(result: dict, console: Console | None = None) -> None:
    """Print the optimize report (pass table, roofline table, where the module went).

    ``console`` defaults to stdout at the terminal's width (80 columns when not a terminal).
    """
    console = console or Console()
    console.print(pass_table(result["passes"], result["mode"]))
    for p in result["passes"]:
        if p["message"] and p["status"] != "no-op":
            # Unbroken: a message may quote a path or an error to search for.
            console.print(f"  {p['name']}: {p['message']}", soft_wrap=True)
    console.print(roofline_table(result))
    if len(result["roofline"]) == 2:
        before, after = result["roofline"]
        timing = result.get("measured_step")
        if timing is None:  # a report written before step times carried their spread
            timing = {"text": f"{before['measured_step_seconds'] / after['measured_step_seconds']:.3f}x"}
        console.print(f"Measured step: {timing['text']} ({result['roofline'][0]['timing_method']})")
    # Paths are never broken across lines, so they can be copied.
    console.print(f"Optimised module written to {result['optimized_module']}", soft_wrap=True)
    if result.get("emitted_code"):
        console.print(f"Generated code written to {result['emitted_code']}", soft_wrap=True)
