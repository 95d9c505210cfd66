"""torch.compile(model, backend="fastgraph"): registered through the entry point; on the
example models and a torchvision-style ResNet the compiled model computes what the eager
one does (outputs, gradients of the input and of every parameter, BatchNorm buffers) with
the exact passes applied and counted; Dynamo captures the same graphs, breaks and
recompiles as without it (and as Inductor's own); bad options are one-line user errors; a
pass that is wrong is refused even where the model's fresh statistics hide it.

Most tests compile with the ``eager`` or ``aot_eager`` inner backend (the rewritten graph
runs as Python, through AOTAutograd for the latter): Inductor takes tens of seconds per
graph on a 2-core CPU, so it compiles one small model only."""

from __future__ import annotations

import copy
import runpy
from pathlib import Path

import pytest
import torch
import torch.fx as fx
from torch import nn
from torch._dynamo.exc import BackendCompilerFailed
from torch._dynamo.utils import counters
from torch.testing import assert_close

from fastgraph import passes as registry
from fastgraph.compiler.backend import rewrite_graph, stats
from fastgraph.core.errors import UserError
from fastgraph.passes import copy_module
from fastgraph.passes._fx import batch_norm_call
from fastgraph.passes.fold_bn import fold_bn
from support import build_example, narrow_resnet9_source

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = Path(__file__).parents[1] / "models"


@pytest.fixture(autouse=True)
def _fresh():
    """Every test starts with no compiled frame, no backend record and no Dynamo counters."""
    torch._dynamo.reset()
    stats.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def resnet9() -> nn.Module:
    """examples/resnet9.py at an eighth of the width."""
    namespace = {}
    exec(compile(narrow_resnet9_source(), "resnet9.py", "exec"), namespace)  # noqa: S102 - the example's own text
    return namespace["build_model"]()


def resnet18() -> nn.Module:
    """tests/models' torchvision-style ResNet-18 (quarter width, ImageNet stem, ``out += identity``)."""
    return runpy.run_path(str(MODELS / "resnet.py"))["resnet18"]()


def with_statistics(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """``model`` in eval mode with BatchNorm statistics averaged over ``images`` and random
    affine parameters, so that a fold that gets any of them wrong shows."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in norms:
            bn.momentum = None
        model.train()(images)
        for bn in norms:
            bn.momentum = 0.1
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.3)
    return model.eval()


def run(call, model: nn.Module, x: torch.Tensor, grads: bool):
    """Outputs, and with ``grads`` the gradients of the input and of every parameter of
    ``model``, of one ``call`` (``model`` or its compiled form) on a copy of ``x``; then
    ``model``'s buffers."""
    leaf = x.clone().requires_grad_(grads)
    with torch.set_grad_enabled(grads):
        out = call(leaf)
    result = {"out": out.detach()}
    if grads:
        out.square().mean().backward()
        result["input"] = leaf.grad
        result.update({f"grad:{n}": p.grad for n, p in model.named_parameters()})
    result.update({f"buffer:{n}": b for n, b in model.named_buffers()})
    return result


def compiled_matches_eager(model: nn.Module, x: torch.Tensor, *, grads: bool, **options) -> None:
    """Compile a copy of ``model`` with the fastgraph backend and assert it computes what the
    eager model does on ``x``: outputs, gradients (``grads``), buffers after the call."""
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="fastgraph", options={"backend": "eager", **options})
    got, want = run(compiled, model, x, grads), run(eager, eager, x, grads)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


def applied(pass_name: str) -> list[int]:
    """Rewrites of ``pass_name`` in each graph compiled, and assert no pass was refused."""
    assert not stats.refused, [o.message for g in stats.graphs for o in g.report.outcomes]
    return [sum(o.rewrites for o in g.report.outcomes if o.name == pass_name and o.status == "applied")
            for g in stats.graphs]


def test_registered_through_the_entry_point():
    assert "fastgraph" in torch._dynamo.list_backends()


def test_resnet9_training_matches_eager_with_the_pool_moved(real_batch):
    """Train mode through AOTAutograd: BatchNorm on batch statistics updates its running
    statistics (and num_batches_tracked) as in eager; ReLU moves behind the 3 max-pools."""
    x = real_batch[0][:8]
    compiled_matches_eager(resnet9().train(), x, grads=True, backend="aot_eager")
    assert applied("pool_before_activation") == [3] and applied("fold_bn") == [0]
    graph = stats.graphs[0]
    assert graph.mode == "train" and graph.backend == "aot_eager"
    assert "gradients included" in graph.note
    (outcome,) = graph.report.outcomes
    assert outcome.max_grad_diff is not None and outcome.max_grad_diff <= outcome.tolerance


