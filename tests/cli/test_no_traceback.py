"""No traceback, no lost file: every command checks its outputs, options, model file and
checkpoint before any slow work and says what is wrong in one line (exit 2); SIGTERM stops
training at a step boundary with a checkpoint (exit 143); an interrupted checkpoint write
leaves no temporary file behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from fastgraph.cli.main import main
from fastgraph.training import checkpoint as ckpt
from support import EXAMPLES, cli_error, real_data_path, write_model

MODEL = EXAMPLES / "resnet20.py"
TINY = (8, 16, 16, 32)  # widths: a few ms per training step on a CPU


def usage_error(capsys, *argv) -> str:
    """Run the CLI on options argparse refuses: exit 2 and one line on stderr; return it."""
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# A data path that does not exist: a check that ran after the data lookup would report it
# instead of the problem under test.
def _commands(no_data: str) -> dict[str, list[str]]:
    return {
        "optimize": ["optimize", str(MODEL), "--data", no_data],
        "train": ["train", str(MODEL), "--recipe", "resnet20_seed_baseline", "--data", no_data],
        "export": ["export", str(MODEL), "--data", no_data],
        "profile": ["profile", str(MODEL), "--data", no_data],
        "roofline": ["roofline", str(MODEL)],
    }


FILE_OUTPUTS = [("optimize", "--out"), ("optimize", "--json"), ("optimize", "--emit-code"),
                ("train", "--json"), ("export", "--out"), ("export", "--json"), ("profile", "--json"),
                ("roofline", "--out"), ("roofline", "--json")]


# ---------------------------------------------------------------------- outputs


@pytest.mark.parametrize("bad", ["a-folder", "missing-folder", "under-a-file"])
@pytest.mark.parametrize(("command", "option"), FILE_OUTPUTS, ids=[f"{c}{o}" for c, o in FILE_OUTPUTS])
def test_a_bad_output_path_is_one_line_before_any_work(tmp_path, capsys, monkeypatch, command, option, bad):
    monkeypatch.chdir(tmp_path)  # where default outputs (roofline.png, fastgraph-profile/) would go
    (tmp_path / "a-file").write_text("keep me")
    path = {"a-folder": tmp_path, "missing-folder": tmp_path / "no" / "such" / "x.json",
            "under-a-file": tmp_path / "a-file" / "x.json"}[bad]
    argv = _commands(str(tmp_path / "no-data"))[command]
    line = cli_error(capsys, *argv, option, str(path))
    assert option in line and str(path) in line, line
    assert "no-data" not in line, line  # refused before the data was looked for
    assert not (tmp_path / "no").exists()  # no folders made on a typo
    assert (tmp_path / "a-file").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # nothing written
    assert not tmp_path.with_name(tmp_path.name + ".png").exists()  # nor DIR.png beside the folder


@pytest.mark.parametrize("bad", ["a-file", "missing-folder"])
def test_profile_out_folder_is_checked_first(tmp_path, capsys, monkeypatch, bad):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("keep me")
    path = tmp_path / "a-file" if bad == "a-file" else tmp_path / "no" / "profile"
    line = cli_error(capsys, *_commands(str(tmp_path / "no-data"))["profile"], "--out", str(path))
    assert "--out" in line and str(path) in line and "no-data" not in line, line
    assert (tmp_path / "a-file").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_one_line(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o555)
    argv = _commands(str(tmp_path / "no-data"))["optimize"]
    line = cli_error(capsys, *argv, "--json", str(folder / "r.json"))
    assert "--json" in line and "no-data" not in line, line


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs Linux sysfs, where nobody creates files")
def test_a_folder_nobody_may_write_is_one_line(tmp_path, capsys):
    argv = _commands(str(tmp_path / "no-data"))["optimize"]
    line = cli_error(capsys, *argv, "--json", "/sys/fastgraph-report.json")
    assert "cannot write --json /sys/fastgraph-report.json" in line and "no-data" not in line, line


def test_roofline_plot_needs_a_file_type_and_is_written_where_named(tmp_path, capsys):
    plain = tmp_path / "plot"
    line = cli_error(capsys, "roofline", str(MODEL), "--out", str(plain))
    assert "--out" in line and str(plain) in line, line
    assert list(tmp_path.iterdir()) == []  # not plot.png behind the user's back
    line = cli_error(capsys, "roofline", str(MODEL), "--out", str(tmp_path / "plot.xyz"))
    assert ".xyz" in line and "png" in line, line


def test_outputs_never_overwrite_an_input_or_each_other(tmp_path, capsys):
    model = write_model(tmp_path, TINY)
    source = model.read_text()
    argv = ["optimize", str(model), "--data", str(tmp_path / "no-data")]
    line = cli_error(capsys, *argv, "--emit-code", str(model))
    assert "--emit-code" in line and "model file" in line, line
    assert model.read_text() == source
    same = tmp_path / "report.json"
    line = cli_error(capsys, *argv, "--json", str(same), "--out", str(same))
    assert "--out" in line and "--json" in line and str(same) in line, line
    assert not same.exists()


DATA_COMMANDS = ["train", "optimize", "advise", "profile", "export"]


@pytest.mark.parametrize("command", DATA_COMMANDS)
def test_an_output_never_overwrites_the_data_found_through_fastgraph_data(tmp_path, capsys, monkeypatch,
                                                                          command):
    data = tmp_path / "cifar10-jpeg.tar.xz"  # refused before it is read: its contents do not matter
    data.write_bytes(b"the only copy")
    monkeypatch.setenv("FASTGRAPH_DATA", str(data))
    monkeypatch.chdir(tmp_path)
    argv = {**_commands("unused"), "advise": ["advise", str(MODEL)]}[command]
    argv = argv[:argv.index("--data")] if "--data" in argv else argv  # the data comes from the variable
    line = cli_error(capsys, *argv, "--json", str(data))
    assert "--json" in line and "is the data" in line and str(data) in line, line
    assert data.read_bytes() == b"the only copy"


# ---------------------------------------------------------------------- options


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e400"])
def test_non_finite_epochs_and_target_are_usage_errors(capsys, value):
    line = usage_error(capsys, "train", str(MODEL), "--recipe", "resnet20_seed_baseline", f"--epochs={value}")
    assert "--epochs" in line and value in line, line
    line = usage_error(capsys, "train", str(MODEL), "--recipe", "resnet20_seed_baseline", f"--target={value}")
    assert "--target" in line and value in line, line


def test_non_finite_epochs_through_the_python_api(tmp_path):
    from fastgraph.core.errors import UserError
    from fastgraph.training.loop import TrainOptions, train
    from fastgraph.training.recipes import load_recipe

    for value in (float("inf"), float("nan")):
        with pytest.raises(UserError, match="--epochs must be a finite number > 0"):
            train(TrainOptions(model_path=str(MODEL), recipe=load_recipe("resnet20_seed_baseline"),
                               epochs=value, data=str(tmp_path / "no-data"), device="cpu"))


@pytest.mark.parametrize("seed", ["99999999999999999999", "18446744073709551616", "-1"])
def test_a_seed_torch_cannot_take_is_a_usage_error(tmp_path, capsys, seed):
    line = usage_error(capsys, *_commands(str(tmp_path / "no-data"))["train"], f"--seed={seed}")
    assert "--seed" in line and seed in line and "2**64 - 1" in line, line


def test_the_last_run_seed_must_fit_too(tmp_path, capsys):
    from fastgraph.cli.main import build_parser

    argv = _commands(str(tmp_path / "no-data"))["train"]
    assert build_parser().parse_args([*argv, "--seed", str(2**64 - 1)]).seed == 2**64 - 1
    line = cli_error(capsys, *argv, "--seed", str(2**64 - 1), "--runs", "2")
    assert "--seed" in line and "--runs 2" in line and str(2**64) in line, line
    assert "no-data" not in line, line


def test_export_weights_without_a_checkpoint_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for choice in ("ema", "trained"):
        line = cli_error(capsys, *_commands(str(tmp_path / "no-data"))["export"], "--weights", choice)
        assert f"--weights {choice}" in line and "--checkpoint" in line and "no-data" not in line, line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["engine.txt", "engine.ep", "engine"])
def test_export_out_must_have_the_format_suffix(tmp_path, capsys, name):
    out = tmp_path / name
    argv = _commands(str(tmp_path / "no-data"))["export"]
    line = cli_error(capsys, *argv, "--format", "onnx", "--out", str(out))
    assert "--out" in line and str(out) in line and ".onnx" in line and "no-data" not in line, line
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- model before data


@pytest.mark.parametrize("command", ["train", "export", "profile"])
def test_the_model_file_is_checked_before_the_data(tmp_path, capsys, command):
    argv = _commands(str(tmp_path / "no-data"))[command]
    missing = tmp_path / "none.py"
    argv[1] = str(missing)
    line = cli_error(capsys, *argv)
    assert "model file not found" in line and str(missing) in line, line


# ---------------------------------------------------------------------- checkpoints


def _saved_state(**changes) -> dict:
    """What `fastgraph train` writes into a checkpoint, with placeholder values of the right
    types, ``changes`` applied (None drops a key)."""
    state = {"format": ckpt.FORMAT, "settings": {}, "recipe": {"name": "x"}, "run": 0, "completed": [],
             "epoch": 0, "step_in_epoch": 0, "step": 0, "finished_run": False, "model": {"w": torch.zeros(1)},
             "optimizers": [], "ema": None, "scaler": None, "augment": {}, "rng": {}, "counted_seconds": 0.0,
             "epoch_seconds": 0.0, "partial": {}, "epochs": []}
    for key, value in changes.items():
        if value is None:
            state.pop(key)
        else:
            state[key] = value
    return state


@pytest.mark.parametrize(("contents", "expected"), [
    (_saved_state(recipe=None), "'recipe'"),
    (_saved_state(model=None, settings=None), "'model', 'settings'"),
    (_saved_state(model="weights"), "'model'"),
    ({"conv.weight": torch.zeros(2), "fc.bias": torch.zeros(2)}, "conv.weight"),
    ({"epoch": 3, "optimizer": {}}, "'format'"),
    ([torch.zeros(2)], "list"),
    (_saved_state(format=7), "format 7"),
], ids=["no-recipe", "no-model-no-settings", "model-not-a-dict", "plain-state-dict", "foreign-dict", "a-list",
        "future-format"])
def test_resume_from_a_malformed_checkpoint_is_one_line(tmp_path, capsys, contents, expected):
    folder = tmp_path / "ck"
    folder.mkdir()
    torch.save(contents, folder / ckpt.FILE_NAME)
    line = cli_error(capsys, *_commands(str(tmp_path / "no-data"))["train"], "--checkpoint", str(folder),
                     "--resume")
    assert str(folder / ckpt.FILE_NAME) in line and expected in line, line
    assert "no-data" not in line, line


@pytest.mark.parametrize(("contents", "expected"), [
    (_saved_state(recipe=None), "'recipe'"),
    (_saved_state(model=None), "'model'"),
    ({"format": ckpt.FORMAT, "epoch": 3}, "'model', 'recipe'"),
    ({"epoch": 3, "note": "hello"}, "'epoch'"),
], ids=["no-recipe", "no-model", "format-only", "unrelated-keys"])
def test_export_of_a_malformed_checkpoint_is_one_line_before_the_data(tmp_path, capsys, contents, expected):
    path = tmp_path / "weights.pt"
    torch.save(contents, path)
    line = cli_error(capsys, *_commands(str(tmp_path / "no-data"))["export"], "--checkpoint", str(path))
    assert str(path) in line and expected in line and "no-data" not in line, line


def test_resume_from_a_corrupt_checkpoint_names_the_file_and_no_unsafe_load(tmp_path, capsys):
    folder = tmp_path / "ck"
    folder.mkdir()
    (folder / ckpt.FILE_NAME).write_bytes(b"not a checkpoint" * 10)
    line = cli_error(capsys, *_commands(str(tmp_path / "no-data"))["train"], "--checkpoint", str(folder),
                     "--resume")
    assert f"{folder / ckpt.FILE_NAME} is not a readable fastgraph checkpoint" in line, line
    assert "weights_only" not in line and "no-data" not in line, line


def test_a_checkpoint_folder_needs_an_existing_parent_and_is_not_made_by_a_failed_run(tmp_path, capsys):
    argv = _commands(str(tmp_path / "no-data"))["train"]
    nested = tmp_path / "no" / "sub"
    line = cli_error(capsys, *argv, "--checkpoint", str(nested))
    assert "cannot write checkpoints" in line and f"{tmp_path / 'no'} does not exist" in line, line
    assert "no-data" not in line, line
    line = cli_error(capsys, *argv, "--checkpoint", str(tmp_path / "ck"))  # a new folder: fine until the data
    assert "no-data" in line, line
    assert list(tmp_path.iterdir()) == []  # neither folder made


class _Boom(Exception):
    pass


@pytest.mark.parametrize("error", [KeyboardInterrupt, _Boom, OSError])
def test_an_interrupted_checkpoint_write_leaves_no_temporary_file(tmp_path, monkeypatch, error):
    from fastgraph.core.errors import UserError

    folder = tmp_path / "ck"
    ckpt.save_checkpoint(folder, {"step": 1})

    def half_then_fail(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise error("disk gone" if error is OSError else None)

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(UserError if error is OSError else error):
        ckpt.save_checkpoint(folder, {"step": 2})
    assert sorted(p.name for p in folder.iterdir()) == [ckpt.FILE_NAME]
    monkeypatch.undo()
    assert torch.load(folder / ckpt.FILE_NAME, weights_only=True)["step"] == 1  # the last good one is there


def test_a_temporary_file_of_a_killed_writer_is_removed_by_the_next_save(tmp_path):
    folder = tmp_path / "ck"
    folder.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    orphan = folder / f".{ckpt.FILE_NAME}.{host}.{dead.pid}.tmp"
    orphan.write_bytes(b"torn")
    alive = folder / f".{ckpt.FILE_NAME}.{host}.{os.getppid()}.tmp"  # a live writer's file is left alone
    alive.write_bytes(b"being written")
    ckpt.save_checkpoint(folder, {"step": 1})
    assert sorted(p.name for p in folder.iterdir()) == sorted([ckpt.FILE_NAME, alive.name])


# ---------------------------------------------------------------------- SIGTERM

# Runs `fastgraph train` with a reporter that touches a marker file after every step, so the
# test knows when training is under way.
DRIVER = """
import sys
from pathlib import Path

