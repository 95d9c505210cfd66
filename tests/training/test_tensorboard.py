"""``fastgraph train --tensorboard``: a real two-run training on real CIFAR-10 logged for
TensorBoard, read back with TensorBoard's own event reader and held against the JSON
record of the same training."""

from __future__ import annotations

import json
import sys

import pytest

from support import cli_error, write_model, write_recipe

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = (8, 16, 16, 32)  # ResNet-9 widths: a few ms per step on a CPU


def test_a_missing_tensorboard_is_one_line_before_training(tmp_path, capsys, monkeypatch):
    # Importing a module whose sys.modules entry is None raises ImportError, as when the
    # package is not installed; the data path does not exist, so an error about data
    # would mean the training had started.
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    model, recipe = write_model(tmp_path, TINY), write_recipe(tmp_path)
    line = cli_error(capsys, "train", str(model), "--recipe", str(recipe), "--tensorboard",
                     str(tmp_path / "tb"), "--data", str(tmp_path / "no-such-data"))
    assert "pip install 'fastgraph[tensorboard]'" in line


@pytest.fixture(scope="module")
def logged(tmp_path_factory, data_path):
    """A real `fastgraph train --runs 2 --tensorboard DIR --json FILE`: 2 epochs of 5 steps
    over 320 training images, evaluated on 100 test images (about 10 s)."""
    pytest.importorskip("tensorboard", reason="tensorboard not installed (extra: fastgraph[tensorboard])")
    from fastgraph.cli.main import main

    tmp = tmp_path_factory.mktemp("tensorboard")
    model = write_model(tmp, widths=TINY)
    recipe = write_recipe(tmp, epochs=2, batch_size=64, whitening_images=320, ghost_batch_size=None)
    argv = ["train", str(model), "--recipe", str(recipe), "--subset", "320", "--test-subset", "100",
            "--runs", "2", "--data", data_path, "--tensorboard", str(tmp / "tb")]
    assert main([*argv, "--json", str(tmp / "result.json")]) == 0
    return tmp / "tb", json.loads((tmp / "result.json").read_text()), argv


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return events


def test_scalars_per_epoch_are_the_records_of_each_run(logged):
    log_dir, record, _ = logged
    assert sorted(p.name for p in log_dir.iterdir()) == ["run-1", "run-2"]
    fields = {"loss/train": "train_loss", "accuracy/train": "train_acc", "accuracy/test": "test_acc",
              "accuracy/tta": "tta_acc", "lr": "lr", "epoch": "epoch", "time/epoch_seconds": "seconds",
              "time/elapsed_seconds": "elapsed", "time/tta_eval_seconds": "tta_seconds"}
    for k, run in enumerate(record["runs"], start=1):
        events = _events(log_dir / f"run-{k}")
        epochs = run["epochs"]
        for tag, key in fields.items():
            logged_values = events.Scalars(tag)
            assert [e.step for e in logged_values] == [e["step"] for e in epochs], tag
            # event files store float32
            assert [e.value for e in logged_values] == pytest.approx([e[key] for e in epochs], rel=1e-6), tag
        assert epochs[-1]["step"] == 10  # 2 epochs of 320 / 64 steps: the steps are the run's own


def test_hparams_name_the_settings_and_the_final_metrics(logged):
    from tensorboard.plugins.hparams import plugin_data_pb2

    log_dir, record, _ = logged
    settings, hyper = record["settings"], record["hyperparameters"]
    for k, run in enumerate(record["runs"], start=1):
        events = _events(log_dir / f"run-{k}")
        content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
        assert hparams["recipe"].string_value == settings["recipe"] == "cpu-check"
        assert hparams["model"].string_value == "model.py"
        assert hparams["precision"].string_value == settings["precision"]
        assert hparams["batch_size"].number_value == settings["batch_size"] == 64
        assert hparams["epochs"].number_value == settings["epochs"]
        assert hparams["seed"].number_value == run["seed"] == k - 1
        assert hparams["lr"].number_value == pytest.approx(hyper["lr"])
        assert hparams["weight_decay"].number_value == pytest.approx(hyper["weight_decay"])
        for metric in ("tta_acc", "test_acc", "seconds"):
            (value,) = events.Scalars(f"hparam/{metric}")
            assert value.value == pytest.approx(run[metric], rel=1e-6)


def test_a_folder_with_another_trainings_events_is_refused(logged, capsys):
    log_dir, _, argv = logged
    assert "already holds the events" in cli_error(capsys, *argv)
