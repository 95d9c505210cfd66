"""``fastgraph.train`` and ``TrainOptions`` given bad values from Python: each is one
``UserError`` line before any data is read or any run starts, the same rule the command
line's argument parser applies (seeds in [0, 2**64 - 1], integers where counts are asked
for, fractions for accuracies); a model function that raises or hands back a module it
returned before is named in one line, while a well-behaved one trains under its own name."""

from __future__ import annotations

import pytest
from torch import nn

import fastgraph
from fastgraph.core.errors import ModelError, UserError
from fastgraph.training.options import TrainOptions
from fastgraph.training.recipes import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_SEED = 2**64 - 1  # the largest seed torch.manual_seed takes
QUICK = {"recipe": "resnet20_seed_baseline", "epochs": 1, "subset": 256, "test_subset": 100}


def small_net(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))


@pytest.mark.parametrize(("options", "message"), [
    ({"seed": -1}, r"seed must be an integer in \[0, 2\*\*64 - 1\].*got -1$"),
    ({"seed": MAX_SEED + 1}, r"seed must be an integer in \[0, 2\*\*64 - 1\]"),
    ({"seed": MAX_SEED, "runs": 2}, r"the last run's seed 18446744073709551616 is above 2\*\*64 - 1"),
    ({"seed": 1.5}, "seed must be an integer, got 1.5"),
    ({"seed": "3"}, "seed must be an integer, got '3'"),
    ({"runs": 1.5}, "runs must be an integer, got 1.5"),
    ({"epochs": "2"}, "epochs must be a number, got '2'"),
    ({"batch_size": 2.5}, "batch_size must be an integer, got 2.5"),
    ({"batch_size": True}, "batch_size must be an integer, got True"),
    ({"subset": 0}, "subset must be >= 1, got 0"),
    ({"test_subset": -5}, "test_subset must be >= 1, got -5"),
    ({"target": 94}, r"target must be an accuracy in \(0, 1\] \(a fraction: 0.94 for 94%\), got 94"),
    ({"resume": "no"}, "resume must be True or False, got 'no'"),
])
def test_bad_training_options_are_one_line_user_errors(tmp_path, options, message):
    """No data at the given path: the option is refused before the data is looked for."""
    with pytest.raises(UserError, match=message) as raised:
        fastgraph.train(small_net, **{**QUICK, **options}, data=tmp_path / "no-data")
    assert "\n" not in str(raised.value)
    with pytest.raises(UserError, match=message):  # the trainer's own options, as the command builds them
        TrainOptions(model=small_net, recipe=load_recipe("resnet20_seed_baseline"), **options)


def test_the_largest_seed_torch_takes_is_accepted():
    opts = TrainOptions(model=small_net, recipe=load_recipe("resnet20_seed_baseline"), seed=MAX_SEED)
    assert opts.seed == MAX_SEED and opts.runs == 1


def test_a_model_function_that_raises_is_named_in_one_line(tmp_path):
    def broken_net():
        return nn.Conv2d(3, -8, 3)  # torch refuses a negative channel count

    said = r"^the model function .*broken_net\(\) raised \(test_api_validation.py line \d+\): RuntimeError: "
    with pytest.raises(ModelError, match=said) as raised:
        fastgraph.train(broken_net, **QUICK, data=tmp_path / "no-data")
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("route", ["fastgraph.train", "TrainOptions"])
def test_a_model_function_returning_one_instance_every_time_is_refused(data_path, route):
    """Every run must start from its own seed's weights: a function that hands back the same
    module makes all runs start alike (and reuse what the check before them ran). Refused
    whether the function comes through ``fastgraph.train`` or ``TrainOptions(model=...)``."""
    from fastgraph.training.loop import train

    shared = small_net()
    with pytest.raises(UserError, match="returned a module it returned before: build a new one"):
        if route == "fastgraph.train":
            fastgraph.train(lambda: shared, **QUICK, data=data_path, device="cpu")
        else:
            options = {k: v for k, v in QUICK.items() if k != "recipe"}
            train(TrainOptions(model=lambda: shared, recipe=load_recipe(QUICK["recipe"]), data=data_path,
                               device="cpu", **options))


def test_a_fresh_model_function_trains_under_its_own_name(data_path):
    """The function the trainer calls keeps the user's name (the settings' ``model``, checked
    on resume) and signature (a ``num_classes`` parameter is given the data's class count)."""
    calls = []

    def counted_net(num_classes: int = 3) -> nn.Module:
        calls.append(num_classes)
        return small_net(num_classes)

    result = fastgraph.train(counted_net, **QUICK, runs=2, data=data_path, device="cpu")
    assert result.settings["model"].endswith("test_a_fresh_model_function_trains_under_its_own_name"
                                             ".<locals>.counted_net")
    assert [r.seed for r in result.runs] == [0, 1]
    assert calls[1:] == [10, 10]  # each run's build is given CIFAR-10's ten classes