from fastgraph.training import report as train_report
from fastgraph.cli.main import main

marker = Path(sys.argv[1])
step = train_report.RichReporter.step


def step_and_mark(self, run, step_in_epoch, steps_in_epoch):
    step(self, run, step_in_epoch, steps_in_epoch)
    marker.write_text(str(step_in_epoch))


train_report.RichReporter.step = step_and_mark
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.usefixtures("one_thread")
def test_sigterm_writes_a_checkpoint_and_exits_143_then_resume_finishes(tmp_path, cifar10):
    # A recipe without passes: 10 epochs of 4 steps of a narrow ResNet-9 on 256 real images.
    model = write_model(tmp_path, TINY)
    directory, marker = tmp_path / "ck", tmp_path / "stepped"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    argv = ["train", str(model), "--recipe", "resnet20_seed_baseline", "--epochs", "10", "--batch-size", "64",
            "--subset", "256", "--test-subset", "100", "--data", str(real_data_path()),
            "--checkpoint", str(directory)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(driver), str(marker), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    deadline = time.monotonic() + 180
    while not marker.exists():  # the first training step is done
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no training step after 180 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, (out, err)
    assert err.strip().splitlines()[-1] == "fastgraph: terminated"
    assert "checkpoint written to" in out and "--resume" in out
    state = ckpt.load_checkpoint(directory)
    assert 1 <= state["step"] < 40 and not state["finished_run"]
    assert sorted(p.name for p in directory.iterdir()) == [ckpt.FILE_NAME]

    assert main([*argv, "--resume", "--no-progress-eval"]) == 0
    final = ckpt.load_checkpoint(directory)
    assert final["finished_run"] and final["step"] == 40
