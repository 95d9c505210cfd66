"""What the pass framework guarantees around every pass: dead-code clean-up keeps every
statement that writes memory, each training-time pass is exact in its identity
configuration, and a pass that drops a node it did not declare is refused."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fastgraph import passes as registry
from fastgraph.core.pass_manager import run_passes
from fastgraph.passes import Identity, copy_module, finish, get


class InPlaceForms(nn.Module):
    """Every way a statement can write memory while its result goes unused."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        h = self.conv(x)
        shortcut = h * 0.5
        out = torch.tanh(h)
        out.add_(shortcut)                       # a residual add written in place
        out.mul_(1.5)
        out.relu_()
        torch.add(out, 1.0, out=out)             # out=
        self.bn(out)                             # running statistics only: the output is unused
        unused = out * 2  # noqa: F841  (dead and pure: clean-up may drop it)
        return self.head(out.mean((2, 3)))


def test_dead_code_clean_up_keeps_every_mutation(real_batch):
    x, _ = real_batch
    model = InPlaceForms().train()
    gm = fx.symbolic_trace(model)
    ops = {n.target for n in gm.graph.nodes}
    assert {"add_", "mul_", "relu_", "bn"} <= ops

    cleaned = finish(copy_module(gm), rewrites=0)
    removed = [n for n in gm.graph.nodes if n.name not in {m.name for m in cleaned.graph.nodes}]
    assert [(n.target, n.args[1]) for n in removed] == [(operator.mul, 2)]  # only `unused = out * 2` went
    assert sum(n.target is torch.add for n in cleaned.graph.nodes) == 1

    reference = InPlaceForms().train()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(cleaned(x[:8]), reference(x[:8]), rtol=0, atol=0)
        torch.testing.assert_close(cleaned.bn.running_mean, reference.bn.running_mean, rtol=0, atol=0)


def test_in_place_operators_and_mutable_ops_count_as_side_effects():
    graph = fx.Graph()
    x, y = graph.placeholder("x"), graph.placeholder("y")
    graph.call_function(operator.iadd, (x, y))
    graph.call_function(operator.setitem, (x, 0, y))
    graph.call_function(torch.ops.aten.add_.Tensor, (x, y))
    graph.call_function(torch.relu_, (x,))
    graph.call_function(torch.neg, (y,))  # pure and unused: dropped
    graph.output(x)
    gm = finish(fx.GraphModule(nn.Module(), graph), rewrites=0)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets == [operator.iadd, operator.setitem, torch.ops.aten.add_.Tensor, torch.relu_]


def _resnet_block(inplace: bool):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            self.head = nn.Linear(8, 10)

        def forward(self, x):
            h = F.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(h))
            if inplace:
                out.add_(h)
            else:
                out = out + h
            return self.head(F.relu(out).mean((2, 3)))

    return Block()


@pytest.mark.parametrize("name", ["ghost_batchnorm", "swap_activation", "freeze_bn_scale"])
def test_an_in_place_residual_add_survives_every_training_pass(name, real_batch):
    x, y = real_batch
    torch.manual_seed(0)
    inplace = fx.symbolic_trace(_resnet_block(True))
    torch.manual_seed(0)
    functional = fx.symbolic_trace(_resnet_block(False))
    outs = [run_passes(gm, [name], mode="train", batch=(x[:32], y[:32]))[0] for gm in (inplace, functional)]
    assert any(n.target == "add_" for n in outs[0].graph.nodes)
    for gm in outs:
        gm.train()
    torch.testing.assert_close(outs[0](x[:32]), outs[1](x[:32]), rtol=0, atol=0)


def _count_calls(module, inputs, output):
    module.calls = getattr(module, "calls", 0) + 1


def _conv_bn_relu() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


@pytest.mark.parametrize(("name", "options", "hooked"), [
    ("ghost_batchnorm", {"ghost_batch_size": 16}, "1"),  # the BN becomes a GhostBatchNorm
    ("swap_activation", {"to": "celu", "alpha": 0.3}, "2"),  # the ReLU becomes a CELU
])
def test_a_pass_after_which_a_modules_hook_no_longer_runs_is_refused(real_batch, name, options, hooked):
    x, y = real_batch
    gm = fx.symbolic_trace(_conv_bn_relu())
    module = gm.get_submodule(hooked)
    module.register_forward_hook(_count_calls)
    out, report = run_passes(gm, [name], mode="train", batch=(x[:32], y[:32]), options={name: options})
    outcome = report.outcomes[0]
    assert outcome.status == "refused", outcome
    assert outcome.message == (f"drops the hooks of {hooked}, which would no longer run; "
                               "kept the module before it")
    assert out is gm
    module.calls = 0
    out(x[:4])
    assert module.calls >= 1  # the user's hook still runs
    # Without the hook the same pass applies: the refusal is the hook's.
    module._forward_hooks.clear()
    assert run_passes(gm, [name], mode="train", batch=(x[:32], y[:32]),
                      options={name: options})[1].outcomes[0].status == "applied"


