"""What a training reports: per-epoch and per-run records, the result of all runs (JSON
via :meth:`TrainResult.to_dict`), and the :class:`Reporter` callbacks that show progress."""

from __future__ import annotations

import io
import statistics
from dataclasses import asdict, dataclass, field

from torch import nn

from fastgraph.training.options import TIMING_RULE


@dataclass
class EpochRecord:
    """One epoch of one run. Accuracies are fractions; seconds are counted seconds.

    epoch: epochs completed (the last may be fractional). step: training steps done.
    lr: the learning rate of the last step (recipe's base group). train_loss, train_acc:
    means over the epoch's augmented batches. test_acc: plain. tta_acc: with TTA (both
    None for an epoch not evaluated).
    seconds: counted seconds of this epoch's training. elapsed: counted seconds of the
    run through this epoch's training (passes included). tta_seconds: this epoch's TTA
    evaluation. time_to_here: elapsed + tta_seconds (the time to this epoch's accuracy).
    """

    epoch: float
    step: int
    lr: float
    train_loss: float
    train_acc: float
    test_acc: float | None
    tta_acc: float | None
    seconds: float
    elapsed: float
    tta_seconds: float

    @property
    def time_to_here(self) -> float:
        """Counted seconds to this epoch's accuracy: ``elapsed + tta_seconds``."""
        return self.elapsed + self.tta_seconds


@dataclass
class RunRecord:
    """One run: its epochs, final accuracies (fractions), counted seconds, phases
    (``Timer.as_dict``) and graphs ``torch.compile`` compiled per phase (``Timer.compiles``:
    the warm-up's only when the warm-up covered the timed work)."""

    run: int
    seed: int
    epochs: list[EpochRecord]
    test_acc: float
    tta_acc: float
    seconds: float
    phases: dict = field(default_factory=dict)
    passes: dict = field(default_factory=dict)
    compiles: dict = field(default_factory=dict)

    @staticmethod
    def from_dict(d: dict) -> RunRecord:
        """A RunRecord from its ``dataclasses.asdict`` form (as checkpoints and JSON records hold it)."""
        return RunRecord(**{**d, "epochs": [EpochRecord(**e) for e in d["epochs"]]})


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


@dataclass
class TrainResult:
    """All runs of a training, and what they were run with.

    ``model`` is the evaluated module (the EMA average where the recipe evaluates it) of
    the last run; it is not part of :meth:`to_dict`.
    """

    recipe: dict
    hyperparameters: dict
    settings: dict
    runs: list[RunRecord]
    timing_method: str
    target: float | None = None
    setup: dict = field(default_factory=dict)
    model: nn.Module | None = None

    def target_reached(self) -> dict | None:
        """First epoch where the TTA accuracy averaged over runs reaches ``target``.

        Returns ``{"target", "reached", "epoch", "mean_tta_acc", "seconds"}`` where seconds
        is the mean over runs of the counted time to that epoch; None without a target.
        """
        if self.target is None or not self.runs:
            return None
        n_epochs = min(len(r.epochs) for r in self.runs)
        for i in range(n_epochs):
            if any(r.epochs[i].tta_acc is None for r in self.runs):
                continue
            mean_acc = statistics.fmean(r.epochs[i].tta_acc for r in self.runs)
            if mean_acc >= self.target:
                return {"target": self.target, "reached": True, "epoch": self.runs[0].epochs[i].epoch,
                        "mean_tta_acc": mean_acc,
                        "seconds": statistics.fmean(r.epochs[i].time_to_here for r in self.runs)}
        return {"target": self.target, "reached": False, "epoch": None, "mean_tta_acc": None, "seconds": None}

    def summary(self) -> dict:
        """Mean, std (n - 1), min, max over runs of TTA and plain accuracy and counted seconds."""
        if not self.runs:
            return {}
        return {"tta_acc": _stats([r.tta_acc for r in self.runs]),
                "test_acc": _stats([r.test_acc for r in self.runs]),
                "seconds": _stats([r.seconds for r in self.runs]),
                "target": self.target_reached()}

    def summary_lines(self) -> list:
        """What ``fastgraph train`` prints at the end, as rich renderables: the table of mean +/- std,
        min and max over runs, and the line on the target when one was set (empty without runs)."""
        from rich.table import Table

        summary = self.summary()
        if not summary:
            return []
        table = Table(title=f"{self.recipe['recipe']['name']}: {len(self.runs)} run(s), "
                            f"timing by {self.timing_method}")
        for col in ("metric", "mean", "std", "min", "max"):
            table.add_column(col, justify="right" if col != "metric" else "left")
        for key, label, scale, fmt in (("tta_acc", "TTA accuracy %", 100, ".2f"),
                                       ("test_acc", "test accuracy %", 100, ".2f"),
                                       ("seconds", "counted seconds", 1, ".3f")):
            s = summary[key]
            table.add_row(label, *(format(scale * s[k], fmt) for k in ("mean", "std", "min", "max")))
        lines = [table]
        target = summary.get("target")
        if target and target["reached"]:
            lines.append(f"mean TTA accuracy reached {100 * target['target']:.2f}% at epoch "
                         f"{target['epoch']:g} ({100 * target['mean_tta_acc']:.2f}%) in "
                         f"{target['seconds']:.3f} s (mean counted time to that epoch)")
        elif target:
            lines.append(f"mean TTA accuracy never reached {100 * target['target']:.2f}%")
        return lines

    def __rich__(self):
        """The summary ``fastgraph train`` prints (:meth:`summary_lines`)."""
        from rich.console import Group

        return Group(*self.summary_lines())

    def __str__(self) -> str:
        from rich.console import Console

        console = Console(width=80, record=True, file=io.StringIO())
        console.print(self)
        return console.export_text().rstrip()

    def to_dict(self) -> dict:
        """JSON-ready record: recipe, hyperparameters, settings, timing method and rule, summary, runs."""
        return {"recipe": self.recipe, "hyperparameters": self.hyperparameters, "settings": self.settings,
                "timing_method": self.timing_method, "timing_rule": TIMING_RULE, "setup": self.setup,
                "summary": self.summary(), "runs": [asdict(r) for r in self.runs]}


class Reporter:
    """Progress callbacks of :func:`fastgraph.training.loop.train`; the base class reports nothing.

    A callback may raise ``KeyboardInterrupt`` to stop the training as Ctrl-C would (a
    checkpoint is written first when checkpointing).
    """

    def run_start(self, run: int, runs: int, seed: int, steps: int, epochs: int) -> None: ...
    def step(self, run: int, step_in_epoch: int, steps_in_epoch: int) -> None: ...
    def epoch_end(self, run: int, record: EpochRecord) -> None: ...
    def run_end(self, run: int, record: RunRecord) -> None: ...
    def message(self, text: str) -> None: ...
