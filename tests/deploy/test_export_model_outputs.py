"""`fastgraph export` builds an engine of class logits: a model that returns several outputs
is a one-line error saying what it returned, before anything is exported."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastgraph.cli.main import main
from fastgraph.core.errors import ModelError
from fastgraph.deploy.batches import pytorch_logits, run_in_batches
from support import outputs_model

pytestmark = pytest.mark.usefixtures("one_thread")


class LogitsAndFeatures(nn.Module):
    def forward(self, x):
        features = x.mean((2, 3))
        return {"logits": features @ torch.ones(3, 10), "features": features}


def test_a_model_returning_a_tuple_is_a_one_line_error(tmp_path, data_path, capsys):
    model = tmp_path / "model.py"
    model.write_text(outputs_model("(logits, features)"))
    out = tmp_path / "model.onnx"
    assert main(["export", str(model), "--verify-images", "10", "--out", str(out), "--data", data_path]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("fastgraph: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err  # beside the untrained-weights warning
    line = errors[0]
    assert "fastgraph export needs a model whose forward returns one tensor of logits" in line
    assert "it returned a tuple of 2 tensors" in line
    assert not out.exists()


def test_the_reference_logits_of_a_dict_output_name_its_keys():
    images = torch.randn(5, 3, 8, 8)
    with pytest.raises(ModelError, match="it returned a dict with keys 'logits', 'features'"):
        pytorch_logits(LogitsAndFeatures(), images, torch.device("cpu"), chunk=2)
    # one logits tensor per chunk, padded to a fixed batch: unchanged
    logits = run_in_batches(lambda x: x.mean((2, 3)) @ torch.ones(3, 10), images, batch=4)
    assert logits.shape == (5, 10)
