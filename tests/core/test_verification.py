"""The float64 check every rewrite passes cannot be fooled: tiny outputs, one lucky batch,
lost gradients, dropout, statements that do nothing at initialisation, in-place inputs,
default BatchNorm statistics. Each test registers a wrong "exact" pass the old check
accepted (or a model it crashed on) and asserts the verdict, with its reason."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fastgraph import passes as registry
from fastgraph.core.pass_manager import run_passes
from fastgraph.passes import copy_module, finish


@pytest.fixture
def exact_pass(monkeypatch):
    """``exact_pass(fn)``: register ``fn`` as an exact pass for both modes; its name."""

    def register(fn):
        monkeypatch.setitem(registry.REGISTRY, fn.__name__,
                            registry.PassInfo(fn.__name__, fn, True, ("train", "infer")))
        return fn.__name__

    return register


def _rewrite(gm, select, replace):
    """Copy ``gm``; for each node ``select`` picks, ``replace(graph, node)`` returns its new
    value (or None to delete it). Declares every node it removed, so that only the
    numerical check can tell the rewrite is wrong."""
    out = copy_module(gm)
    names = []
    for node in list(out.graph.nodes):
        if select(node):
            names.append(node.name)
            with out.graph.inserting_after(node):
                new = replace(out.graph, node)
            if new is not None:
                node.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
            if not node.users:
                out.graph.erase_node(node)
    out = finish(out, rewrites=len(names))
    gone = {n.name for n in gm.graph.nodes} - {n.name for n in out.graph.nodes}
    out.meta[registry.REWRITTEN_KEY] = frozenset(names) | gone
    return out


def _pooled_head():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 10))


def _status(report):
    (outcome,) = report.outcomes
    return outcome


def test_a_rewrite_that_negates_tiny_logits_is_refused(real_batch, exact_pass):
    """Logits ~1e-4 (a MobileNet-style head at initialisation): the old tolerance,
    1e-5 * max(1, |y|), was 1e-5 absolute and accepted -y for y."""
    x, y = real_batch
    model = _pooled_head()
    with torch.no_grad():
        model[3].weight.mul_(1e-3)
        model[3].bias.zero_()

    def negate_logits(gm):
        """Claims exactness; negates the output."""
        return _negated(gm)

    name = exact_pass(negate_logits)
    gm = fx.symbolic_trace(model)
    assert gm(x).abs().max() < 1e-3
    for mode in ("infer", "train"):
        out, report = run_passes(gm, [name], mode=mode, batch=(x[:32], y[:32]))
        outcome = _status(report)
        assert outcome.status == "refused" and out is gm, outcome
        assert outcome.max_output_diff == pytest.approx(2.0)


def _negated(gm):
    out = copy_module(gm)
    (output,) = [n for n in out.graph.nodes if n.op == "output"]
    with out.graph.inserting_before(output):
        neg = out.graph.call_function(torch.neg, (output.args[0],))
    output.args = (neg,)
    return finish(out, rewrites=1)


class ShiftedRelu(nn.Module):
    """relu(x + 3): on normalised CIFAR-10 (x >= -2.0) the ReLU never clips."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.conv(F.relu(x + 3.0)).mean((2, 3)))


def test_a_rewrite_one_real_batch_cannot_tell_is_caught_by_the_stress_batch(real_batch, exact_pass):
    x, y = real_batch
    assert (x + 3).min() > 0  # the real batch never reaches the ReLU's kink

    def drop_relu(gm):
        """Claims exactness; deletes the ReLU (right only where its input is positive)."""
        return _rewrite(gm, lambda n: n.target is F.relu, lambda g, n: n.args[0])

    name = exact_pass(drop_relu)
    out, report = run_passes(fx.symbolic_trace(ShiftedRelu()), [name], mode="infer", batch=(x[:32], y[:32]))
    outcome = _status(report)
    assert outcome.status == "refused" and "b1:outputs" in outcome.message, outcome


