"""Accuracy curves of a training: plain and TTA test accuracy against counted seconds and
against epochs, one line per run and the mean +/- std over runs, as a PNG.

Drawn with matplotlib's object API on the Agg canvas (no pyplot state, no display), from
a :class:`fastgraph.training.loop.TrainResult` or its JSON record (``to_dict()``, as
``fastgraph train --json`` writes it). Two panels share the accuracy axis:

- left, accuracy against the counted time to that accuracy, ``EpochRecord.time_to_here``
  (the run's counted seconds through the epoch's training plus that epoch's TTA
  evaluation, as if the run had stopped there: the time ``--target`` reports);
- right, accuracy against epochs completed.

Each run is a thin line; with two runs or more the mean over runs is a thick line inside
a band of +/- one standard deviation (n - 1), at the runs' mean counted time on the left
(accuracy is a distribution: one run's std is ~0.15% on CIFAR-10, so claims give n runs,
mean +/- std). ``--target`` adds a horizontal line at the target accuracy and a star
where the mean TTA accuracy first reaches it. A training with progress evaluation off
has accuracies after its last epoch only: there are no curves to draw, and
:func:`curves_figure` says so in one line.
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

from fastgraph.core.errors import UserError
from fastgraph.core.figures import save_figure
from fastgraph.training.records import RunRecord, TrainResult

NO_PROGRESS_EVAL = ("the accuracy curves need the accuracy of every epoch, and this training evaluated "
                    "after its last epoch only: drop --no-progress-eval")
TTA_COLOR, PLAIN_COLOR, TARGET_COLOR = "tab:blue", "tab:orange", "tab:red"


def plot_curves(result: TrainResult | dict, path: str | Path, *, device: str | None = None) -> Path:
    """Write the accuracy curves of ``result`` to ``path`` (PNG, or another matplotlib
    format by suffix) and return the path; arguments as :func:`curves_figure`.

    Raises:
        UserError: no per-epoch accuracies (progress evaluation off), no runs, or the
            file cannot be written.
    """
    return save_figure(curves_figure(result, device=device), path, "the accuracy plot")


def _runs(record: dict) -> list[RunRecord]:
    runs = [RunRecord.from_dict(r) for r in record["runs"]]
    if not runs:
        raise UserError("the training has no finished run: no accuracy curves to draw")
    n = min(len(r.epochs) for r in runs)
    if any(e.tta_acc is None for r in runs for e in r.epochs[:n]):
        raise UserError(NO_PROGRESS_EVAL)
    return [dataclasses.replace(r, epochs=r.epochs[:n]) for r in runs]


def curves_figure(result: TrainResult | dict, *, device: str | None = None):
    """The accuracy curves as a matplotlib ``Figure`` on an Agg canvas (12 x 5.2 inches, 110 dpi).

    Args:
        result: a ``TrainResult`` or its ``to_dict()`` record (the ``--json`` file,
            read back). Runs are compared epoch by epoch over the epochs they all have.
        device: the device's name for the title (e.g. ``"NVIDIA H100 80GB HBM3"``);
            default the record's ``device``, else its settings' device string.

    Returns:
        The figure: ``axes[0]`` accuracy (%) against counted seconds, ``axes[1]`` against
        epochs. Artists carry a gid: ``"<metric> run <k>"`` (k from 1), ``"<metric> mean"``,
        ``"<metric> band"`` (metric ``tta`` or ``plain``; ``plain`` only when the recipe
        evaluates with TTA), ``"target"`` and ``"target reached"``.

    Raises:
        UserError: a run lacks per-epoch accuracies (``--no-progress-eval``), or there is no run.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    record = result.to_dict() if isinstance(result, TrainResult) else result
    runs = _runs(record)
    settings, recipe = record["settings"], record["recipe"]
    tta = bool(recipe.get("eval", {}).get("tta_level", 1))
    metrics = [("tta", "TTA accuracy" if tta else "accuracy (no TTA)", TTA_COLOR, "-", "tta_acc")]
    if tta:  # dashed: what TTA improves on
        metrics.append(("plain", "plain accuracy", PLAIN_COLOR, "--", "test_acc"))
    axes_x = [("seconds", "counted seconds to the epoch's accuracy (s)"), ("epoch", "epochs")]

    fig = Figure(figsize=(12, 5.2), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, (x_kind, x_label) in zip(axes, axes_x, strict=True):
        for gid, label, color, style, key in metrics:
            _draw_metric(ax, runs, x_kind, gid, label, (color, style), key)
        ax.set_xlabel(x_label)
        ax.grid(True, linewidth=0.4, color="0.85")
        ax.set_xlim(left=0)
    axes[0].set_ylabel("test accuracy (%)")
    _draw_target(axes, record)

    name = recipe.get("recipe", {}).get("name", settings.get("recipe", "?"))
    title = recipe.get("recipe", {}).get("title", "")
    where = device or record.get("device") or settings.get("device", "?")
    n = len(runs)
    fig.suptitle(f"{name}{': ' + title if title else ''}\n{Path(settings['model']).name} on {where}, "
                 f"{settings.get('precision', '?')}, batch {settings.get('batch_size', '?')}, "
                 f"{n} run{'s' if n > 1 else ''}" + (", mean ± 1 std over runs" if n > 1 else ""),
                 fontsize=10)
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 4), fontsize=8,
               frameon=False)
    return fig


