"""What a resumed training reports, on the CPU with real data: the counted seconds of a
stopped epoch are kept, the recipe's passes are counted once, the phases cover the whole
run, and a checkpoint of another recipe is refused naming the value that differs."""

from __future__ import annotations

import pytest

from fastgraph.core.errors import UserError
from fastgraph.training import checkpoint as ckpt
from fastgraph.training.loop import TrainOptions, train
from fastgraph.training.recipes import load_recipe
from support import real_data_path, stop_at, write_model, write_recipe

TINY = (8, 16, 16, 32)  # widths: a few ms per step on a CPU
pytestmark = pytest.mark.usefixtures("one_thread")


def options(tmp_path, directory, lr=0.4, **kw):
    model = write_model(tmp_path, TINY)
    recipe = write_recipe(tmp_path, epochs=2, batch_size=64, lr=lr, ema=True)
    base = dict(model_path=str(model), recipe=load_recipe(str(recipe)), subset=256, test_subset=100,
                data=str(real_data_path()), checkpoint_dir=str(tmp_path / directory))
    return TrainOptions(**{**base, **kw})


def test_checkpoint_written_mid_epoch_keeps_that_epochs_counted_seconds(tmp_path, cifar10):
    # 4 steps per epoch: stopped 2 steps into epoch 2, whose training time so far is counted
    with pytest.raises(KeyboardInterrupt):
        train(options(tmp_path, "ck"), stop_at(step=6))
    state = ckpt.load_checkpoint(tmp_path / "ck")
    assert (state["epoch"], state["step_in_epoch"]) == (1, 2)
    assert state["epoch_seconds"] > 0
    assert state["counted_seconds"] == pytest.approx(state["epochs"][-1]["elapsed"] + state["epoch_seconds"])

    result = train(options(tmp_path, "ck", resume=True))
    run = result.runs[0]
    assert run.phases["phases"]["train"]["calls"] == 3  # epoch 1, epoch 2 before and after the stop
    assert run.phases["counted_seconds"] == pytest.approx(run.seconds)


def test_resumed_run_counts_the_passes_once_and_reports_all_its_phases(tmp_path, cifar10):
    with pytest.raises(KeyboardInterrupt):
        train(options(tmp_path, "ck"), stop_at(epoch=1))
    run = train(options(tmp_path, "ck", resume=True)).runs[0]
    phases = run.phases["phases"]
    assert phases["passes"]["calls"] == 1 and phases["train"]["calls"] == 2
    assert run.phases["counted_seconds"] == pytest.approx(run.seconds)
    # counted until the last epoch's evaluation: the passes, then each epoch's training
    last = run.epochs[-1]
    assert last.elapsed == pytest.approx(phases["passes"]["seconds"] + sum(e.seconds for e in run.epochs))
    assert run.seconds == pytest.approx(last.elapsed + phases["tta eval"]["seconds"])


def test_resume_with_another_recipe_names_the_value_that_differs(tmp_path, cifar10):
    with pytest.raises(KeyboardInterrupt):
        train(options(tmp_path, "ck"), stop_at(epoch=1))
    with pytest.raises(UserError, match=r"different training \(recipe optimizer\.lr: 0\.4 there\)"):
        train(options(tmp_path, "ck", lr=0.3, resume=True))
