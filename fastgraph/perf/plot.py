"""The roofline plot: attainable FLOP/s against arithmetic intensity, log-log, as a PNG.

Drawn with matplotlib's object API on the Agg canvas (no pyplot state, no display
needed): one compute ceiling per precision of the hardware profile (the chosen one
solid, the others dashed), the memory-bandwidth slope up to each ridge point, every
graph node with counted FLOPs as a point, the most expensive ones labelled (ResNet-50
has over fifty convolutions, most of them at the same few points: labelling them all
gives a smear; every node is in the table and the JSON), and the whole step as a star
(Williams, Waterman and Patterson, "Roofline", CACM 2009). Nodes without counted FLOPs
(batch norm, activations, pooling: ``FlopCounterMode`` counts matrix multiplies and
convolutions only) have no place on a log FLOP/s axis; they are listed in a box.
"""

from __future__ import annotations

from pathlib import Path

from fastgraph.perf.roofline import HardwareProfile

LABELLED = 12  # nodes labelled at most, the most expensive first


def _limits(values: list[float], ridge: float) -> tuple[float, float]:
    positive = [v for v in values if v > 0] + [ridge]
    return min(positive) / 4, max(positive) * 4


def plot_roofline(path: str | Path, *, profile: HardwareProfile, precision: str, points: list[dict],
                  step: dict, title: str, measured: list[dict] | None = None) -> Path:
    """Write the roofline plot to ``path`` (its suffix names the format) and return it
    (arguments: :func:`roofline_figure`).

    Raises:
        UserError: a suffix matplotlib has no format for, or the file cannot be written.
    """
    from fastgraph.core.figures import save_figure

    fig = roofline_figure(profile=profile, precision=precision, points=points, step=step, title=title,
                          measured=measured)
    return save_figure(fig, path, "the roofline plot")


def roofline_figure(*, profile: HardwareProfile, precision: str, points: list[dict], step: dict, title: str,
                    measured: list[dict] | None = None):
    """The roofline as a matplotlib ``Figure`` on an Agg canvas (11 x 7 inches, 110 dpi).

    Args:
        profile, precision: the ceilings; ``precision`` is drawn solid.
        points: per node ``{"label", "arithmetic_intensity" (FLOPs/byte), "attainable_flops_per_second"}``
            (predicted: the point on the roofline at the node's intensity).
        step: the whole step, same keys (and ``achieved_flops_per_second`` when measured).
        measured: per node ``{"label", "arithmetic_intensity", "achieved_flops_per_second"}``
            from a profile; when given they are the labelled points and the predicted
            ones are drawn hollow for comparison.
            Nodes may carry ``roofline_seconds``/``measured_seconds``/``flops``: the
            :data:`LABELLED` costliest get a label.
        title: the plot title.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

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
    # Last: label extents are measured in display space, which the limits above define.
    _label_points(ax, sorted(labelled, key=_cost, reverse=True)[:LABELLED], y_key)
    return fig


def _cost(point: dict) -> float:
    """How much a node matters: its measured or roofline seconds, else its FLOPs."""
    for key in ("measured_seconds", "roofline_seconds", "flops"):
        if point.get(key) is not None:
            return point[key]
    return 0.0


# Label offsets from the point, in typographic points, tried in this order: right, then
# above and below at growing distance, then left.
_OFFSETS = [(6, 0)] + [(dx, s * dy) for dy in (10, 20, 30, 40, 55, 70) for s in (1, -1)
                       for dx in (6, -6)] + [(-6, 0)]


def _label_points(ax, points: list[dict], y_key: str) -> None:
    """Annotate ``points`` (most important first) where the label overlaps no label placed
    before it; a point with no free place among the offsets stays unlabelled."""
    renderer = ax.figure.canvas.get_renderer()
    placed = []
    for p in points:
        x, y = p["arithmetic_intensity"], p[y_key]
        for dx, dy in _OFFSETS:
            line = {"arrowstyle": "-", "color": "0.6", "linewidth": 0.4} if dy else None
            text = ax.annotate(p["label"], (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=6,
                               ha="left" if dx >= 0 else "right", va="center", arrowprops=line)
            box = text.get_window_extent(renderer).expanded(1.05, 1.1)
            if not any(box.overlaps(other) for other in placed):
                placed.append(box)
                break
            text.remove()


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width)