def _x(record, kind: str) -> float:
    return record.time_to_here if kind == "seconds" else record.epoch


def _draw_metric(ax, runs: list[RunRecord], x_kind: str, gid: str, label: str, look: tuple[str, str],
                 key: str) -> None:
    """One thin line per run; with two runs or more, their mean and a +/- 1 std band.

    ``look``: (colour, line style).
    """
    color, style = look
    one = len(runs) == 1  # then the run's line is all there is: drawn as a mean would be
    for k, run in enumerate(runs, start=1):
        ax.plot([_x(e, x_kind) for e in run.epochs], [100 * getattr(e, key) for e in run.epochs],
                color=color, linestyle=style, linewidth=1.8 if one else 0.9, alpha=1.0 if one else 0.5,
                marker="o", markersize=2.5, gid=f"{gid} run {k}",
                label=label if one else f"{label}, each run" if k == 1 else None)
    if len(runs) < 2:
        return
    epochs = range(len(runs[0].epochs))
    xs = [statistics.fmean(_x(r.epochs[i], x_kind) for r in runs) for i in epochs]
    values = [[100 * getattr(r.epochs[i], key) for r in runs] for i in epochs]
    mean = [statistics.fmean(v) for v in values]
    std = [statistics.stdev(v) for v in values]
    ax.fill_between(xs, [m - s for m, s in zip(mean, std, strict=True)],
                    [m + s for m, s in zip(mean, std, strict=True)], color=color, alpha=0.15, linewidth=0,
                    gid=f"{gid} band", label=f"{label}, ± 1 std")
    ax.plot(xs, mean, color=color, linestyle=style, linewidth=2.2, gid=f"{gid} mean",
            label=f"{label}, mean of {len(runs)}")


def _draw_target(axes, record: dict) -> None:
    """The target accuracy as a horizontal line, and a star where the mean TTA accuracy reaches it."""
    target = record["settings"].get("target")
    if target is None:
        return
    reached = (record.get("summary") or {}).get("target") or {}
    for ax, x_key in zip(axes, ("seconds", "epoch"), strict=True):
        ax.axhline(100 * target, color=TARGET_COLOR, linestyle="--", linewidth=1.0, gid="target",
                   label=f"target {100 * target:.4g}%")
        if reached.get("reached"):
            ax.plot([reached[x_key]], [100 * reached["mean_tta_acc"]], marker="*", markersize=13,
                    color=TARGET_COLOR, markeredgecolor="black", linestyle="none", gid="target reached",
                    label=f"mean TTA first reaches the target: epoch {reached['epoch']:g}, "
                          f"{reached['seconds']:.3g} s")
