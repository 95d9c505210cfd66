"""`fastgraph optimize` on models whose optimised module pickle cannot store (a hook defined in
the model file, a parametrized weight) or that cannot be copied (the old weight_norm): one line,
exit 2, before the checks and timing, and no half-written ``--out`` file."""

from __future__ import annotations

import re

import pytest

from support import cli_error

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = """\
import torch.nn.functional as F
from torch import nn


def keep(module, inputs, output):
    return output


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = {conv}
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)
        {hook}

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 1).flatten(1))


def model():
    return Net()
"""
CONV = "nn.Conv2d(3, 8, 3, padding=1, bias=False)"


@pytest.mark.filterwarnings("ignore::FutureWarning")  # the old weight_norm says it is deprecated
@pytest.mark.parametrize("conv, hook, said", [
    (CONV, "self.conv.register_forward_hook(keep)",
     r"cannot save --out .*net\.optimized\.pt: pickle cannot store the module \(Can't pickle <function keep"
     r".*define its hooks, lambdas and classes in an importable module$"),
    (f"nn.utils.parametrizations.weight_norm({CONV})", "",
     r"cannot save --out .*: pickle cannot store the module \(Serialization of parametrized modules"),
    (f"nn.utils.weight_norm({CONV})", "",
     r"cannot copy the model of .*net\.py: Only Tensors created explicitly by the user .*"
     r"use torch\.nn\.utils\.parametrizations\.weight_norm\)$"),
], ids=["hook-in-the-model-file", "parametrized-weight", "old-weight-norm"])
def test_a_module_that_cannot_be_saved_or_copied_is_one_line_before_any_work(tmp_path, capsys, monkeypatch,
                                                                            conv, hook, said):
    model = tmp_path / "net.py"
    model.write_text(MODEL.format(conv=conv, hook=hook))
    monkeypatch.chdir(tmp_path)
    # No data anywhere: refused before it is looked for (the checks and timing come after it).
    line = cli_error(capsys, "optimize", str(model), "--data", str(tmp_path / "no-data"))
    assert re.search(said, line), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.py"]  # no half-written --out
