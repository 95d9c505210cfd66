"""nvtx_ranges on an in-place module whose result nobody reads (``self.relu(y)`` with
``inplace=True``, then ``y`` used): its range must still close, and the function stays
the same on real CIFAR-10 images in float64."""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from fastgraph.core import nvtx
from fastgraph.passes.nvtx_ranges import nvtx_ranges


class DiscardedInplace(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = self.conv(x)
        self.relu(y)  # works on y in place; its return value is not needed
        return self.fc(y.mean((2, 3)))


def test_range_of_an_inplace_module_with_unused_result_closes(real64, same_function):
    x, y = real64(8)
    gm = fx.symbolic_trace(DiscardedInplace().double())
    out = nvtx_ranges(gm)
    assert nvtx.range_names(out) == ["conv", "relu", "fc"]
    pops = [n.args[1] for n in out.graph.nodes if n.op == "call_function" and n.target is nvtx.pop]
    assert pops == ["conv", "relu", "fc"]
    out(x)
    # An unclosed range would nest everything after it, in every later step too.
    assert len(nvtx._open_ranges()) == 0
    same_function(gm, out, x, y, train=True)