def test_a_lost_gradient_is_a_mismatch_not_skipped(real_batch, exact_pass):
    """detach() keeps every output and removes the conv's gradients: the old check only
    compared gradients both modules had."""
    x, y = real_batch

    def detach_features(gm):
        """Claims exactness; detaches the conv output."""
        return _rewrite(gm, lambda n: n.op == "call_module" and n.target == "0",
                        lambda g, n: g.call_method("detach", (n,)))

    name = exact_pass(detach_features)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 10))
    out, report = run_passes(fx.symbolic_trace(model), [name], mode="train", batch=(x[:32], y[:32]))
    outcome = _status(report)
    assert outcome.status == "refused" and "present in one module only" in outcome.message, outcome
    assert "b0:grad:0.weight (only before)" in outcome.message


def test_dropout_models_are_checked_with_the_same_masks(real_batch):
    x, y = real_batch
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.3),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    out, report = run_passes(fx.symbolic_trace(model), ["pool_before_activation"], mode="train",
                             batch=(x[:32], y[:32]))
    outcome = _status(report)
    assert outcome.status == "applied" and outcome.max_output_diff == 0.0, outcome


class ReZero(nn.Module):
    """x + alpha * f(x) with alpha = 0 at initialisation (Bachlechner et al. 2020), in place."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.alpha = nn.Parameter(torch.zeros(()))
        self.head = nn.Linear(3, 10)

    def forward(self, x):
        h = x * 1.0
        h.add_(self.alpha * torch.tanh(self.conv(x)))
        return self.head(h.mean((2, 3)))


def test_a_statement_that_does_nothing_at_initialisation_is_still_missed(real_batch, exact_pass):
    """Dropping ReZero's in-place residual changes nothing until alpha moves: outputs
    after one SGD step show it."""
    x, y = real_batch

    def drop_rezero(gm):
        """Claims exactness; deletes the in-place add and declares it (so only numerics can tell)."""
        return _rewrite(gm, lambda n: n.target == "add_", lambda g, n: None)

    name = exact_pass(drop_rezero)
    gm = fx.symbolic_trace(ReZero())
    with torch.no_grad():
        torch.testing.assert_close(registry.REGISTRY[name].fn(gm)(x), gm(x), rtol=0, atol=0)  # same at init
    out, report = run_passes(gm, [name], mode="train", batch=(x[:32], y[:32]))
    outcome = _status(report)
    # alpha's gradient is gone, and after one step the outputs differ too
    assert outcome.status == "refused" and "b0:grad:alpha (only before)" in outcome.message, outcome
    assert outcome.max_output_diff > 1e-5


class RunningMean(nn.Module):
    """A hand-written running statistic updated with lerp_ in the forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.register_buffer("running", torch.zeros(4))
        self.head = nn.Linear(4, 10)

    def forward(self, x):
        h = self.conv(x)
        self.running.lerp_(h.detach().mean((0, 2, 3)), 0.1)
        return self.head(h.mean((2, 3)))


def test_a_lost_running_statistic_update_is_caught_in_the_buffers(real_batch, exact_pass):
    x, y = real_batch

    def drop_lerp(gm):
        """Claims exactness; deletes the running-statistic update."""
        return _rewrite(gm, lambda n: n.target == "lerp_", lambda g, n: None)

    name = exact_pass(drop_lerp)
    for mode in ("train", "infer"):
        out, report = run_passes(fx.symbolic_trace(RunningMean()), [name], mode=mode, batch=(x[:32], y[:32]))
        outcome = _status(report)
        assert outcome.status == "refused" and "buffer:running" in outcome.message, outcome


class InPlaceInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x.relu_()  # writes the caller's tensor
        return self.head(F.max_pool2d(F.relu(self.conv(x)), 2).mean((2, 3)))


def test_a_model_that_writes_its_input_is_checked_not_crashed(real_batch):
    x, y = real_batch
    before = x.clone()
    out, report = run_passes(fx.symbolic_trace(InPlaceInput()), ["pool_before_activation"], mode="train",
                             batch=(x[:32], y[:32]))
    assert _status(report).status == "applied", _status(report)
    assert torch.equal(x, before)  # the caller's batch is untouched


