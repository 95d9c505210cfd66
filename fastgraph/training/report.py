"""The people's side of training reports: a per-epoch table with a progress bar, and a summary.

:class:`RichReporter` implements :class:`fastgraph.training.loop.Reporter` with ``rich``: while
an epoch trains a transient progress bar shows its steps; when it ends one row is
printed (epoch, lr, train loss, train accuracy, test accuracy, TTA accuracy, counted
seconds of the epoch and of the run so far). :func:`print_summary` prints the
mean +/- std (min, max) over runs. The JSON record is ``TrainResult.to_dict()``: the
same data.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fastgraph.core.console import claim_terminal
from fastgraph.training.recipes import Recipe
from fastgraph.training.records import EpochRecord, Reporter, RunRecord, TrainResult

COLUMNS = ("epoch", "lr", "train loss", "train acc", "test acc", "TTA acc", "epoch s", "run s")
WIDTHS = (6, 9, 10, 9, 8, 8, 8, 8)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _row(values) -> str:
    return "  ".join(str(v).rjust(w) for v, w in zip(values, WIDTHS, strict=True))


class RichReporter(Reporter):
    """Reporter printing to a ``rich`` console (stdout by default); use as a context manager."""

    def __init__(self, recipe: Recipe, console: Console | None = None):
        self.recipe = recipe
        self.console = console or Console()
        self.progress = Progress(TextColumn("[dim]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=self.console, transient=True)
        self._task = None
        self._claim = None

    def __enter__(self):
        self._claim = claim_terminal()
        if self._claim.__enter__():  # the outermost live display: draw the epoch bar
            self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()
        self._claim.__exit__(*exc)
        return False

    def run_start(self, run, runs, seed, steps, epochs):
        self.console.print(f"[bold]{self.recipe.name}[/]: {self.recipe.title}")
        self.console.print(f"run {run + 1}/{runs} (seed {seed}): {epochs} epochs, {steps} steps")
        self.console.print(_row(COLUMNS), style="bold")

    def step(self, run, step_in_epoch, steps_in_epoch):
        if self._task is None:
            self._task = self.progress.add_task("training", total=steps_in_epoch,
                                                completed=step_in_epoch - 1)
        self.progress.update(self._task, completed=step_in_epoch)

    def epoch_end(self, run, record: EpochRecord):
        if self._task is not None:
            self.progress.remove_task(self._task)
            self._task = None
        self.console.print(_row((f"{record.epoch:g}", f"{record.lr:.4g}", f"{record.train_loss:.4f}",
                                 f"{100 * record.train_acc:.2f}", _percent(record.test_acc),
                                 _percent(record.tta_acc), f"{record.seconds:.2f}",
                                 f"{record.elapsed:.2f}")))

    def run_end(self, run, record: RunRecord):
        self.console.print(f"run {run + 1}: TTA accuracy {100 * record.tta_acc:.2f}%, plain "
                           f"{100 * record.test_acc:.2f}%, {record.seconds:.2f} s counted "
                           "(the recipe's passes, training, final TTA eval)")

    def message(self, text):
        self.console.print(text)


def print_summary(result: TrainResult, console: Console | None = None) -> None:
    """Mean +/- std, min and max over runs of TTA and plain accuracy and counted seconds."""
    console = console or Console()
    for line in result.summary_lines():
        console.print(line)
