"""Tracing: the GraphModule that flows, and the one-line error for untraceable models."""

from __future__ import annotations

import textwrap

import torch

from fastgraph.core.loading import load_model
from fastgraph.core.tracing import SOURCE_KEY, trace
from support import EXAMPLES, cli_error

UNTRACEABLE = """
    from torch import nn

    class Gate(nn.Module):
        def forward(self, x):
            if x.mean() > 0:
                return x
            return -x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.gate = Gate()

        def forward(self, x):
            return self.gate(self.conv(x))

    def model():
        return Net()
"""


def test_traced_examples_compute_what_the_model_computes(real_batch):
    x, _ = real_batch
    for name in ("resnet9.py", "resnet20.py", "preact_resnet20.py"):
        model = load_model(EXAMPLES / name).eval()
        gm = trace(model, EXAMPLES / name)
        assert gm.meta[SOURCE_KEY].endswith(name)
        with torch.no_grad():
            torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_data_dependent_control_flow_names_module_and_line(tmp_path, capsys):
    path = tmp_path / "gated.py"
    path.write_text(textwrap.dedent(UNTRACEABLE))
    line = cli_error(capsys, "optimize", str(path))
    assert "cannot trace" in line and str(path) in line
    assert "line 6 in Gate.forward" in line and "'gate'" in line
    assert "data-dependent control flow" in line
