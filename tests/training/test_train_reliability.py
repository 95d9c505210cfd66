"""Training reliability on the CPU with real data: resuming a stopped run gives bit-identical
weights, Ctrl-C writes a checkpoint and exits 130, a diverging loss stops with one line,
and a checkpoint is never resumed into a different training."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastgraph.core.errors import UserError
from fastgraph.training import checkpoint as ckpt
from fastgraph.training.loop import TrainOptions, train
from fastgraph.training.options import TrainingDiverged
from fastgraph.training.recipes import load_recipe
from support import cli_error, real_data_path, stop_at, write_model, write_recipe

TINY = (8, 16, 16, 32)  # widths: a few ms per step on a CPU
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


def options(tmp_path, directory, **kw):
    model, recipe = write_model(tmp_path, TINY), write_recipe(tmp_path, epochs=2, batch_size=64, ema=True,
                                                               cutout=8)
    base = dict(model_path=str(model), recipe=load_recipe(str(recipe)), subset=256, test_subset=100,
                data=str(real_data_path()), checkpoint_dir=str(tmp_path / directory))
    return TrainOptions(**{**base, **kw})


@pytest.mark.parametrize(("stop", "runs", "stopped_at"), [
    (dict(epoch=1), 1, 4), (dict(step=6), 1, 6), (dict(step=10), 2, 2),
], ids=["after-epoch-1", "mid-epoch-2", "inside-run-2"])
def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, cifar10, deterministic, stop,
                                                                    runs, stopped_at):
    # 4 steps per epoch, 2 epochs per run: stopping after epoch 1, after step 6 (2 steps
    # into epoch 2), or 2 steps into the second of two runs.
    whole = train(options(tmp_path, "whole", runs=runs))
    with pytest.raises(KeyboardInterrupt):
        train(options(tmp_path, "stopped", runs=runs), stop_at(**stop))
    stopped = ckpt.load_checkpoint(tmp_path / "stopped")
    assert stopped["step"] == stopped_at and stopped["run"] == runs - 1 and not stopped["finished_run"]
    resumed = train(options(tmp_path, "stopped", resume=True, runs=runs))

    a, b = ckpt.load_checkpoint(tmp_path / "whole"), ckpt.load_checkpoint(tmp_path / "stopped")
    assert a["step"] == b["step"] == 8 and a["finished_run"] and b["finished_run"]
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    assert len(resumed.runs) == runs
    for x, y in zip(whole.runs, resumed.runs, strict=True):
        assert x.tta_acc == y.tta_acc and x.seed == y.seed
        assert [e.train_loss for e in x.epochs] == pytest.approx([e.train_loss for e in y.epochs])


def test_resume_refuses_a_different_training(tmp_path, cifar10):
    with pytest.raises(KeyboardInterrupt):
        train(options(tmp_path, "ck"), stop_at(epoch=1))
    with pytest.raises(UserError, match=r"different training \(seed: 0 there\)"):
        train(options(tmp_path, "ck", resume=True, seed=5))
    with pytest.raises(UserError, match="pass --resume"):
        train(options(tmp_path, "ck"))
    with pytest.raises(UserError, match="no checkpoint to resume from"):
        train(options(tmp_path, "empty", resume=True))


def test_absurd_learning_rate_stops_with_epoch_and_step(tmp_path, cifar10, capsys):
    model = write_model(tmp_path, TINY)
    recipe = write_recipe(tmp_path, epochs=2, batch_size=64, lr=1e12)
    line = cli_error(capsys, "train", str(model), "--recipe", str(recipe), "--subset", "256",
                     "--test-subset", "100", "--data", str(real_data_path()))
    assert "training diverged: loss is" in line and "at epoch 1 step" in line, line
    with pytest.raises(TrainingDiverged, match=r"(nan|inf) at epoch 1 step \d+ \(step \d+ of the run\)"):
        train(TrainOptions(model_path=str(model), recipe=load_recipe(str(recipe)), subset=256,
                           test_subset=100, data=str(real_data_path())))


def test_ctrl_c_writes_a_checkpoint_and_exits_130_then_resume_finishes(tmp_path, cifar10):
    model = write_model(tmp_path, TINY)
    recipe = write_recipe(tmp_path, epochs=10, batch_size=64)
    directory = tmp_path / "ck"
    argv = ["train", str(model), "--recipe", str(recipe), "--subset", "256", "--test-subset", "100",
            "--data", str(real_data_path()), "--checkpoint", str(directory)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fastgraph", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not ckpt.checkpoint_path(directory).exists():  # training is under way after epoch 1
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint after 120 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert err.strip().splitlines()[-1] == "fastgraph: interrupted"
    assert "checkpoint written to" in out and "--resume" in out
    state = ckpt.load_checkpoint(directory)
    assert 4 <= state["step"] < 40 and not state["finished_run"]

    from fastgraph.cli.main import main

    assert main([*argv, "--resume", "--no-progress-eval"]) == 0  # evaluating less changes no weights
    final = ckpt.load_checkpoint(directory)
    assert final["finished_run"] and final["step"] == 40
    assert len(final["completed"]) == 1
