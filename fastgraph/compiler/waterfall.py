"""The optimize report as a picture: a waterfall of the roofline time each pass saves,
next to the step times measured before and after, with their spread.

Left panel: the predicted time of the forward pass of one step (``batch_size`` images,
the measured step's batch) on the report's hardware profile and precision, as the
roofline bounds it (Williams, Waterman and Patterson, CACM 2009):
``max(FLOPs / peak FLOP/s, bytes / memory bandwidth)``, from the forward FLOPs and bytes
per image the pass report holds before and after each pass
(:func:`fastgraph.perf.roofline.roofline`). The first bar is the traced graph, then one
floating bar per pass from its before to its after time (green when it saves time, red
when it costs time, a grey tick when it changed nothing: a no-op, or a refused pass
whose module was kept), and the last bar is the optimised graph. The pass report
counts bytes at the tensors' own dtypes (float32 for a float32 model) and forward work
only; the roofline table's rows count them at the report's precision and, in train
mode, with the backward, so their times differ from these.

Right panel: the step time measured on this device before and after (median bar,
min-max whisker, every timed step as a dot), with the comparison's verdict ("faster",
"slower", "within noise": the ranges overlap).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from fastgraph.core.errors import UserError
from fastgraph.core.figures import save_figure
from fastgraph.perf.roofline import HardwareProfile, load_profile, roofline

SAVES, COSTS, SAME, TOTAL = "tab:green", "tab:red", "0.55", "tab:blue"


def pass_seconds(result: dict, profile: HardwareProfile | None = None) -> list[dict]:
    """Predicted forward seconds of one step before and after each pass of an optimize report.

    Args:
        result: the report dict as ``fastgraph optimize --json`` writes it (``passes``
            with ``flops_before``/``flops_after`` in FLOPs and ``bytes_before``/
            ``bytes_after`` in bytes, per image; ``batch_size``; ``profile``; ``precision``).
        profile: the hardware profile; default ``load_profile(result["profile"])`` (pass
            it for a profile read from a ``.toml`` file, which the report names by stem).

    Returns:
        Per pass, in order: ``{"name", "status", "rewrites", "before", "after"}``, the
        last two in seconds for ``batch_size`` images.

    Raises:
        UserError: the report has no passes, or no FLOPs/bytes for one, or an unknown
            profile or precision.
    """
    passes = result.get("passes") or []
    if not passes:
        raise UserError("the optimize report ran no pass: no waterfall to draw")
    profile = profile or load_profile(result["profile"])
    images = result["batch_size"]
    rows = []
    for p in passes:
        if None in (p.get("flops_before"), p.get("bytes_before"), p.get("flops_after"), p.get("bytes_after")):
            raise UserError(f"the optimize report has no FLOPs and bytes for pass {p['name']}: "
                            "no roofline time to draw")

        def seconds(flops, moved):
            return roofline(flops * images, moved * images, profile, result["precision"]).seconds

        rows.append({"name": p["name"], "status": p["status"], "rewrites": p.get("rewrites", 0),
                     "before": seconds(p["flops_before"], p["bytes_before"]),
                     "after": seconds(p["flops_after"], p["bytes_after"])})
    return rows


def plot_waterfall(result: dict, path: str | Path, *, profile: HardwareProfile | None = None) -> Path:
    """Write the waterfall of ``result`` (see :func:`waterfall_figure`) to ``path`` and return it.

    The format is the path's suffix (``.png``...).

    Raises:
        UserError: as :func:`pass_seconds`; a suffix matplotlib has no format for, or
            the file cannot be written.
    """
    return save_figure(waterfall_figure(result, profile=profile), path, "the waterfall plot")


def _step_times(result: dict) -> dict[str, list[float]]:
    """Measured step seconds of the ``before`` and ``after`` graphs: every timed step."""
    rows = {r["graph"]: r for r in result.get("roofline", [])}
    times = {}
    for graph in ("before", "after"):
        row = rows.get(graph, {})
        times[graph] = list(row.get("measured_step_samples") or
                            ([row["measured_step_seconds"]] if "measured_step_seconds" in row else []))
    return times


def waterfall_figure(result: dict, *, profile: HardwareProfile | None = None):
    """The waterfall and the measured steps as a matplotlib ``Figure`` on an Agg canvas
    (5.5 inches high, wide enough for 1.5 inches per bar, 12 at least; 110 dpi);
    ``result`` and ``profile`` as :func:`pass_seconds`.

    Returns:
        The figure: ``axes[0]`` the waterfall, in seconds (bars' ``get_gid()``:
        ``"traced"``, ``"pass <k>: <name>"`` (k from 1), ``"optimized"``; a pass bar's ``get_y()`` is its
        before time and ``get_y() + get_height()`` its after time), ``axes[1]`` the
        measured steps in seconds (bars ``"measured before"``/``"measured after"`` at the
        median, and the samples).

    Raises:
        UserError: as :func:`pass_seconds`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    profile = profile or load_profile(result["profile"])
    rows = pass_seconds(result, profile)
    fig = Figure(figsize=(max(12.0, 1.5 * (len(rows) + 2) + 4.5), 5.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax, measured = fig.subplots(1, 2, width_ratios=(max(3, len(rows) + 2), 2))

    start, end = rows[0]["before"], rows[-1]["after"]
    labels = ["traced graph"] + [f"{r['name']}\n({r['status']}, {r['rewrites']} rewrites)" for r in rows]
    labels.append("optimized graph")
    ax.bar([0], [start], color=TOTAL, width=0.6, gid="traced")
    for i, r in enumerate(rows, start=1):
        delta = r["after"] - r["before"]
        color = SAVES if delta < 0 else COSTS if delta > 0 else SAME
        ax.bar([i], [delta], bottom=r["before"], color=color, width=0.6, gid=f"pass {i}: {r['name']}",
               edgecolor=color, linewidth=1.5)  # the edge keeps a zero-height bar visible
        ax.annotate(_signed(delta, start), (i, max(r["before"], r["after"])), xytext=(0, 3),
                    textcoords="offset points", ha="center", va="bottom", fontsize=8)
    ax.bar([len(rows) + 1], [end], color=TOTAL, width=0.6, gid="optimized")
    for x, value in ((0, start), (len(rows) + 1, end)):
        ax.annotate(_eng(value), (x, value), xytext=(0, 3), textcoords="offset points", ha="center",
                    va="bottom", fontsize=8)
    levels = [start] + [r["after"] for r in rows]
    for i, level in enumerate(levels):  # connectors: each bar starts where the last ended
        ax.plot([i + 0.3, i + 0.7], [level, level], color="0.4", linewidth=0.8, linestyle=":")
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylim(0, max([start, end] + [r["before"] for r in rows] + [r["after"] for r in rows]) * 1.15)
    ax.yaxis.set_major_formatter(EngFormatter(unit="s"))
    ax.set_ylabel(f"predicted forward time of one step of {result['batch_size']} images")
    ax.set_title(f"roofline on {profile.display_name} at {result['precision']} "
                 f"(bytes at the model's dtypes)", fontsize=9)
    ax.grid(True, axis="y", linewidth=0.4, color="0.85")

    _draw_measured(measured, result)
    mode = {"train": "training", "infer": "inference"}.get(result.get("mode"), result.get("mode", ""))
    fig.suptitle(f"{Path(result.get('model', 'model')).name}: {mode} passes, predicted and measured",
                 fontsize=11)
    return fig


def _draw_measured(ax, result: dict) -> None:
    """Median bar, min-max whisker and every timed step, before and after."""
    from matplotlib.ticker import EngFormatter

    times = _step_times(result)
    shown = [g for g in ("before", "after") if times[g]]
    for x, graph in enumerate(shown):
        samples = sorted(times[graph])
        median = statistics.median(samples)
        ax.bar([x], [median], color=TOTAL, alpha=0.45, width=0.5, gid=f"measured {graph}",
               yerr=[[median - samples[0]], [samples[-1] - median]], capsize=6, ecolor="black")
        ax.plot([x] * len(samples), samples, linestyle="none", marker="o", markersize=4, color="black",
                gid=f"samples {graph}")
    ax.set_xticks(range(len(shown)), [f"{g}\n(n = {len(times[g])})" for g in shown], fontsize=8)
    ax.set_xlim(-0.6, len(shown) - 0.4)
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_formatter(EngFormatter(unit="s"))
    ax.set_ylabel(f"measured step of {result['batch_size']} images (median, min-max)")
    timing = result.get("measured_step") or {}
    verdict = f": {timing['speedup']:.3g}x, {timing['verdict']}" if timing else ""
    ax.set_title(f"measured on {result.get('device', '?')}{verdict}", fontsize=9)
    ax.grid(True, axis="y", linewidth=0.4, color="0.85")


def _eng(seconds: float) -> str:
    """Seconds to 3 significant digits in the unit that reads best (``4.27 µs``)."""
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs")):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"


def _signed(delta: float, start: float) -> str:
    """A pass's change: ``-1.23 µs (-5.0%)``, or ``no change``."""
    if delta == 0:
        return "no change"
    sign = "+" if delta > 0 else "\N{MINUS SIGN}"
    share = f" ({sign}{100 * abs(delta) / start:.1f}%)" if start else ""
    return sign + _eng(abs(delta)) + share
