"""`fastgraph train --nproc N` errors: a bad FASTGRAPH_DIST_TIMEOUT is one line before any
process starts (and in a process torchrun started); a failed process is reported without
pointing at a --checkpoint folder the training was not given."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fastgraph.core.errors import UserError
from fastgraph.training import distributed as dp
from support import REPO, write_model, write_recipe


def _env(**extra) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)


def test_a_bad_timeout_is_one_line_before_any_process_starts(tmp_path):
    model, recipe = write_model(tmp_path), write_recipe(tmp_path)
    done = subprocess.run([sys.executable, "-m", "fastgraph", "train", str(model), "--recipe", str(recipe),
                           "--device", "cpu", "--nproc", "2"], env=_env(FASTGRAPH_DIST_TIMEOUT="abc"),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines() == [
        "fastgraph: error: FASTGRAPH_DIST_TIMEOUT must be a number of seconds > 0, got 'abc'"]


@pytest.mark.parametrize("value", ["-5", "0", "nan", "inf", "1e300"])
def test_the_timeout_is_a_number_of_seconds_above_zero(monkeypatch, value):
    monkeypatch.setenv("FASTGRAPH_DIST_TIMEOUT", value)
    with pytest.raises(UserError, match=f"must be a number of seconds > 0, got '{value}'"):
        dp.timeout_seconds()


def test_a_process_torchrun_started_checks_the_timeout_too(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("FASTGRAPH_DIST_TIMEOUT", "abc")
    with pytest.raises(UserError, match="FASTGRAPH_DIST_TIMEOUT must be a number of seconds > 0, got 'abc'"):
        dp.initialise(torch.device("cpu"))
    monkeypatch.setenv("FASTGRAPH_DIST_TIMEOUT", "2.5")
    assert dp.timeout_seconds() == 2.5
    monkeypatch.delenv("FASTGRAPH_DIST_TIMEOUT")
    assert dp.timeout_seconds() == dp.DEFAULT_TIMEOUT_S


# Rank 1 dies as it loads the model file (SIGKILL: no error of its own to print).
_DIES_ON_RANK_1 = """
import os, signal
if os.environ.get("RANK") == "1":
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_failed_process_without_a_checkpoint_folder_says_nothing_of_one(tmp_path):
    model, recipe = write_model(tmp_path, widths=(8, 16, 32, 64)), write_recipe(tmp_path)
    model.write_text(_DIES_ON_RANK_1 + model.read_text())
    done = subprocess.run([sys.executable, "-m", "fastgraph", "train", str(model), "--recipe", str(recipe),
                           "--device", "cpu", "--nproc", "2"], env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("fastgraph: error:")]
    assert errors[-1] == "fastgraph: error: process 1 of 2 failed (SIGKILL); the others were stopped.", errors


def test_the_checkpoint_option_is_found_in_each_spelling():
    assert dp.checkpoint_given(["train", "m.py", "--checkpoint", "ckpt"])
    assert dp.checkpoint_given(["train", "m.py", "--checkpoint=ckpt", "--resume"])
    assert dp.checkpoint_given(["train", "m.py", "--check", "ckpt"])  # argparse takes the abbreviation
    assert not dp.checkpoint_given(["train", "m.py", "--compile", "--json", "checkpoint.json"])


# Rank 1 alone refuses its model file (as a rank whose GPU is missing refuses to start).
_REFUSED_ON_RANK_1 = """
import os
if os.environ.get("RANK") == "1":
    raise RuntimeError("no model for rank 1")
"""


def test_an_error_of_every_process_or_of_one_is_one_line(tmp_path):
    """Every rank meets a batch that does not split over 3 processes: the error is said once,
    without torchrun's own log lines; an error of rank 1 alone is said once, naming it."""
    model, recipe = write_model(tmp_path, widths=(8, 16, 32, 64)), write_recipe(tmp_path)
    every = subprocess.run([sys.executable, "-m", "fastgraph", "train", str(model), "--recipe", str(recipe),
                            "--device", "cpu", "--nproc", "3"], env=_env(), capture_output=True, text=True,
                           timeout=120)
    assert every.returncode == 2, every.stderr[-3000:]
    assert every.stderr.strip().splitlines() == [
        "fastgraph: error: the global batch of 128 does not split over 3 processes: choose a batch size "
        "that is a multiple of the process count"]
    model.write_text(_REFUSED_ON_RANK_1 + model.read_text())
    one = subprocess.run([sys.executable, "-m", "fastgraph", "train", str(model), "--recipe", str(recipe),
                          "--device", "cpu", "--nproc", "2"], env=_env(), capture_output=True, text=True,
                         timeout=120)
    assert one.returncode == 2, one.stderr[-3000:]
    lines = one.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastgraph: error: process 1 of 2: "), one.stderr[-3000:]
    assert "RuntimeError: no model for rank 1" in lines[0]
