"""stochastic_depth: residual branches found, survival decays linearly, eval is the identity."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
from torch import nn

from fastgraph.core.modules import StochasticDepth
from fastgraph.passes import get, rewrite_count
from fastgraph.passes._options import PassOptionError


@pytest.fixture
def example(example_graph):
    """``example("resnet20")``: that example file's model traced with torch.fx (train mode)."""
    return lambda name: example_graph(f"{name}.py")


def drops(gm) -> list[StochasticDepth]:
    """The StochasticDepth modules in graph order."""
    return [gm.get_submodule(n.target) for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), StochasticDepth)]


@pytest.mark.parametrize(("name", "blocks"), [("resnet20", 9), ("preact_resnet20", 9), ("resnet9", 2)])
def test_finds_residual_blocks_with_linear_survival(example, name, blocks):
    gm = example(name)
    code = gm.code
    out = get("stochastic_depth").fn(gm, survival_last=0.5)
    assert gm.code == code  # input untouched
    found = drops(out)
    assert len(found) == blocks and rewrite_count(gm, out) == blocks
    expected = [1 - (block / blocks) * 0.5 for block in range(1, blocks + 1)]
    assert [m.survival for m in found] == pytest.approx(expected)
    assert found[-1].survival == pytest.approx(0.5)


def test_drop_sits_on_the_branch_not_the_shortcut(example):
    out = get("stochastic_depth").fn(example("resnet20"))
    for node in out.graph.nodes:
        if node.op == "call_module" and isinstance(out.get_submodule(node.target), StochasticDepth):
            branch = node.args[0]
            # ResNet-20's branch ends conv2 -> bn2; the option-A shortcut has no module at all.
            assert branch.op == "call_module" and branch.target.endswith("bn2")
            (add,) = node.users
            assert add.op == "call_function" and len(add.args) == 2 and node in add.args


def test_eval_is_the_original_function(example, real_batch):
    x = real_batch[0][:16]
    gm = example("resnet20").eval()
    out = get("stochastic_depth").fn(gm)
    with torch.no_grad():
        torch.testing.assert_close(out(x), gm(x), atol=0, rtol=0)


def test_survival_one_is_the_original_function_in_training(example, real_batch):
    x = real_batch[0][:16]
    gm = example("resnet20").train()
    out = get("stochastic_depth").fn(gm, survival_last=1.0)
    assert len(drops(out)) == 9 and all(m.survival == 1.0 for m in drops(out))
    reference = copy.deepcopy(gm)  # BN running statistics move in training: fresh copies
    with torch.no_grad():
        torch.testing.assert_close(out(x), reference(x), atol=0, rtol=0)


def test_empirical_keep_rate_matches_survival(example, real_batch):
    x = real_batch[0][:, :, :8, :8]  # 64 real 8x8 crops: cheap, and ResNet-20 pools globally
    out = get("stochastic_depth").fn(example("resnet20").train(), survival_last=0.5)
    kept = {id(m): [] for m in drops(out)}

    def record(module, inputs, output):
        (branch,) = inputs
        per_sample = (output.flatten(1) != 0).any(1)
        # Kept samples are scaled by 1/p exactly; dropped ones are zero.
        torch.testing.assert_close(output[per_sample], branch[per_sample] / module.survival)
        kept[id(module)].append(per_sample.float())

    for m in drops(out):
        m.register_forward_hook(record)
    torch.manual_seed(1)
    with torch.no_grad():
        for _ in range(8):  # 8 x 64 = 512 draws per block
            out(x)
    for m in drops(out):
        rate = torch.cat(kept[id(m)]).mean().item()
        sigma = (m.survival * (1 - m.survival) / 512) ** 0.5
        assert abs(rate - m.survival) < 4 * sigma + 1e-9, (m.survival, rate)


@pytest.mark.parametrize("per", ["sample", "batch"])
def test_module_keep_rate_many_draws(real_batch, per):
    x = real_batch[0][:, :1, :4, :4]  # (64, 1, 4, 4) real pixels
    drop = StochasticDepth(0.7, per=per).train()
    torch.manual_seed(2)
    masks = torch.stack([(drop(x).flatten(1) != 0).any(1) for _ in range(500)]).float()  # (500, 64)
    if per == "batch":
        assert torch.all(masks == masks[:, :1])  # the whole batch kept or dropped together
        rate, n = masks[:, 0].mean().item(), 500
    else:
        rate, n = masks.mean().item(), masks.numel()
    assert abs(rate - 0.7) < 4 * (0.21 / n) ** 0.5
    assert torch.equal(drop.eval()(x), x)


def test_compiles_without_graph_breaks(example, real_batch):
    import torch._dynamo

    out = get("stochastic_depth").fn(example("resnet20")).train()
    explanation = torch._dynamo.explain(out)(real_batch[0][:4, :, :8, :8])
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0


def test_negative_cases(example):
    class BiasAdd(nn.Module):  # conv + a learned offset: an add, but no shortcut
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.offset = nn.Parameter(torch.zeros(4, 1, 1))

        def forward(self, x):
            return self.conv(x) + self.offset

    class TwoBranches(nn.Module):  # both sides hold one conv: not a residual block
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.a(x) + self.b(x)

    for model in (nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), BiasAdd(), TwoBranches()):
        gm = fx.symbolic_trace(model)
        assert get("stochastic_depth").fn(gm) is gm
    once = get("stochastic_depth").fn(example("resnet20"))
    assert get("stochastic_depth").fn(once) is once
    with pytest.raises(PassOptionError, match="survival_last"):
        get("stochastic_depth").fn(once, survival_last=0.0)
    with pytest.raises(PassOptionError, match="per"):
        get("stochastic_depth").fn(once, per="layer")
