"""TensorBoard logs of a training, and a reporter that passes the trainer's callbacks to several.

:class:`TensorBoardReporter` implements :class:`fastgraph.training.loop.Reporter` with
``torch.utils.tensorboard.SummaryWriter`` (the optional extra ``tensorboard``:
``pip install 'fastgraph[tensorboard]'``). Each run writes to its own folder
``DIR/run-<k>`` (k from 1), so TensorBoard draws the runs as separate lines and its
HPARAMS tab has one row per run. Per epoch, at the global step = training steps done
in the run (TensorBoard's steps are integers; a last, partial epoch is a fraction of
an epoch), it logs:

- ``loss/train`` (mean over the epoch's augmented batches), ``accuracy/train``,
  ``accuracy/test`` (plain), ``accuracy/tta`` (fractions; the test accuracies only on
  evaluated epochs, i.e. every epoch unless ``--no-progress-eval``),
- ``lr`` (the recipe's base group, last step of the epoch), ``epoch`` (epochs completed),
- ``time/epoch_seconds`` (counted seconds of the epoch's training), ``time/elapsed_seconds``
  (counted seconds of the run so far) and ``time/tta_eval_seconds``.

The per-step callback carries no loss (the trainer sums it on the device without
synchronising), so nothing is logged per step. When the training ends,
:meth:`TensorBoardReporter.finish` writes each run's hyperparameters (recipe, model,
epochs, batch size, precision, seed, device, the optimiser's lr, momentum and weight
decay in PyTorch's units...) with its final metrics ``hparam/tta_acc``,
``hparam/test_acc`` and ``hparam/seconds`` (counted) through ``SummaryWriter.add_hparams``,
in the run's own folder.

:class:`Reporters` sends each callback to a list of reporters in order (the CLI's table
and TensorBoard).
"""

from __future__ import annotations

from pathlib import Path

from fastgraph.core.errors import UserError
from fastgraph.training.records import EpochRecord, Reporter, RunRecord, TrainResult

EXTRA = "pip install 'fastgraph[tensorboard]'"


def summary_writer_class():
    """``torch.utils.tensorboard.SummaryWriter``, imported (about a second: check before training).

    Raises:
        UserError: the ``tensorboard`` package is missing (one line naming the extra).
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(f"--tensorboard needs the tensorboard package: {EXTRA}") from None
    return SummaryWriter


class Reporters(Reporter):
    """Fan-out: each callback goes to every reporter of ``reporters``, in order.

    An exception (a reporter's ``KeyboardInterrupt`` stops the training) propagates at
    once; the reporters after the one that raised do not see that callback.
    """

    def __init__(self, *reporters: Reporter):
        self.reporters = reporters

    def run_start(self, run, runs, seed, steps, epochs):
        for r in self.reporters:
            r.run_start(run, runs, seed, steps, epochs)

    def step(self, run, step_in_epoch, steps_in_epoch):
        for r in self.reporters:
            r.step(run, step_in_epoch, steps_in_epoch)

    def epoch_end(self, run, record: EpochRecord):
        for r in self.reporters:
            r.epoch_end(run, record)

    def run_end(self, run, record: RunRecord):
        for r in self.reporters:
            r.run_end(run, record)

    def message(self, text):
        for r in self.reporters:
            r.message(text)


def run_folder(log_dir: str | Path, run: int) -> Path:
    """The folder of run ``run`` (0-based) in ``log_dir``: ``log_dir/run-<run + 1>``."""
    return Path(log_dir).expanduser() / f"run-{run + 1}"


class TensorBoardReporter(Reporter):
    """Reporter writing TensorBoard event files under ``log_dir`` (see the module docstring).

    Use as a context manager (the writers are closed, and what was logged flushed, on
    exit, also when the training is interrupted), and call :meth:`finish` with the
    result for the hyperparameters. Event files are flushed at every epoch's end, so a
    TensorBoard watching ``log_dir`` shows the training as it goes.

    Args:
        log_dir: the folder (created when the first run starts).
        resume: the training continues a checkpointed one: its runs' folders may hold
            events already, and the resumed epochs are appended to them.

    Raises:
        UserError: the ``tensorboard`` package is missing, or (without ``resume``) a run
            folder in ``log_dir`` already holds events of another training: TensorBoard
            would mix the two.
    """

    def __init__(self, log_dir: str | Path, *, resume: bool = False):
        self.writer_class = summary_writer_class()
        self.log_dir = Path(log_dir).expanduser()
        if not resume and self.log_dir.is_dir():
            used = sorted(p.parent.name for p in self.log_dir.glob("run-*/events.out.tfevents.*"))
            if used:
                raise UserError(f"--tensorboard {self.log_dir}: {used[0]} already holds the events of a "
                                "training; give an empty or new folder (or --resume to continue that one)")
        self._writers: dict = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def _writer(self, run: int):
        if run not in self._writers:
            self._writers[run] = self.writer_class(log_dir=str(run_folder(self.log_dir, run)))
        return self._writers[run]

    def run_start(self, run, runs, seed, steps, epochs):
        self._writer(run)

    def epoch_end(self, run, record: EpochRecord):
        w, step = self._writer(run), record.step
        scalars = {"loss/train": record.train_loss, "accuracy/train": record.train_acc,
                   "accuracy/test": record.test_acc, "accuracy/tta": record.tta_acc, "lr": record.lr,
                   "epoch": record.epoch, "time/epoch_seconds": record.seconds,
                   "time/elapsed_seconds": record.elapsed, "time/tta_eval_seconds": record.tta_seconds}
        for tag, value in scalars.items():
            if value is not None:  # accuracies of an epoch not evaluated
                w.add_scalar(tag, value, step)
        w.flush()

    def run_end(self, run, record: RunRecord):
        self._writer(run).flush()

    def finish(self, result: TrainResult) -> None:
        """Write every run's hyperparameters and final metrics (``hparam/tta_acc``,
        ``hparam/test_acc`` fractions, ``hparam/seconds`` counted) to its folder, then close.

        Hyperparameters: the training's settings (recipe name, model file name, epochs,
        batch size, precision, device, compile, subsets...; options not given are left
        out), the run's seed, and the optimiser's in PyTorch's units (lr, momentum,
        nesterov, weight_decay).
        """
        settings = {k: v for k, v in result.settings.items() if k not in ("runs", "seed", "target")}
        settings["model"] = Path(settings["model"]).name
        for run in result.runs:
            hparams = {**settings, **result.hyperparameters, "seed": run.seed}
            hparams = {k: v for k, v in hparams.items() if isinstance(v, bool | int | float | str)}
            metrics = {"hparam/tta_acc": run.tta_acc, "hparam/test_acc": run.test_acc,
                       "hparam/seconds": run.seconds}
            step = run.epochs[-1].step if run.epochs else None
            # run_name "." writes into the run's own folder, beside its scalars (not a
            # timestamped subfolder), so TensorBoard shows one run with both.
            self._writer(run.run).add_hparams(hparams, metrics, run_name=".", global_step=step)
        self.close()

    def close(self) -> None:
        """Flush and close every open writer."""
        for w in self._writers.values():
            w.close()
        self._writers.clear()
