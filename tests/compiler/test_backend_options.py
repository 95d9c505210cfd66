"""``torch.compile(model, backend="fastgraph", options=...)``: option values of the wrong
kind are one-line user errors that say what is expected (the inner backends listed include
the quick ones, ``eager`` and ``aot_eager``); and a compile that succeeds prints nothing,
even where the graph fixed the batch size (``x.view(x.size(0), -1)``) and the check falls
back from a subset of the batch to all of it, with the compiled model computing what the
eager one does on real CIFAR-10 images."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.exc import BackendCompilerFailed
from torch.testing import assert_close

from fastgraph.compiler.backend import stats
from fastgraph.core.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    stats.reset()
    yield
    torch._dynamo.reset()


def compile_error(options: dict) -> UserError:
    """The ``UserError`` compiling a small model with ``options`` raises (Dynamo wraps it)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    compiled = torch.compile(model, backend="fastgraph", options=options)
    with pytest.raises(BackendCompilerFailed) as failed, torch.no_grad():
        compiled(torch.randn(2, 3, 8, 8))
    assert isinstance(failed.value.inner_exception, UserError)
    return failed.value.inner_exception


@pytest.mark.parametrize("passes", [5, [1], {"fold_bn": 1}])
def test_passes_of_the_wrong_kind_are_user_errors(passes):
    message = str(compile_error({"passes": passes}))
    assert message == ("fastgraph backend: option 'passes' is a list of pass names or a comma-separated "
                       f"string, got {passes!r}")


def test_an_empty_mode_is_refused_not_taken_as_the_default():
    assert "mode must be one of train, infer, not ''" in str(compile_error({"mode": ""}))


def test_an_unknown_inner_backend_lists_the_quick_ones_it_takes():
    message = str(compile_error({"backend": "aot-eager"}))
    known = message.split("known: ")[1].split(", ")
    assert {"inductor", "eager", "aot_eager"} <= set(known) and "fastgraph" not in known


class FlattenByView(nn.Module):
    """The classic ResNet head: ``x.view(x.size(0), -1)`` into a linear layer. Compiled with
    static shapes, the graph holds the batch size as a constant."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 16 * 16, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.fc(x.view(x.size(0), -1))


def test_a_graph_with_a_fixed_batch_size_compiles_silently_and_matches_eager(real_batch, capfd):
    """64 images: more than the check's subset, which this graph cannot run on; the check
    then runs on the whole batch, saying so, and nothing is printed on the way."""
    images = real_batch[0]
    model = FlattenByView()
    with torch.no_grad():
        model.train()(images)  # running statistics of real images, for the fold to get right
    model.eval()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="fastgraph", options={"backend": "eager"})
    with torch.no_grad():
        assert_close(compiled(images), eager(images), rtol=1e-4, atol=1e-5)
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err and "<--- HERE" not in captured.err, captured.err
    (graph,) = stats.graphs
    assert graph.note == "checked on the batch of 64"
    assert {o.name: o.status for o in graph.report.outcomes} == {
        "pool_before_activation": "applied", "fold_bn": "applied"}