def test_resnet9_inference_folds_every_batchnorm_in_the_graph(real_batch):
    """Eval mode under no_grad: the 8 conv -> BN pairs fold (computed in the graph from the
    model's own tensors, so a later change of them is seen without a recompile), checked
    on 32 of the 64 images."""
    images = real_batch[0]
    model = with_statistics(resnet9(), images[:32])
    compiled = torch.compile(model, backend="fastgraph", options={"backend": "eager"})
    with torch.no_grad():
        assert_close(compiled(images), model(images), rtol=1e-4, atol=1e-5)
        assert applied("fold_bn") == [8] and applied("pool_before_activation") == [3]
        (graph,) = stats.graphs
        assert graph.mode == "infer" and graph.note == "checked on 32 of the 64 images of the batch"
        model.prep[1].running_mean.add_(0.5)  # statistics change: same guards, the fold follows
        model.prep[1].weight.mul_(-1.0)
        assert_close(compiled(images), copy.deepcopy(model)(images), rtol=1e-4, atol=1e-5)
    assert len(stats.graphs) == 1


def test_resnet20_in_eval_mode_differentiated_through_the_fold(real_batch):
    """An eval-mode model whose gradients are taken: the 19 folds are checked with
    gradients, and the gradients of the compiled model are the eager ones."""
    x = real_batch[0][:8]
    compiled_matches_eager(with_statistics(build_example("resnet20.py"), real_batch[0][:32]), x, grads=True)
    assert applied("fold_bn") == [19] and applied("pool_before_activation") == [0]
    assert stats.graphs[0].mode == "infer" and "gradients included" in stats.graphs[0].note


def test_torchvision_style_resnet18_trains_as_in_eager(real_batch):
    """The ImageNet stem's ReLU -> padded 3x3 max-pool swaps; ``out += identity`` (in place on
    the BatchNorm output) and BatchNorm on 1x1 maps compile and train as in eager."""
    compiled_matches_eager(resnet18().train(), real_batch[0][:8], grads=True)
    assert applied("pool_before_activation") == [1] and applied("fold_bn") == [0]


class Broken(nn.Module):
    """Two conv -> BN -> ReLU -> max-pool stages with a graph break between them."""

    def __init__(self):
        super().__init__()
        self.first, self.second = (nn.Sequential(nn.Conv2d(c, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                                 nn.MaxPool2d(2)) for c in (3, 8))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.first(x)
        torch._dynamo.graph_break()
        return self.head(self.second(x).amax((2, 3)))


def test_no_graph_break_added_and_each_graph_rewritten(real_batch):
    x = real_batch[0][:8]
    model = with_statistics(Broken(), real_batch[0][:32])
    explained = torch._dynamo.explain(model)(x)
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        compiled_matches_eager(model, x, grads=False)
    assert len(stats.graphs) == explained.graph_count == 2 and explained.graph_break_count == 1
    assert counters["stats"]["unique_graphs"] == 2
    assert applied("pool_before_activation") == [1, 1] and applied("fold_bn") == [1, 1]


def test_recompiles_on_a_new_batch_size_as_inductor_does(real_batch):
    """Inductor itself compiles the rewritten graph: batch 4, then 6 (a recompile with a
    dynamic batch size, whose SymInt input the check reads from the batch), then 8 (no
    recompile): as many frame compiles as Inductor alone, and the same outputs."""
    model = with_statistics(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)), real_batch[0][:32])
    images = torch.nn.functional.avg_pool2d(real_batch[0], 2)  # 16x16: a smaller graph to compile
    frames = {}
    for backend in ("inductor", "fastgraph"):
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(copy.deepcopy(model), backend=backend)
        with torch.no_grad():
            for n in (4, 6, 8):
                assert_close(compiled(images[:n]), model(images[:n]), rtol=1e-4, atol=1e-5)
        frames[backend] = (counters["frames"]["ok"], counters["stats"]["unique_graphs"])
    assert frames["fastgraph"] == frames["inductor"] == (2, 2)
    assert [g.backend for g in stats.graphs] == ["inductor", "inductor"]
    assert applied("fold_bn") == [1, 1] and applied("pool_before_activation") == [1, 1]
    dynamic = stats.graphs[1].note
    assert dynamic == "checked on the batch of 6", dynamic


