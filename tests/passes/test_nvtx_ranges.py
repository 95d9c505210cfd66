"""nvtx_ranges: every module call inside a named range; the function, its gradients and
compilation are untouched, and a CPU torch.profiler trace shows the ranges by module name."""

from __future__ import annotations

import importlib.util

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from fastgraph.core import nvtx
from fastgraph.core.pass_manager import run_passes
from fastgraph.passes import get, rewrite_count

nvtx_ranges = get("nvtx_ranges").fn


def module_calls(gm: fx.GraphModule) -> list[str]:
    return [n.target for n in gm.graph.nodes if n.op == "call_module"]


def test_same_outputs_and_gradients_and_ranges_named_by_module(example_graph, real64, same_function, frozen):
    gm = example_graph("resnet20.py")
    untouched = frozen(gm)
    out = nvtx_ranges(gm)
    untouched()
    assert rewrite_count(gm, out) == len(module_calls(gm)) > 0
    assert nvtx.range_names(out) == module_calls(gm)
    assert module_calls(out) == module_calls(gm)  # same modules, same order, same parameter names
    x, y = real64(16)
    same_function(gm.double(), out.double(), x, y, train=True)


def test_pass_manager_verifies_it_as_exact(example_graph, real_batch):
    gm = example_graph("preact_resnet20.py")
    x, y = real_batch
    out, report = run_passes(gm, ["nvtx_ranges"], mode="train", batch=(x[:16], y[:16]))
    (outcome,) = report.outcomes
    assert outcome.status == "applied" and outcome.exactness == "exact"
    assert outcome.max_output_diff == 0.0 and outcome.max_grad_diff == 0.0


def test_cpu_profiler_trace_shows_one_range_per_module_call(example_graph, real_batch):
    gm = example_graph("resnet20.py")
    out = nvtx_ranges(gm)
    x, y = real_batch
    expected = ("nvtx" if importlib.util.find_spec("nvtx") else
                "torch.cuda.nvtx" if torch.cuda.is_available() else "none")
    assert nvtx.backend() == expected
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with nvtx.range("forward"):
            loss = F.cross_entropy(out(x[:8]), y[:8])
        loss.backward()
    names = [e.name for e in prof.events() if e.name in set(module_calls(gm)) | {"forward"}]
    assert sorted(names) == sorted(module_calls(gm) + ["forward"])
    # every forward convolution ran inside the range of the module that owns it
    conv_calls = [t for t in module_calls(gm) if isinstance(gm.get_submodule(t), nn.Conv2d)]
    convs = [e for e in prof.events() if e.name == "aten::conv2d"]
    assert sorted(e.cpu_parent.name for e in convs) == sorted(conv_calls)
    assert not nvtx._open_ranges()  # every range that opened was closed


def test_iterate_marks_every_batch_and_yields_it_unchanged(real_batch):
    x, y = real_batch
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        seen = list(nvtx.iterate(iter(batches), "data"))
    assert len(seen) == 4 and all(a[0] is b[0] and a[1] is b[1] for a, b in zip(seen, batches, strict=True))
    # one range per batch, and one for the fetch that finds the loader exhausted
    assert sum(e.name == "data" for e in prof.events()) == 5
    assert not nvtx._open_ranges()


def test_ranges_record_nothing_without_a_profiler(example_graph, real_batch):
    gm = example_graph("resnet20.py")
    out = nvtx_ranges(gm)
    assert not torch.autograd._profiler_enabled()
    opened = []
    original = nvtx._enter

    def spy(name):
        original(name)
        opened.append(nvtx._open_ranges()[-1])

    nvtx._enter = spy
    try:
        out(real_batch[0][:4])
    finally:
        nvtx._enter = original
    assert len(opened) == len(module_calls(gm)) and all(handle is None for handle in opened)


def test_compiles_without_graph_breaks(example_graph, real_batch):
    gm = example_graph("resnet20.py").eval()
    out = nvtx_ranges(gm)
    x = real_batch[0][:4]
    explanation = torch._dynamo.explain(out)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(out, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), gm(x), rtol=0, atol=0)


def test_retrace_keeps_ranges_and_strip_removes_them(example_graph, real_batch):
    gm = example_graph("resnet20.py").eval()
    out = nvtx_ranges(gm)
    again = fx.symbolic_trace(out)
    assert nvtx.range_names(again) == nvtx.range_names(out)
    stripped = nvtx.strip(out)
    assert not any(nvtx.is_range_node(n) for n in stripped.graph.nodes)
    assert len(stripped.graph.nodes) == len(gm.graph.nodes)
    assert nvtx.strip(gm) is gm
    x = real_batch[0][:4]
    with torch.no_grad():
        torch.testing.assert_close(stripped(x), gm(x), rtol=0, atol=0)


class OnlyFunctions(nn.Module):
    def forward(self, x):
        return F.relu(x).mean((2, 3))


def test_nothing_to_wrap_returns_the_input():
    gm = fx.symbolic_trace(OnlyFunctions())
    assert nvtx_ranges(gm) is gm


def test_a_graph_with_ranges_is_left_alone(example_graph):
    out = nvtx_ranges(example_graph("resnet20.py"))
    assert nvtx_ranges(out) is out
