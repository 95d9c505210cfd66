"""What `fastgraph train` needs a model to return (one logits tensor) and to have (trainable
parameters): anything else is a one-line error naming what the model does instead."""

from __future__ import annotations

import pytest
import torch

from fastgraph.core.errors import ModelError
from fastgraph.training.evaluation import check_logits, describe_output
from support import NO_PARAMETERS_MODEL, RECIPE, cli_error, outputs_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _recipe(folder):
    """The tests' shortened recipe without its passes (they need a ResNet's BatchNorms)."""
    text = RECIPE.format(epochs=1, batch_size=128, lr=0.1, ema="false", cutout=0, eval_model="trained",
                         whitening_images=256)
    path = folder / "recipe.toml"
    path.write_text(text[:text.index("[[passes]]")])
    return path


@pytest.mark.parametrize("returned, described", [
    ("(logits, features)", "a tuple of 2 tensors"),
    ("{'logits': logits}", "a dict with keys 'logits'"),
])
def test_a_model_returning_several_outputs_is_a_one_line_error(tmp_path, data_path, capsys, returned,
                                                               described):
    model = tmp_path / "model.py"
    model.write_text(outputs_model(returned))
    line = cli_error(capsys, "train", str(model), "--recipe", str(_recipe(tmp_path)), "--device", "cpu",
                     "--subset", "256", "--test-subset", "100", "--data", data_path)
    assert "returns one tensor of logits, (N, num_classes)" in line
    assert f"it returned {described}: make forward return the logits alone" in line


def test_a_model_without_trainable_parameters_is_a_one_line_error(tmp_path, capsys):
    # checked with the model, before the data is looked for
    model = tmp_path / "fixed.py"
    model.write_text(NO_PARAMETERS_MODEL)
    line = cli_error(capsys, "train", str(model), "--recipe", str(_recipe(tmp_path)), "--device", "cpu",
                     "--data", str(tmp_path / "nowhere"))
    assert f"{model.resolve()}: the model has no trainable parameters" in line


def test_check_logits_takes_one_logits_tensor_and_names_anything_else():
    logits = torch.zeros(4, 10)
    assert check_logits(logits, 4, "fastgraph train") is logits
    for out, described in [((logits, logits), "a tuple of 2 tensors"), ([logits], "a list of 1 tensor"),
                           ({"logits": logits, "aux": 1}, "a dict with keys 'logits', 'aux'"),
                           (torch.zeros(4, 10, 2, 2), "a tensor of shape (4, 10, 2, 2)"),
                           (torch.zeros(2, 10), "a tensor of shape (2, 10)"),
                           (torch.zeros(4, 10, dtype=torch.long), "a tensor of shape (4, 10)")]:
        with pytest.raises(ModelError, match="one tensor of logits"):
            check_logits(out, 4, "fastgraph train")
        assert describe_output(out) == described