@pytest.mark.parametrize(("options", "message"), [
    ({"passes": "fold_bn,nope"}, "unknown pass 'nope'"),
    ({"passes": ["pool_before_bn"]}, "pass pool_before_bn is training-time"),
    ({"mode": "train", "passes": "fold_bn"}, "pass fold_bn applies in infer mode, not train"),
    ({"mode": "fast"}, "mode must be one of train, infer, not 'fast'"),
    ({"backend": "nope"}, "unknown inner backend 'nope'"),
    ({"pases": "fold_bn"}, "unknown option 'pases'"),
])
def test_bad_options_are_user_errors(options, message):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    compiled = torch.compile(model, backend="fastgraph", options=options)
    with pytest.raises(BackendCompilerFailed) as failed:
        compiled(torch.randn(2, 3, 8, 8))
    assert isinstance(failed.value.inner_exception, UserError)
    assert message in str(failed.value.inner_exception)


def fold_forgetting_the_mean(gm: fx.GraphModule) -> fx.GraphModule:
    """Claims exactness; folds every eval-mode batch norm as if its running mean were 0."""
    zeroed = copy_module(gm)
    for node in list(zeroed.graph.nodes):
        bn = batch_norm_call(zeroed, node)
        if bn is not None and bn.module is None and not bn.batch_statistics:
            with zeroed.graph.inserting_before(node):
                zero = zeroed.graph.call_function(torch.zeros_like, (bn.running_mean,))
            node.replace_input_with(bn.running_mean, zero)
    zeroed.recompile()
    return fold_bn(zeroed)


def test_a_wrong_pass_is_refused_even_on_fresh_statistics(real_batch, monkeypatch):
    """On a fresh model (running mean 0) the wrong fold gives the right outputs; the check
    runs with random statistics and refuses it, and the captured graph goes on unchanged."""
    monkeypatch.setitem(registry.REGISTRY, "fold_forgetting_the_mean", registry.PassInfo(
        "fold_forgetting_the_mean", fold_forgetting_the_mean, True, ("train", "infer")))
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    x = real_batch[0][:8]
    captured = []

    def capture(gm, example_inputs):
        captured.append((gm, example_inputs))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=capture)(x)
        gm, example_inputs = captured[0]
        assert_close(fold_forgetting_the_mean(gm)(*example_inputs)[0], gm(*example_inputs)[0])
        torch._dynamo.reset()
        compiled_matches_eager(model, x, grads=False, passes="fold_forgetting_the_mean,fold_bn")
    (graph,) = stats.graphs
    wrong, honest = graph.report.outcomes
    assert wrong.status == "refused" and "differs" in wrong.message and wrong.rewrites == 1
    assert honest.status == "applied" and honest.rewrites == 1 and honest.max_output_diff <= honest.tolerance
    assert stats.refused == {"fold_forgetting_the_mean": 1} and stats.rewrites == {"fold_bn": 1}


def test_fake_example_inputs_are_checked_on_synthetic_values(real_batch):
    """Given the fake tensors of the graph's metadata instead of real inputs, the passes
    are checked on seeded random tensors of the same shapes, and the outcome says so."""
    model = with_statistics(resnet9(), real_batch[0][:32])
    captured = []

    def capture(gm, example_inputs):
        captured.append((gm, example_inputs))
        return gm.forward

    x = real_batch[0][:4]
    with torch.no_grad():
        torch.compile(model, backend=capture)(x)
        ((gm, example_inputs),) = captured
        fakes = [n.meta["example_value"] for n in gm.graph.find_nodes(op="placeholder")]
        out, outcome = rewrite_graph(gm, fakes, mode="infer")
        assert_close(out(*example_inputs)[0], model(x), rtol=1e-4, atol=1e-5)  # on the real tensors
    assert outcome.note == "checked on the batch of 4 (synthetic: Dynamo gave fake tensors)"
    assert [(o.name, o.status, o.rewrites) for o in outcome.report.outcomes] == [
        ("pool_before_activation", "applied", 3), ("fold_bn", "applied", 8)]
