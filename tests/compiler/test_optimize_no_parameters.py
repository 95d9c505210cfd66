"""`fastgraph optimize --mode train` of a model without trainable parameters: no training step
to measure, a one-line error before any work; inference is measured as before."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastgraph.compiler.optimize import step_fn
from fastgraph.core.errors import ModelError
from support import NO_PARAMETERS_MODEL, cli_error


def test_train_mode_without_trainable_parameters_is_a_one_line_error(tmp_path, capsys):
    model = tmp_path / "fixed.py"
    model.write_text(NO_PARAMETERS_MODEL)
    line = cli_error(capsys, "optimize", str(model), "--mode", "train", "--device", "cpu",
                     "--data", str(tmp_path / "nowhere"))
    assert f"{model}: the model has no trainable parameters" in line and "--mode infer" in line


def test_the_step_of_a_model_without_trainable_parameters():
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Flatten(), nn.ReLU()))
    x, y = torch.randn(2, 3, 4, 4), torch.tensor([0, 1])
    step_fn(gm, "infer", x, y, torch.device("cpu"), "fp32")()  # inference: nothing to train, measured
    with pytest.raises(ModelError, match="no trainable parameters"):
        step_fn(gm, "train", x, y, torch.device("cpu"), "fp32")