def test_a_rewritten_module_that_fails_is_refused_with_its_error(real_batch, exact_pass):
    x, y = real_batch

    def break_shapes(gm):
        """Claims exactness; flattens before the conv."""
        return _rewrite(gm, lambda n: n.op == "call_module" and n.target == "0",
                        lambda g, n: g.call_function(torch.flatten, (n.args[0],)))

    name = exact_pass(break_shapes)
    model = _pooled_head()
    out, report = run_passes(fx.symbolic_trace(model), [name], mode="train", batch=(x[:32], y[:32]))
    outcome = _status(report)
    assert outcome.status == "refused" and "the rewritten module fails: IndexError" in outcome.message


def test_a_fold_that_forgets_the_running_mean_is_refused_on_a_fresh_model(real_batch, exact_pass,
                                                                         monkeypatch):
    """A fresh BatchNorm has mean 0, variance 1, weight 1, bias 0: a fold that forgets
    any of them is right on it. The check runs on a calibrated twin, where it shows."""
    import fastgraph.passes.fold_bn as fold_module

    x, y = real_batch
    honest_fold = fold_module._folded_conv

    def folded_without_mean(conv, bn):
        saved = bn.running_mean.clone()
        bn.running_mean.zero_()
        try:
            return honest_fold(conv, bn)
        finally:
            bn.running_mean.copy_(saved)

    def fold_without_mean(gm):
        """Claims exactness; folds BatchNorm but forgets its running mean."""
        monkeypatch.setattr(fold_module, "_folded_conv", folded_without_mean)
        try:
            return registry.get("fold_bn").fn(gm)
        finally:
            monkeypatch.setattr(fold_module, "_folded_conv", honest_fold)

    name = exact_pass(fold_without_mean)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    gm = fx.symbolic_trace(model)
    with torch.no_grad():  # on the fresh model the wrong fold is indistinguishable
        torch.testing.assert_close(fold_without_mean(gm)(x), gm(x), rtol=1e-5, atol=1e-6)
    honest, report = run_passes(gm, ["fold_bn"], mode="infer", batch=(x[:32], y[:32]))
    assert _status(report).status == "applied"
    out, report = run_passes(gm, [name], mode="infer", batch=(x[:32], y[:32]))
    outcome = _status(report)
    assert outcome.status == "refused" and out is gm, outcome


def test_tuple_and_dict_outputs_are_compared_leaf_by_leaf(real_batch, exact_pass):
    x, y = real_batch

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.a, self.b = nn.Linear(8, 10), nn.Linear(8, 3)

        def forward(self, x):
            h = F.relu(self.conv(x)).mean((2, 3))
            return {"logits": self.a(h), "aux": (self.b(h), h)}

    def negate_aux(gm):
        """Claims exactness; negates the auxiliary head."""
        return _rewrite(gm, lambda n: n.op == "call_module" and n.target == "b",
                        lambda g, n: g.call_function(operator.neg, (n,)))

    name = exact_pass(negate_aux)
    gm = fx.symbolic_trace(TwoHeads())
    ok, report = run_passes(gm, ["pool_before_activation", "nvtx_ranges"], mode="train",
                            batch=(x[:32], y[:32]))
    assert report.outcomes[1].status == "applied"
    out, report = run_passes(gm, [name], mode="train", batch=(x[:32], y[:32]))
    outcome = _status(report)
    assert outcome.status == "refused" and "['aux'][0]" in outcome.message, outcome


def test_an_in_place_op_after_a_fused_node_is_refused_with_the_reason(real_batch):
    """The fused BN + activation returns its output through an autograd Function that
    forbids in-place writes to it: the check reports that error as the refusal."""
    x, y = real_batch

    class ScaledInPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.GELU()
            self.head = nn.Linear(8, 10)

        def forward(self, x):
            h = self.act(self.bn(self.conv(x)))
            h.mul_(2.0)
            return self.head(h.mean((2, 3)))

    gm = fx.symbolic_trace(ScaledInPlace())
    out, report = run_passes(gm, ["fuse_bn_activation"], mode="train", batch=(x[:32, :, :16, :16], y[:32]))
    outcome = _status(report)
    assert out is gm and outcome.status == "refused"
    assert "the rewritten module fails: RuntimeError" in outcome.message and "inplace" in outcome.message
