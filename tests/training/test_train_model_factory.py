"""Training a model given as a function (airbench's ``make_net``) instead of a file, on real
CIFAR-10 on the CPU: the same network from a function and from a file trains to the same
bits with the same seed, every run calls the function after seeding it (fresh, seeded
initial weights), and the settings and the checkpoint name the function."""

from __future__ import annotations

import runpy
import tomllib

import pytest
import torch

from fastgraph.core.errors import UserError
from fastgraph.core.loading import load_model
from fastgraph.training.loop import TrainOptions, train
from fastgraph.training.recipes import validate
from support import EXAMPLES, real_data_path, write_model, write_recipe

TINY = (8, 16, 16, 32)  # ResNet-9 widths: a few ms per step on a CPU
ResNet9 = runpy.run_path(str(EXAMPLES / "resnet9.py"))["ResNet9"]
pytestmark = pytest.mark.usefixtures("one_thread")


def make_net() -> torch.nn.Module:
    """The network the model file of ``write_model(folder, TINY)`` builds."""
    return ResNet9(width=TINY)


def make_other_net() -> torch.nn.Module:
    """The same network under another name."""
    return ResNet9(width=TINY)


def _options(tmp_path, **kw) -> TrainOptions:
    # 256 images, batch 64: 4 steps, then plain and flip-TTA evaluation on 100 test images.
    # Of the recipe's passes only the whitening, which initialises from data and the seed
    # (the others' float64 checks would take longer than the training).
    data = tomllib.loads(write_recipe(tmp_path, epochs=1, batch_size=64).read_text())
    data["passes"] = [p for p in data["passes"] if p["name"] == "whitening"]
    return TrainOptions(recipe=validate("factory-check", data), runs=2, subset=256, test_subset=100,
                        precision="fp32", device="cpu", data=str(real_data_path()), **kw)


def _state(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_model_function_trains_like_the_model_file(tmp_path, cifar10):
    built = []

    def recording_net():
        net = make_net()
        built.append(_state(net))
        return net

    path = write_model(tmp_path, TINY)
    from_file = train(_options(tmp_path, model_path=str(path)))
    from_function = train(_options(tmp_path, model=recording_net, checkpoint_dir=str(tmp_path / "ck")))

    # Called once to check the model before the data, then once per run after seeding it.
    assert len(built) == 3
    for run, initial in enumerate(built[1:]):
        torch.manual_seed(run)  # the seed of run ``run`` (seed 0 + run)
        assert _same(initial, _state(load_model(path)))
    assert not _same(built[1], built[2])  # each run its own initialisation

    for a, b in zip(from_file.runs, from_function.runs, strict=True):
        assert (a.seed, a.test_acc, a.tta_acc) == (b.seed, b.test_acc, b.tta_acc)
        assert [e.train_loss for e in a.epochs] == [e.train_loss for e in b.epochs]
        assert [e.train_acc for e in a.epochs] == [e.train_acc for e in b.epochs]
    assert _same(_state(from_file.model), _state(from_function.model))  # the last run's weights

    name = from_function.settings["model"]
    assert name.endswith("test_model_function_trains_like_the_model_file.<locals>.recording_net"), name
    assert from_file.settings["model"] == str(path.resolve())

    # The checkpoint names the function: resuming with another is a different training.
    with pytest.raises(UserError, match=r"different training \(model: '.*recording_net' there\)"):
        train(_options(tmp_path, model=make_other_net, checkpoint_dir=str(tmp_path / "ck"), resume=True))
    resumed = train(_options(tmp_path, model=recording_net, checkpoint_dir=str(tmp_path / "ck"), resume=True))
    assert [r.tta_acc for r in resumed.runs] == [r.tta_acc for r in from_function.runs]  # both runs done


def test_model_file_or_function_exactly_one(tmp_path):
    for kw, said in [({}, "neither"), ({"model": make_net, "model_path": "model.py"}, "both")]:
        with pytest.raises(UserError, match=f"exactly one of them; got {said}"):
            train(_options(tmp_path, **kw))
    with pytest.raises(UserError, match="drop entry"):
        train(_options(tmp_path, model=make_net, entry="build_model"))