# ---------------------------------------------------------------- identity configurations


@pytest.mark.parametrize(("name", "options", "identity"), [
    ("ghost_batchnorm", {"ghost_batch_size": 4}, {"ghost_batch_size": 32}),
    ("stochastic_depth", {"survival_last": 0.5}, {"survival_last": 1.0}),
    ("swap_activation", {"to": "celu", "alpha": 0.3}, {"to": "same"}),
    ("freeze_bn_scale", {}, {"scale": None, "celu_alpha": None}),
])
def test_every_training_pass_is_checked_exact_in_its_identity_configuration(example_graph, real_batch, name,
                                                                             options, identity):
    x, y = real_batch
    gm = example_graph("resnet20.py")
    out, report = run_passes(gm, [name], mode="train", batch=(x[:32], y[:32]), options={name: options})
    outcome = report.outcomes[0]
    assert outcome.status == "applied", outcome
    assert outcome.identity == identity
    assert "identity configuration exact (train mode)" in outcome.message
    assert outcome.max_output_diff <= 1e-9 and outcome.max_grad_diff <= 1e-9  # relative
    assert out is not gm


def test_whitening_identity_reproduces_the_stem_and_pool_before_bn_is_checked_in_eval(example_graph,
                                                                                    real_batch):
    x, y = real_batch
    gm = example_graph("resnet9.py")
    out, report = run_passes(gm, ["whitening", "pool_before_bn"], mode="train", batch=(x[:32], y[:32]),
                             options={"whitening": {"images": x, "kernel_size": 3, "eps": 1e-2}})
    white, pool = report.outcomes
    assert white.status == "applied"
    assert white.identity == {"kernel_size": None, "pointwise_init": "reproduce"}
    assert white.max_output_diff < 1e-12 and white.max_grad_diff < 1e-12, white  # built in float64
    assert pool.status == "applied" and "exact (infer mode)" in pool.message and pool.max_output_diff == 0


def _register_test_pass(name, fn, identity):
    registry.register(exact=False, modes=("train",), name=name, identity=identity)(fn)
    return name


@pytest.fixture
def test_passes():
    names = []
    yield names
    for name in names:
        registry.REGISTRY.pop(name, None)


