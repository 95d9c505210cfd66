"""A resume that would not continue the run it names is refused in one line, on the CPU with
real images: a checkpoint made on other data (another image in the same layout), one whose
training had begun more runs than ``runs`` now asks for (they would vanish from the
results), and one of a model file edited since (the same weights' shapes, another
function). The same data, runs and model (a comment added) resume."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from fastgraph.core.errors import UserError
from fastgraph.training import checkpoint as ckpt
from fastgraph.training.loop import TrainOptions, train
from fastgraph.training.recipes import load_recipe
from support import stop_at, write_model, write_recipe

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from cifar_builders import Sample, write_imagefolder  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _sample(cifar10, swap: bool) -> Sample:
    """30 training and 10 test images of each class, real; ``swap`` replaces the first
    training image by another real image of its class."""
    images, labels = cifar10.train_images.numpy(), cifar10.train_labels.numpy()
    train = np.concatenate([np.flatnonzero(labels == c)[:30] for c in range(10)])
    test_labels = cifar10.test_labels.numpy()
    test = np.concatenate([np.flatnonzero(test_labels == c)[:10] for c in range(10)])
    train_images = images[train].copy()
    if swap:
        train_images[0] = images[np.flatnonzero(labels == labels[train[0]])[30]]
    return Sample(train_images, labels[train], cifar10.test_images.numpy()[test], test_labels[test], True)


@pytest.fixture(scope="module")
def folders(cifar10, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume-data")
    return (write_imagefolder(root / "a", _sample(cifar10, swap=False)),
            write_imagefolder(root / "b", _sample(cifar10, swap=True)))


def options(tmp_path, data, checkpoint_dir_name="ck", **kw) -> TrainOptions:
    model = write_model(tmp_path, (8, 16, 16, 32))
    recipe = write_recipe(tmp_path, epochs=2, batch_size=64, whitening_images=200)
    return TrainOptions(model_path=str(model), recipe=load_recipe(str(recipe)), data=str(data),
                        checkpoint_dir=str(tmp_path / checkpoint_dir_name), **kw)


def test_resume_on_other_data_is_refused_and_on_the_same_data_goes_on(tmp_path, folders):
    a, b = folders
    with pytest.raises(KeyboardInterrupt):
        train(options(tmp_path, a), stop_at(step=6))
    assert ckpt.load_checkpoint(tmp_path / "ck")["data"]
    with pytest.raises(UserError, match=r"checkpoint in .*ck was trained on other data than .*b holds"):
        train(options(tmp_path, b, resume=True))
    result = train(options(tmp_path, a, resume=True))
    assert [e.epoch for e in result.runs[0].epochs] == [1, 2]


def test_resume_with_fewer_runs_than_begun_is_refused(tmp_path, folders):
    a, _ = folders
    with pytest.raises(KeyboardInterrupt):  # 4 steps an epoch, 8 a run: step 10 is in run 2
        train(options(tmp_path, a, runs=2), stop_at(step=10))
    state = ckpt.load_checkpoint(tmp_path / "ck")
    assert state["run"] == 1 and len(state["completed"]) == 1
    with pytest.raises(UserError, match=r"different training \(runs: 2 begun there, more than 1\)"):
        train(options(tmp_path, a, runs=1, resume=True))


def test_resume_after_the_model_file_changed_is_refused_and_after_a_comment_goes_on(tmp_path, folders):
    a, _ = folders
    with pytest.raises(KeyboardInterrupt):
        train(options(tmp_path, a), stop_at(step=6))
    model = tmp_path / "model.py"
    source = model.read_text()
    model.write_text(source + "\n# a comment changes no graph\n")
    kept = options(tmp_path, a, resume=True)  # writes the model file again: set the comment back after
    model.write_text(source + "\n# a comment changes no graph\n")
    assert train(kept).runs[0].epochs[-1].epoch == 2

    with pytest.raises(KeyboardInterrupt):
        train(options(tmp_path, a, checkpoint_dir_name="ck2"), stop_at(step=6))
    edited = options(tmp_path, a, resume=True, checkpoint_dir_name="ck2")
    # the logit scale, a constant of the model: every weight keeps its shape
    model.write_text(source.replace("weight=0.0625", "weight=0.125"))
    with pytest.raises(UserError, match=r"model: another traced graph there \(the model file or function"):
        train(edited)
