"""The roofline plot: attainable FLOP/s against arithmetic intensity, log-log, as a PNG.

Drawn with matplotlib's object API on the Agg canvas (no pyplot state, no display
needed): one compute ceiling per precision of the hardware profile (the chosen one
solid, the others dashed), the memory-bandwidth slope up to each ridge point, every
graph node with counted FLOPs as a labelled point, and the whole step as a star
(Williams, Waterman and Patterson, "Roofline", CACM 2009). Nodes without counted FLOPs
(batch norm, activations, pooling: ``FlopCounterMode`` counts matrix multiplies and
convolutions only) have no place on a log FLOP/s axis; they are listed in a box.
"""

from __future__ import annotations

from pathlib import Path

from fastgraph.roofline import HardwareProfile


def _limits(values: list[float], ridge: float) -> tuple[float, float]:
    positive = [v for v in values if v > 0] + [ridge]
    return min(positive) / 4, max(positive) * 4


def plot_roofline(path: str | Path, *, profile: HardwareProfile, precision: str, points: list[dict],
                  step: dict, title: str, measured: list[dict] | None = None) -> Path:
    """Write the roofline PNG to ``path`` and return it.

    Args:
        profile, precision: the ceilings; ``precision`` is drawn solid.
        points: per node ``{"label", "arithmetic_intensity" (FLOPs/byte), "attainable_flops_per_second"}``
            (predicted: the point on the roofline at the node's intensity).
        step: the whole step, same keys (and ``achieved_flops_per_second`` when measured).
        measured: per node ``{"label", "arithmetic_intensity", "achieved_flops_per_second"}``
            from a profile; when given they are the labelled points and the predicted
            ones are drawn hollow for comparison.
        title: the plot title.

    Raises:
        UserError: the file cannot be written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from fastgraph.errors import UserError

    peak = profile.peak(precision)
    bandwidth = profile.memory_bandwidth
    ridge = peak / bandwidth
    x_lo, x_hi = _limits([p["arithmetic_intensity"] for p in points] + [step["arithmetic_intensity"]], ridge)
    fig = Figure(figsize=(11, 7), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_xscale("log")
    ax.set_yscale("log")

    for name, rate in profile.peak_flops.items():
        chosen = name == precision
        knee = rate / bandwidth
        style = {"color": "black" if chosen else "0.6", "linewidth": 2.0 if chosen else 0.9,
                 "linestyle": "-" if chosen else "--"}
        label = f"{name} peak {rate / 1e12:.4g} TFLOP/s"
        if chosen:
            label += f", memory {bandwidth / 1e12:.3g} TB/s (this roofline)"
        ax.plot([x_lo, knee, x_hi], [bandwidth * x_lo, rate, rate], **style, label=label)

    drawn = [p for p in points if p["arithmetic_intensity"] > 0]
    hollow = measured is not None
    ax.scatter([p["arithmetic_intensity"] for p in drawn], [p["attainable_flops_per_second"] for p in drawn],
               s=28, facecolors="none" if hollow else "tab:blue", edgecolors="tab:blue", zorder=3,
               label="nodes, predicted (on the roofline)")
    labelled = drawn
    y_key = "attainable_flops_per_second"
    if measured is not None:
        labelled = [m for m in measured
                    if m["arithmetic_intensity"] > 0 and m["achieved_flops_per_second"] > 0]
        y_key = "achieved_flops_per_second"
        ax.scatter([m["arithmetic_intensity"] for m in labelled], [m[y_key] for m in labelled], s=28,
                   color="tab:orange", zorder=4, label="nodes, measured")
    _label_points(ax, [(p["label"], p["arithmetic_intensity"], p[y_key]) for p in labelled])
    step_y = step.get("achieved_flops_per_second", step["attainable_flops_per_second"])
    ax.scatter([step["arithmetic_intensity"]], [step_y], marker="*", s=260, color="tab:red", zorder=5,
               edgecolors="black",
               label="whole step" + (" (measured)" if "achieved_flops_per_second" in step else ""))

    zero = [p["label"] for p in points if p["arithmetic_intensity"] <= 0]
    if zero:
        shown = ", ".join(zero[:24]) + (f", ... ({len(zero) - 24} more)" if len(zero) > 24 else "")
        ax.text(0.01, 0.01, f"{len(zero)} nodes without counted FLOPs (memory-bound):\n"
                + "\n".join(_wrap(shown, 90)), transform=ax.transAxes, fontsize=6, va="bottom",
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "0.7"})
    ys = [peak] + [p[y_key] for p in labelled] + [step_y, bandwidth * x_lo]
    ax.set_xlim(x_lo, x_hi)
    ax.set_ylim(min(y for y in ys if y > 0) / 4, max(profile.peak_flops.values()) * 2)
    ax.set_xlabel("arithmetic intensity (FLOPs / byte)")
    ax.set_ylabel("FLOP/s")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", linewidth=0.4, color="0.85")
    ax.legend(loc="upper left", fontsize=7)
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    except (OSError, ValueError) as exc:  # ValueError: a file suffix matplotlib has no format for
        reason = getattr(exc, "strerror", None) or exc
        raise UserError(f"cannot write the roofline plot {path}: {reason}") from None
    return path


def _label_points(ax, points: list[tuple[str, float, float]]) -> None:
    """Annotate each point with its label, stepping labels of nearby points apart vertically
    (nodes of equal shape sit on top of each other at the compute ceiling)."""
    import math

    placed: list[tuple[float, float]] = []
    for label, x, y in sorted(points, key=lambda p: (p[1], p[2])):
        lx, ly = math.log10(x), math.log10(y)
        crowd = sum(1 for px, py in placed if abs(px - lx) < 0.3 and abs(py - ly) < 0.1)  # ~ a label width
        placed.append((lx, ly))
        dy = 4 + 8 * (crowd // 2 + crowd % 2) * (1 if crowd % 2 == 0 else -1)
        ax.annotate(label, (x, y), xytext=(4, dy), textcoords="offset points", fontsize=6,
                    arrowprops={"arrowstyle": "-", "color": "0.6", "linewidth": 0.4} if crowd else None)


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width)
