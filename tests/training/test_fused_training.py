"""The recipes' fused BN + activation kernel on the training path: ``page2019`` (ghost BN +
CELU) and ``fast`` (frozen-weight BN + GELU) build their training graph with
``fuse_bn_activation`` unless ``fused_kernels=False``; the fused and unfused graphs train
the same on real CIFAR-10 (outputs, gradients, running statistics, weights after SGD
steps); the fused module compiles (aot_eager) without a graph break or a recompile."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastgraph.core.tracing import trace
from fastgraph.kernels.bn_act import BatchNormActivation
from fastgraph.training.recipes import load_recipe
from fastgraph.training.trained import spread_training_images, training_graph
from support import REPO, build_example, narrow_resnet9_source

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, BATCH, LR = 3, 64, 0.05  # three SGD steps on batches of 64 (two ghost batches of 32)
# float64: the fused module's reference (kernels/bn_act.py, float64 for float64 input) against
# F.batch_norm + the activation module, the same function in another order of operations:
# agreement to rounding (measured ~1e-14 of each tensor's scale with GELU), except that
# PyTorch's own CELU backward rounds alpha to float32 (fastgraph.core.verification: up to 4e-8
# relative, which the BN backward lifts to ~1e-7 of page2019's gradients). 1e-6 covers that;
# any fusion error (eps, momentum, alpha, ghost grouping) is 1e-3 or more.
RTOL_FLOAT64 = 1e-6
# float32 (the Triton kernels under TRITON_INTERPRET=1, else the reference): each BN layer
# differs by float32 rounding (~1e-7 relative), which the forward through eight layers lifts
# to ~1e-6 of the output scale (measured up to 5e-5 for BN-bias gradients); 1e-4 sits above
# that and below every error the fusion could make (a wrong eps, momentum, CELU alpha, ghost
# grouping or frozen weight moves values by 1e-3 or more). Only the first step and no conv
# gradients: a float32 near-tie in a max-pool window can pick another maximum (measured: one
# window in airbench's last pool, 3.6% of group3.conv2's gradient), max-pool's subgradient
# choice, not the fusion; float64 has no such near-tie and checks every gradient and step.
RTOL_FLOAT32 = 1e-4


def _narrow_airbench(**options) -> nn.Module:
    """airbench94's network (bench/models/airbench94_net.py) at widths 16/32/32; ``options``
    as airbench94_muon_net.py gives them for fast_muon's network."""
    spec = importlib.util.spec_from_file_location("airbench94_net", REPO / "bench/models/airbench94_net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.AirbenchNet(widths=(16, 32, 32), **options)


def _narrow_resnet9(tmp_path) -> nn.Module:
    path = tmp_path / "resnet9_narrow.py"
    path.write_text(narrow_resnet9_source((8, 16, 32, 64)))
    return build_example(str(path))


MODELS = {"page2019": _narrow_resnet9, "fast": lambda tmp_path: _narrow_airbench(),
          "fast_muon": lambda tmp_path: _narrow_airbench(logit_divisor=256, zero_stem_bias=False)}
PAIRS = {"page2019": 8, "fast": 6, "fast_muon": 6}  # BN -> activation pairs of each network


def _graph(name: str, tmp_path, cifar10, fused: bool, checks: bool = False):
    """The recipe's training graph of the narrow network, built from seed 0 either way."""
    torch.manual_seed(0)
    gm = trace(MODELS[name](tmp_path), mode="train")
    images, labels = spread_training_images(cifar10, 512)
    torch.manual_seed(1)  # page2019's whitening draws a fresh 1x1 conv
    recipe = load_recipe(name).to_dict()
    gm, report = training_graph(gm, recipe, images=images, labels=labels, checks=checks, fused_kernels=fused)
    return gm, report


def _fused(gm) -> list[BatchNormActivation]:
    return [m for m in gm.modules() if isinstance(m, BatchNormActivation)]


@pytest.mark.parametrize("name", ["page2019", "fast", "fast_muon"])
def test_the_recipe_graph_holds_fused_modules_only_with_the_flag(name, tmp_path, cifar10):
    on, report = _graph(name, tmp_path, cifar10, fused=True)
    off, report_off = _graph(name, tmp_path, cifar10, fused=False)
    status = {p["name"]: (p["status"], p["rewrites"]) for p in report["passes"]}
    assert status["fuse_bn_activation"] == ("applied", PAIRS[name])
    assert "fuse_bn_activation" not in {p["name"] for p in report_off["passes"]}
    assert not _fused(off)
    fused = _fused(on)
    assert len(fused) == PAIRS[name]
    assert on.state_dict().keys() == off.state_dict().keys()  # checkpoints load either way
    bn = load_recipe(name)["batchnorm"]
    for m in fused:
        assert not m.weight.requires_grad and m.bias.requires_grad  # freeze_bn_scale's
        if name == "page2019":
            assert (m.activation, m.alpha, m.ghost_batch_size) == ("celu", 0.3, 32)
        else:
            assert m.activation == "gelu" and m.ghost_batch_size is None
            assert (m.momentum, m.eps) == (bn["momentum"], bn["eps"])  # the recipe's [batchnorm]


@pytest.mark.parametrize("name", ["fast", "fast_muon"])
def test_the_float64_check_accepts_the_fusion_of_airbenchs_network(name, tmp_path, cifar10):
    """The check ``fastgraph train`` runs before training, now that fast and fast_muon list
    the fusion: every recipe pass, then the fusion, in float64 on real images and the stress
    batch, passes with gradients equal to rounding."""
    _, report = _graph(name, tmp_path, cifar10, fused=True, checks=True)
    outcome = next(p for p in report["passes"] if p["name"] == "fuse_bn_activation")
    assert (outcome["status"], outcome["rewrites"]) == ("applied", PAIRS[name])
    assert outcome["max_grad_diff"] is not None and outcome["max_grad_diff"] < 1e-9


def _train(gm, batches, dtype):
    """STEPS SGD steps in ``dtype``: (outputs, gradients, BN running statistics, weights) per step."""
    gm = copy.deepcopy(gm).to(dtype).train()
    params = [p for p in gm.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR, momentum=0.9)
    seen = []
    for x, y in batches:
        out = gm(x.to(dtype))
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(out, y, label_smoothing=0.2).backward()
        grads = {n: p.grad.clone() for n, p in gm.named_parameters() if p.grad is not None}
        opt.step()
        stats = {n: b.clone() for n, b in gm.named_buffers() if "running" in n}
        seen.append((out.detach(), grads, stats, {n: p.detach().clone() for n, p in gm.named_parameters()}))
    return seen


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the scale of a (its largest magnitude)."""
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))


def _assert_close(da: dict, db: dict, rtol: float, what) -> None:
    assert da.keys() == db.keys(), what
    worst = max(da, key=lambda k: _close(da[k], db[k]))
    assert _close(da[worst], db[worst]) < rtol, (what, worst, _close(da[worst], db[worst]))


@pytest.mark.parametrize("name", ["page2019", "fast"])
def test_fused_and_unfused_graphs_train_the_same(name, tmp_path, cifar10):
    fused, _ = _graph(name, tmp_path, cifar10, fused=True)
    plain, _ = _graph(name, tmp_path, cifar10, fused=False)
    assert _fused(fused) and not _fused(plain)
    images, labels = spread_training_images(cifar10, STEPS * BATCH)
    batches = list(zip(images.split(BATCH), labels.split(BATCH), strict=True))
    runs = zip(_train(plain, batches, torch.float64), _train(fused, batches, torch.float64), strict=True)
    for step, ((out_a, *a), (out_b, *b)) in enumerate(runs):
        assert _close(out_a, out_b) < RTOL_FLOAT64, (step, "outputs")
        for kind, da, db in zip(("grad", "running", "weight"), a, b, strict=True):
            _assert_close(da, db, RTOL_FLOAT64, (step, kind))
    (out_a, grads_a, stats_a, _), = _train(plain, batches[:1], torch.float32)
    (out_b, grads_b, stats_b, _), = _train(fused, batches[:1], torch.float32)
    assert _close(out_a, out_b) < RTOL_FLOAT32
    _assert_close(stats_a, stats_b, RTOL_FLOAT32, "float32 running statistics")
    biases = [k for k in grads_a if "norm" in k or k.startswith(("prep.1", "layer"))]
    assert biases
    _assert_close({k: grads_a[k] for k in biases if k.endswith(".bias")},
                  {k: grads_b[k] for k in biases if k.endswith(".bias")}, RTOL_FLOAT32, "float32 BN biases")


def test_the_fused_training_module_compiles_without_breaks_or_recompiles(tmp_path, cifar10):
    import torch._dynamo

    gm, _ = _graph("page2019", tmp_path, cifar10, fused=True)
    images, labels = spread_training_images(cifar10, 2 * BATCH)
    explained = torch._dynamo.explain(copy.deepcopy(gm))(images[:BATCH])
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(gm, backend="aot_eager")
    opt = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=LR)
    with torch._dynamo.config.patch(error_on_recompile=True):  # a second compile raises
        for x, y in zip(images.split(BATCH), labels.split(BATCH), strict=True):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(compiled(x), y).backward()
            opt.step()
    assert int(gm.get_submodule("prep.1").num_batches_tracked) == 2
    torch._dynamo.reset()


def test_the_cli_flag_turns_the_fused_kernels_off():
    import argparse

    from fastgraph.cli.train import add_arguments
    from fastgraph.training.options import TrainOptions

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["m.py", "--recipe", "fast"]).fused_kernels is True
    assert parser.parse_args(["m.py", "--recipe", "fast", "--no-fused-kernels"]).fused_kernels is False
    assert TrainOptions(model_path="m.py", recipe=load_recipe("fast")).fused_kernels is True