def test_a_training_pass_whose_identity_configuration_changes_the_function_is_refused(
        example_graph, real_batch, test_passes):
    """A "ghost BN" that splits even in its identity configuration (an off-by-one in the
    split) is not BatchNorm there: the manager measures it and refuses."""
    x, y = real_batch

    def broken_ghost(gm, *, ghost_batch_size=32):
        """Training-time: ghost BN with a bug."""
        return get("ghost_batchnorm").fn(gm, ghost_batch_size=max(1, ghost_batch_size // 2))

    name = _register_test_pass("broken_ghost", broken_ghost,
                               lambda gm, options, n: Identity({"ghost_batch_size": n}))
    test_passes.append(name)
    gm = example_graph("resnet20.py")
    out, report = run_passes(gm, [name], mode="train", batch=(x[:32], y[:32]))
    outcome = report.outcomes[0]
    assert outcome.status == "refused" and out is gm
    assert "identity configuration {'ghost_batch_size': 32} is not exact" in outcome.message
    assert outcome.max_output_diff > 1e-3


def test_a_pass_that_drops_an_undeclared_node_is_refused(real_batch, test_passes):
    """A pass whose clean-up loses the in-place residual add (fx's own dead-code test
    would) is refused by name, even though it declared what it meant to rewrite."""
    x, y = real_batch

    def lossy(gm, *, survival_last=0.5):
        """Training-time: swaps the activations and forgets the in-place add."""
        out = get("swap_activation").fn(gm, to="celu" if survival_last < 1 else "same")
        out = copy_module(out)
        add = next(n for n in out.graph.nodes if n.target == "add_")
        out.graph.erase_node(add)
        return finish(out, rewrites=1, rewritten=registry.declared_rewritten(gm, out) | {"relu"})

    name = _register_test_pass("lossy", lossy, lambda gm, options, n: Identity({"survival_last": 1.0}))
    test_passes.append(name)
    gm = fx.symbolic_trace(_resnet_block(True))
    out, report = run_passes(gm, [name], mode="train", batch=(x[:32], y[:32]))
    assert out is gm and report.outcomes[0].status == "refused"
    assert "dropped nodes it did not declare rewritten: add_" in report.outcomes[0].message


def test_no_identity_for_a_non_monotonic_pool_reorder_still_checks_survival(real_batch):
    x, y = real_batch

    class GeluChain(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 10)

        def forward(self, x):
            return self.head(F.max_pool2d(F.gelu(self.bn(self.conv(x))), 2).mean((2, 3)))

    out, report = run_passes(fx.symbolic_trace(GeluChain()), ["pool_before_bn"], mode="train",
                             batch=(x[:32], y[:32]))
    outcome = report.outcomes[0]
    assert outcome.status == "applied" and "no identity configuration for this graph" in outcome.message
    assert "not monotonic" in outcome.message


def test_every_registered_training_pass_has_an_identity_configuration():
    for info in registry.REGISTRY.values():
        if not info.exact and "train" in info.modes:
            assert info.identity is not None, info.name
    def no_identity(gm):
        """Training-time: changes the function with nothing to check it against."""
        return gm

    with pytest.raises(ValueError, match="needs an identity configuration"):
        registry.register(exact=False, modes=("train",))(no_identity)
    assert "no_identity" not in registry.REGISTRY


class PoolFirst(nn.Module):
    """A stem conv whose outputs meet a 2x2 max-pool directly (then BN, ReLU, head)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.pool(self.conv(x)))).mean((2, 3)))


def _gap(x, w, n, k, r, c) -> float:
    """Conv output channel ``k`` (float64 ``w``, padding 1) of image ``n`` at (r, c + 1)
    minus at (r, c)."""
    def out(cc):
        return (w[k] * x[n, :, r - 1:r + 2, cc - 1:cc + 2].double()).sum()

    return float(out(c + 1) - out(c))


def _near_ties(x: torch.Tensor, weight: torch.Tensor, lo: float, hi: float) -> tuple[torch.Tensor, int]:
    """``x`` (float32 (32, 3, 32, 32)) with one pixel per window edited so that in 64
    2x2 windows two different 3x3 patches, A at (r, c) and B at (r, c + 1), give conv
    outputs (``weight``, padding 1) B above A by ``lo``..``hi`` of the output's largest
    magnitude; and in how many windows that was reached. The edited pixel, (0, r, c + 2), is
    in B's patch only; of the 8 output channels the one needing the smallest edit is used."""
    x, w = x.clone(), weight.double()
    edits = []
    for i in range(64):
        n, r, c = i % 32, 2 + 4 * (i // 8 % 7), 2 + 4 * (i // 32)
        original = float(x[n, 0, r, c + 2])
        x[n, 0, r, c + 2] = 0.0
        # gap is linear in the pixel p: gap(p) = gap(0) + w[k, 0, 1, 2] * p
        pixels = [-_gap(x, w, n, k, r, c) / float(w[k, 0, 1, 2]) for k in range(len(w))]
        k = min(range(len(w)), key=lambda k: abs(pixels[k] - original))
        x[n, 0, r, c + 2] = pixels[k]
        edits.append((n, k, r, c))
    scale = float(F.conv2d(x.double(), w, padding=1).abs().max())
    hit = 0
    for n, k, r, c in edits:  # float32 steps of the pixel until B is above A by lo..hi
        for _ in range(64):
            gap = _gap(x, w, n, k, r, c)
            if lo * scale < gap < hi * scale:
                hit += 1
                break
            toward = float(torch.sign(weight[k, 0, 1, 2])) * (1 if gap < lo * scale else -1) * float("inf")
            x[n, 0, r, c + 2] = torch.nextafter(x[n, 0, r, c + 2], torch.tensor(toward))
    return x, hit


def test_whitening_identity_survives_max_pool_near_ties(real_batch):
    """Real images edited so that 64 max-pool windows hold two different patches whose conv
    outputs differ by 2e-9 to 3e-8 of the tensor's scale: more than a tie (1e-9), less than
    the float32 rounding of a reproducing 1x1 conv (~4e-8). Built in float32, the identity
    configuration sent such windows' gradient to the other pixel and the pass was refused
    (ResNet-9 under page2019 on real data); built in float64 it is exact."""
    torch.manual_seed(0)
    model = PoolFirst()
    x, hit = _near_ties(real_batch[0][:32], model.conv.weight.detach(), 2e-9, 3e-8)
    assert hit >= 48
    options = {"whitening": {"images": real_batch[0], "kernel_size": 3, "eps": 1e-2}}
    batch = (x, real_batch[1][:32])
    gm = fx.symbolic_trace(model)
    _, report = run_passes(gm, ["whitening"], mode="train", batch=batch, options=options)
    outcome = report.outcomes[0]
    assert outcome.status == "applied", outcome.message
    assert outcome.max_grad_diff < 1e-12 and outcome.max_output_diff < 1e-12, outcome
