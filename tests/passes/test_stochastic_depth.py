"""stochastic_depth: residual branches found, survival decays linearly, eval is the identity."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
from torch import nn

from fastgraph.core.modules import StochasticDepth
from fastgraph.passes import declared_rewritten, get, rewrite_count
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


# ---------------------------------------------------------------- survival_first


def rewritten_adds(gm) -> list[str]:
    """Names of the adds whose branch passes through a StochasticDepth, in graph order."""
    return [next(iter(n.users)).name for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), StochasticDepth)]


def test_uniform_range_gives_every_block_the_same_survival(example):
    # The seed paper's best model: "stochastic depth with probability range of 0.5-0.5".
    out = get("stochastic_depth").fn(example("preact_resnet20"), survival_first=0.5, survival_last=0.5)
    assert [m.survival for m in drops(out)] == [0.5] * 9


@pytest.mark.parametrize(("name", "blocks"), [("resnet20", 9), ("resnet9", 2)])
def test_survival_first_is_linear_from_the_first_block_to_the_last(example, name, blocks):
    out = get("stochastic_depth").fn(example(name), survival_first=0.9, survival_last=0.3)
    expected = [0.9 + (block - 1) / (blocks - 1) * (0.3 - 0.9) for block in range(1, blocks + 1)]
    assert [m.survival for m in drops(out)] == pytest.approx(expected)
    assert drops(out)[0].survival == pytest.approx(0.9) and drops(out)[-1].survival == pytest.approx(0.3)


class TwoBlocks(nn.Module):
    """Two residual blocks (conv -> BN -> ReLU branches) and a linear head: a small real ResNet."""

    def __init__(self, blocks: int = 2):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()) for _ in range(blocks))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        for branch in self.branches:
            x = x + branch(x)
        return self.head(x.mean((2, 3)))


def test_one_block_takes_survival_last():
    out = get("stochastic_depth").fn(fx.symbolic_trace(TwoBlocks(1)), survival_first=0.9, survival_last=0.6)
    assert [m.survival for m in drops(out)] == [0.6]


def test_survival_first_changes_the_probabilities_only(example):
    # Default, None and a range rewrite the same adds, in the same places, with the same
    # declared nodes; None is Huang et al.'s rule, the default.
    gm = example("preact_resnet20")
    default = get("stochastic_depth").fn(gm)
    huang = get("stochastic_depth").fn(gm, survival_first=None, survival_last=0.5)
    ranged = get("stochastic_depth").fn(gm, survival_first=0.5, survival_last=0.5, per="batch")
    assert rewritten_adds(default) == rewritten_adds(huang) == rewritten_adds(ranged)
    assert len(rewritten_adds(default)) == 9
    assert declared_rewritten(gm, default) == declared_rewritten(gm, ranged)
    assert [m.survival for m in drops(huang)] == [m.survival for m in drops(default)]
    assert [m.survival for m in drops(default)] == pytest.approx([1 - b / 9 * 0.5 for b in range(1, 10)])
    assert all(m.per == "batch" for m in drops(ranged))
    once = get("stochastic_depth").fn(ranged, survival_first=0.9)
    assert once is ranged  # already dropped: left alone, whatever the options


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, float("nan"), "0.5", True])
def test_survival_first_out_of_range_is_refused(example, bad):
    gm = example("resnet20")
    for option in ("survival_first", "survival_last"):
        message = rf"stochastic_depth: {option} must be a number in \(0, 1\]"
        with pytest.raises(PassOptionError, match=message):
            get("stochastic_depth").fn(gm, **{option: bad})


def test_range_is_checked_exact_in_its_identity_configuration(real_batch):
    # The identity configuration keeps every branch whatever the range: (1, 1); the pass
    # manager checks it in float64 on real images (8x8 crops keep the check cheap).
    from fastgraph.core.pass_manager import run_passes

    x, y = real_batch
    gm = fx.symbolic_trace(TwoBlocks())
    options = {"stochastic_depth": {"survival_first": 0.5, "survival_last": 0.5}}
    out, report = run_passes(gm, ["stochastic_depth"], mode="train", batch=(x[:32, :, :8, :8], y[:32]),
                             options=options)
    outcome = report.outcomes[0]
    assert outcome.status == "applied", outcome
    assert outcome.identity == {"survival_first": 1.0, "survival_last": 1.0}
    assert "identity configuration exact (train mode)" in outcome.message
    assert [m.survival for m in drops(out)] == [0.5, 0.5]
    _, huang = run_passes(gm, ["stochastic_depth"], mode="train", batch=(x[:32, :, :8, :8], y[:32]),
                          options={"stochastic_depth": {"survival_last": 0.5}})
    assert huang.outcomes[0].identity == {"survival_last": 1.0}  # as before the option existed
