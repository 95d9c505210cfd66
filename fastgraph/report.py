"""Tables for people, from the same dicts that are written as JSON for machines."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def si(value: float | None, unit: str = "") -> str:
    """``value`` with an SI prefix (1.23 G, 456 M); '-' for None."""
    if value is None:
        return "-"
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".rstrip()


def seconds(value: float | None) -> str:
    """Seconds in the unit that reads best (ms below one second)."""
    if value is None:
        return "-"
    return f"{value * 1e3:.3g} ms" if value < 1 else f"{value:.3g} s"


def _arrow(before, after, fmt) -> str:
    if before == after:
        return fmt(before)
    return f"{fmt(before)} → {fmt(after)}"


def pass_table(passes: list[dict], mode: str) -> Table:
    """One row per pass: status, rewrites, exactness, verified difference, FLOPs and bytes per image."""
    t = Table(title=f"Passes ({mode} mode; verified in float64 on real CIFAR-10, training-time ones in "
                    "their identity configuration; differences relative to each tensor's scale)",
              title_justify="left")
    columns = ("pass", "kind", "status", "rewrites", "max rel diff", "tol", "fwd FLOPs/img", "fwd bytes/img")
    for col in columns:
        t.add_column(col, justify="right" if col in ("rewrites", "max rel diff", "tol") else "left")
    styles = {"applied": "green", "refused": "red", "no-op": "dim"}
    for p in passes:
        diff = tol = "-"
        if p["max_output_diff"] is not None:
            diff = f"{max(p['max_output_diff'], p['max_grad_diff'] or 0.0):.2g}"
            tol = f"{p['tolerance']:.1g}"
        t.add_row(p["name"], p["exactness"], f"[{styles.get(p['status'], '')}]{p['status']}",
                  str(p["rewrites"]), diff, tol,
                  _arrow(p["flops_before"], p["flops_after"], si),
                  _arrow(p["bytes_before"], p["bytes_after"], lambda v: si(v, "B")))
    return t


def roofline_table(result: dict) -> Table:
    """Roofline of the run on the profile, and the step measured on this device, before and after."""
    rows = result["roofline"]
    what = f"training, {result['epochs']} epochs" if result["mode"] == "train" else "inference, test set"
    t = Table(title=f"Roofline ({what}) on {result['profile']} at {result['precision']}; "
                    f"step measured on {result['device']}, batch {result['batch_size']}",
              title_justify="left")
    for col in ("graph", "FLOPs/img", "bytes/img", "FLOP/B", "roofline", "bound", "measured step",
                "img/s", "FLOP/s"):
        t.add_column(col, justify="left" if col in ("graph", "bound") else "right")
    for r in rows:
        t.add_row(r["graph"], si(r["step_flops_per_image"]), si(r["step_bytes_per_image"], "B"),
                  f"{r['arithmetic_intensity']:.3g}", seconds(r["roofline_seconds"]), r["bound"],
                  seconds(r["measured_step_seconds"]), f"{r['measured_images_per_second']:.4g}",
                  si(r["measured_flops_per_second"]))
    return t


def print_optimize_report(result: dict, console: Console | None = None) -> None:
    """Print the optimize report (pass table, roofline table, where the module went)."""
    console = console or Console(width=max(Console().width, 120))
    console.print(pass_table(result["passes"], result["mode"]))
    for p in result["passes"]:
        if p["message"] and p["status"] != "no-op":
            console.print(f"  {p['name']}: {p['message']}")
    console.print(roofline_table(result))
    if len(result["roofline"]) == 2:
        before, after = result["roofline"]
        speedup = before["measured_step_seconds"] / after["measured_step_seconds"]
        console.print(f"Measured step: {speedup:.3f}x ({result['roofline'][0]['timing_method']})")
    console.print(f"Optimised module written to {result['optimized_module']}")
    if result.get("emitted_code"):
        console.print(f"Generated code written to {result['emitted_code']}")
