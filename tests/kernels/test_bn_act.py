"""The fused BatchNorm + activation kernels against F.batch_norm + the activation: outputs,
gradients (input, weight, bias) and running statistics, on irregular shapes, both memory
formats, every activation, ghost batches, eval mode; the module, the operator under
torch.compile, and the PyTorch fallback."""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from fastgraph.core.modules import GhostBatchNorm, GhostBatchSizeError
from fastgraph.kernels import bn_act as bn
from fastgraph.kernels._triton import triton
from fastgraph.kernels.bn_act import BatchNormActivation, bn_act, bn_act_reference

pytestmark = pytest.mark.kernels


def _interpreter_loops_fail() -> bool:
    """Triton < 3.7's interpreter turns a runtime loop bound into a Python int with ``int()`` of a
    one-element array, which numpy refuses from 2.4 on (Triton 3.7 squeezes it first)."""
    if triton is None or tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 7):
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            int(np.array([1]))
        except TypeError:
            return True
    return False


# The statistics kernels loop over a runtime number of row tiles and ghost batches; the
# compiled kernels are unaffected (test_kernels_compile_for_h100 still runs).
interpreted_loops = pytest.mark.skipif(
    _interpreter_loops_fail(),
    reason=f"Triton {getattr(triton, '__version__', '')}'s interpreter cannot run loops with runtime "
           f"bounds under numpy {np.__version__} (int() of a one-element array); fixed in Triton 3.7")


def _inputs(shape, *, channels_last=False, affine=True, offset=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    x = torch.randn(shape, generator=g) * 2 + offset
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.rand(c, generator=g) + 0.5 if affine else None
    bias = torch.randn(c, generator=g) if affine else None
    running = (torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5)
    dy = torch.randn(shape, generator=g)
    return x, weight, bias, running, dy


def _run(fn, x, weight, bias, running, dy, **kw):
    """Forward + backward of ``fn``; returns (y, dx, dweight, dbias, running_mean, running_var)."""
    x = x.clone().requires_grad_()
    params = [p.clone().requires_grad_() if p is not None else None for p in (weight, bias)]
    rm, rv = (r.clone() for r in running)
    y = fn(x, rm, rv, *params, **kw)
    y.backward(dy)
    grads = [p.grad if p is not None else None for p in params]
    return y.detach(), x.grad, *grads, rm, rv


def _compare(got, want, count):
    """fp32 tolerances: elementwise results to ~1e-5; weight/bias gradients are sums of
    ``count`` terms per channel, so their absolute tolerance grows with it."""
    names = ("y", "dx", "dweight", "dbias", "running_mean", "running_var")
    for name, a, b in zip(names, got, want, strict=True):
        if b is None:
            assert a is None, name
            continue
        atol = 2e-6 * count if name in ("dweight", "dbias") else 2e-5
        assert_close(a, b, rtol=1e-4, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


CASES = [
    # shape, activation, alpha, ghost_splits, channels_last, affine
    ((5, 3, 4, 4), "celu", 0.075, 1, False, True),  # Page's alpha; N odd, C=3
    ((6, 5, 3, 3), "gelu", 1.0, 3, False, True),  # ghost batches of 2, odd spatial size
    ((4, 24, 2, 2), "silu", 1.0, 2, True, True),  # channels_last
    ((7, 5, 1, 1), "identity", 1.0, 1, False, True),  # H = W = 1
    ((8, 3, 5, 7), "celu", 0.3, 4, True, False),  # no affine, channels_last, ghost batches
    ((2, 40, 3, 5), "gelu", 1.0, 1, True, True),  # more channels than one block
    ((68, 3, 2, 2), "silu", 1.0, 34, False, True),  # more ghost batches than one tile of them
]


@interpreted_loops
@pytest.mark.parametrize("shape, activation, alpha, splits, channels_last, affine", CASES)
def test_training_matches_reference(shape, activation, alpha, splits, channels_last, affine):
    x, weight, bias, running, dy = _inputs(shape, channels_last=channels_last, affine=affine)
    kw = dict(training=True, momentum=0.3, activation=activation, alpha=alpha, ghost_splits=splits)
    got = _run(bn_act, x, weight, bias, running, dy, **kw)
    want = _run(bn_act_reference, x, weight, bias, running, dy, **kw)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert got[0].is_contiguous(memory_format=fmt) and got[1].is_contiguous(memory_format=fmt)
    assert not torch.equal(got[4], running[0])  # the running statistics moved
    _compare(got, want, shape[0] * shape[2] * shape[3])


@interpreted_loops
@pytest.mark.parametrize("shape, activation, channels_last", [
    ((1, 5, 3, 3), "celu", False),  # N = 1 is fine in eval
    ((3, 24, 1, 1), "gelu", True),
    ((2, 3, 4, 4), "silu", False),
])
def test_eval_uses_running_statistics(shape, activation, channels_last):
    x, weight, bias, running, dy = _inputs(shape, channels_last=channels_last)
    kw = dict(training=False, activation=activation, alpha=0.5)
    got = _run(bn_act, x, weight, bias, running, dy, **kw)
    want = _run(bn_act_reference, x, weight, bias, running, dy, **kw)
    assert torch.equal(got[4], running[0]) and torch.equal(got[5], running[1])
    _compare(got, want, shape[0] * shape[2] * shape[3])


@interpreted_loops
@pytest.mark.parametrize("shape, splits, channels_last, config, tile", [
    ((4, 24, 16, 16), 2, False, None, None),  # tiles inside one sample, several chunks per ghost batch
    ((4, 24, 16, 16), 2, True, None, None),
    ((30, 5, 7, 7), 3, False, None, None),  # H*W not a power of two: tiles span samples
    ((8, 40, 8, 8), 4, True, None, None),
    ((16, 8, 9, 9), 1, True, None, None),  # one ghost batch, channels_last: rows read linearly
    ((4, 3, 16, 16), 1, False, bn._Config(16, 4, True, 1000, 4), None),  # 11 chunks in a 16-row tile
    # 16 ghost batches read 1 and 2 at a time: the running-stat and dweight loops take several turns
    ((32, 8, 4, 4), 16, True, bn._Config(4, 8, True, 4096, 4), 16),
])
def test_gpu_tiling_under_the_interpreter(shape, splits, channels_last, config, tile, monkeypatch):
    """The tile shapes and chunking the kernels use on a GPU give the reference's results."""
    if tile is not None:
        monkeypatch.setattr(bn, "_TILE", tile)
    x, weight, bias, running, dy = _inputs(shape, channels_last=channels_last)
    n, c, h, w = shape
    rows = (n // splits) * h * w
    cfg = config or bn._config("cuda", c, h * w, rows, channels_last, programs=16, groups=splits)
    assert cfg.chunks(rows, splits, c)[1] > 1  # the chunk merge is exercised

    def fused(x, rm, rv, weight, bias, **kw):
        class Fn(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, weight, bias):
                y, mean, invstd, new_rm, new_rv = bn._forward_triton(
                    x, rm, rv, weight, bias, True, 0.1, 1e-5, "gelu", 1.0, splits, config=cfg)
                rm.copy_(new_rm), rv.copy_(new_rv)
                ctx.save_for_backward(x, weight, bias, mean, invstd)
                return y

            @staticmethod
            def backward(ctx, dy):
                x, weight, bias, mean, invstd = ctx.saved_tensors
                return bn._backward_triton(dy, x, weight, bias, mean, invstd, True, "gelu", 1.0, config=cfg)

        return Fn.apply(x, weight, bias)

    got = _run(fused, x, weight, bias, running, dy)
    want = _run(bn_act_reference, x, weight, bias, running, dy, training=True, activation="gelu",
                ghost_splits=splits)
    _compare(got, want, n * h * w)


class _Launches(TorchDispatchMode):
    """Records the kernel launches (without running them) and the ATen ops between them."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.events = []
        monkeypatch.setattr(bn, "_wrap", self._wrap)

    def _wrap(self, kernel):
        name = getattr(kernel, "fn", kernel).__name__
        events = self.events

        class Launcher:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: events.append(("launch", name))

        return Launcher()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.events.append(("op", func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))

    def launches(self):
        return [name for kind, name in self.events if kind == "launch"]

    def ops(self):
        return {name for kind, name in self.events if kind == "op"}


_ALLOCATIONS = {"empty", "empty_strided", "empty_like", "new_empty"}


@pytest.mark.parametrize("shape, splits, channels_last", [
    ((16, 8, 5, 5), 1, True), ((16, 8, 4, 4), 4, True), ((6, 5, 3, 3), 3, False)])
def test_launches_per_call(shape, splits, channels_last, monkeypatch):
    """Training forward: statistics, then normalise (which merges the chunk statistics and
    updates the running statistics itself); eval forward: one launch; backward: two. Between
    launches the launchers only allocate their outputs and scratch space."""
    x, weight, bias, running, dy = _inputs(shape, channels_last=channels_last)
    dy = dy.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    n, c = shape[:2]
    mean, invstd = torch.zeros(splits, c), torch.ones(splits, c)
    calls = {
        "train": (lambda: bn._forward_triton(x, *running, weight, bias, True, 0.1, 1e-5, "celu", 0.3, splits),
                  ["_bn_stats_partial", "_bn_act_fwd"]),
        "eval": (lambda: bn._forward_triton(x, *running, weight, bias, False, 0.1, 1e-5, "gelu", 1.0, 1),
                 ["_bn_act_fwd"]),
        "backward": (lambda: bn._backward_triton(dy, x, weight, bias, mean, invstd, True, "silu", 1.0),
                     ["_bn_act_bwd_partial", "_bn_act_bwd_dx"]),
    }
    for what, (call, kernels) in calls.items():
        with _Launches(monkeypatch) as rec:
            call()
        assert rec.launches() == kernels, what
        assert rec.ops() <= _ALLOCATIONS, (what, rec.ops() - _ALLOCATIONS)


@interpreted_loops
def test_statistics_survive_a_large_mean():
    """Chan's merge keeps the variance of x = 1000 + noise accurate in float32 (E[x^2] - E[x]^2
    would lose it to cancellation)."""
    x = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 1000.0
    rm, rv = torch.zeros(4), torch.ones(4)
    bn_act(x.float(), rm, rv, None, None, training=True, momentum=1.0, activation="identity")
    assert_close(rm, x.mean(dim=(0, 2, 3)).float(), rtol=1e-6, atol=0)
    assert_close(rv, x.var(dim=(0, 2, 3)).float(), rtol=1e-3, atol=0)


@interpreted_loops
@pytest.mark.parametrize("training", [True, False])
def test_celu_with_large_positive_inputs_overflows_nothing(training):
    """CELU computes exp(z / alpha) only for z <= 0: at Page's alpha of 0.075 a normalised
    z of 7 would give exp(93), past float32's range, in the branch tl.where drops. The result
    was right but the kernels produced inf (the interpreter's numpy warned of it)."""
    x, weight, bias, running, dy = _inputs((6, 3, 4, 4), seed=1)
    bias = bias + 8.0  # z = xhat * weight + bias: most of it above 7
    kw = dict(training=training, momentum=0.3, activation="celu", alpha=0.075)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = _run(bn_act, x, weight, bias, running, dy, **kw)
    _compare(got, _run(bn_act_reference, x, weight, bias, running, dy, **kw), 6 * 4 * 4)


@interpreted_loops
@pytest.mark.parametrize("splits, channels_last, config", [
    (1, False, None), (2, True, None), (1, True, bn._Config(16, 4, True, 1000, 4)),
    (2, False, bn._Config(16, 4, True, 1000, 4))])
def test_normalised_output_survives_a_large_mean(splits, channels_last, config):
    """y = (x - mean) * scale + bias keeps x = 4096 + noise to about float32's resolution of x
    (ulp(4096) = 4.9e-4, over std 1); x * scale + (bias - mean * scale) loses several times that
    to cancellation. The chunk statistics are merged as deviations from a chunk's mean, so the
    float32 sums never add up values of size |mean|."""
    x = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(3)) + 4096.0
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    rm, rv = torch.zeros(4), torch.ones(4)
    y, *_, new_rv = bn._forward_triton(x, rm, rv, None, None, True, 1.0, 1e-5, "identity", 1.0, splits,
                                       config=config)
    xg = x.double().reshape(16 // splits, splits, 4, 8, 8)
    mean, var = xg.mean(dim=(0, 3, 4), keepdim=True), xg.var(dim=(0, 3, 4), correction=0, keepdim=True)
    want = ((xg - mean) / torch.sqrt(var + 1e-5)).reshape(x.shape)
    assert (y.double() - want).abs().max() < 4e-4
    want_rv = xg.var(dim=(0, 3, 4)).mean(0).float()
    assert_close(new_rv, want_rv, rtol=2e-4, atol=0)


def test_float64_runs_pytorch_ops_in_float64():
    """The pass manager checks passes in float64: the operator keeps float64 precision."""
    x, weight, bias, running, dy = _inputs((6, 5, 3, 3))
    x, weight, bias, dy = x.double(), weight.double(), bias.double(), dy.double()
    running = tuple(r.double() for r in running)
    # alpha = 0.5 is exact in float32: PyTorch's CELU backward rounds alpha to float32.
    kw = dict(training=True, activation="celu", alpha=0.5, ghost_splits=2)
    _compare_64 = dict(rtol=1e-12, atol=1e-12)
    for a, b in zip(_run(bn_act, x, weight, bias, running, dy, **kw),
                    _run(bn_act_reference, x, weight, bias, running, dy, **kw), strict=True):
        assert a.dtype == torch.float64
        assert_close(a, b, **_compare_64)


@pytest.mark.parametrize("activation", bn.ACTIVATIONS)
@pytest.mark.parametrize("training", [True, False])
def test_pytorch_path_backward_gradcheck(activation, training):
    """The closed-form backward of the PyTorch path (CPU graphs under torch.compile)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, generator=g, requires_grad=True)
    w = (torch.rand(3, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, generator=g, requires_grad=True)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)

    def f(x, w, b):
        return bn_act(x, None if training else rm, None if training else rv, w, b, training=training,
                      activation=activation, alpha=0.7, ghost_splits=2 if training else 1)

    assert torch.autograd.gradcheck(f, (x, w, b))


@interpreted_loops
def test_frozen_weight_gets_no_gradient():
    x, weight, bias, running, dy = _inputs((4, 5, 3, 3))
    weight.requires_grad_(False)
    b = bias.clone().requires_grad_()
    bn_act(x.requires_grad_(), *running, weight, b, training=True).backward(dy)
    assert weight.grad is None and b.grad is not None and x.grad is not None


@pytest.mark.parametrize("kw, match", [
    (dict(ghost_splits=3), "ghost batches"),
    (dict(x=torch.randn(1, 3, 1, 1)), "more than 1 value"),
    (dict(training=False, running_mean=None, running_var=None), "running_mean"),
    (dict(activation="relu"), "activation"),
    (dict(weight=torch.ones(4)), "weight"),
])
def test_bad_arguments_raise(kw, match):
    args = dict(x=torch.randn(4, 3, 2, 2), running_mean=torch.zeros(3), running_var=torch.ones(3),
                weight=torch.ones(3), bias=torch.zeros(3), training=True)
    args.update(kw)
    for fn in (bn_act, bn_act_reference):
        with pytest.raises(ValueError, match=match):
            fn(**args)


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 1e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("param_dtype", ["float32", "same"])
def test_half_precision_on_the_pytorch_path(dtype, tol, param_dtype):
    """float16 and bfloat16 inputs (fp32 parameters as under autocast, or a .half() module's):
    on the CPU the operator's PyTorch path, computing in float32, against the reference."""
    x, weight, bias, running, dy = _inputs((6, 5, 3, 3))
    pdt = torch.float32 if param_dtype == "float32" else dtype
    x, dy = x.to(dtype), dy.to(dtype)
    weight, bias = weight.to(pdt), bias.to(pdt)
    running = tuple(r.to(pdt) for r in running)
    kw = dict(training=True, momentum=0.3, activation="gelu", ghost_splits=3)
    got = _run(bn_act, x, weight, bias, running, dy, **kw)
    want = _run(bn_act_reference, x, weight, bias, running, dy, **kw)
    names = ("y", "dx", "dweight", "dbias", "running_mean", "running_var")
    for name, a, b in zip(names, got, want, strict=True):
        assert a.dtype == b.dtype == (dtype if name in ("y", "dx") else pdt), name
        assert_close(a.float(), b.float(), rtol=tol, atol=tol * b.float().abs().max().item(), msg=name)


# ----------------------------------------------------------------------------- eager path and operator


@interpreted_loops
@pytest.mark.parametrize("training", [True, False])
def test_eager_function_and_operator_give_the_same_bits(training):
    """Eager calls run _BnActFunction, traced ones the fastgraph::bn_act operator with its
    registered autograd: the same implementations, hence bit-identical outputs, saved
    statistics, new running statistics and gradients."""
    x, weight, bias, running, dy = _inputs((6, 5, 3, 3), channels_last=True)
    rest = (training, 0.3, 1e-5, "celu", 0.3, 2 if training else 1)
    results = []
    for op in (bn._BnActFunction.apply, bn._bn_act_op):
        xx, w, b = (t.clone().requires_grad_() for t in (x, weight, bias))
        outputs = op(xx, *(r.clone() for r in running), w, b, *rest)
        outputs[0].backward(dy)
        results.append((*outputs, xx.grad, w.grad, b.grad))
    for i, (a, b) in enumerate(zip(*results, strict=True)):
        assert torch.equal(a, b), i


class _Ops(TorchDispatchMode):
    """Records the names of the operators that reach the dispatcher."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_eager_calls_skip_the_operator_and_traced_calls_keep_it():
    """Eager, the autograd node is _BnActFunction's and no fastgraph operator is dispatched;
    under a dispatch mode (make_fx, fake tensors, FlopCounterMode) and in Dynamo's graph the call
    is the fastgraph::bn_act operator, which is what Inductor lowers to the Triton kernels.
    float64 (the PyTorch path): the choice does not depend on the dtype."""
    x, weight, bias, running, _ = _inputs((4, 3, 2, 2))
    x, weight, bias = (t.double() for t in (x, weight, bias))
    running = tuple(r.double() for r in running)
    x.requires_grad_()

    def call(x):
        return bn_act(x, *(r.clone() for r in running), weight, bias, training=True, activation="gelu")

    with _Ops() as seen:
        traced = call(x)
    assert "bn_act" in seen.names
    eager = call(x)
    assert type(eager.grad_fn).__name__ == "_BnActFunctionBackward"
    assert type(traced.grad_fn).__name__ != "_BnActFunctionBackward"
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch.compile(call, backend=capture, fullgraph=True)(x)
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert torch.ops.fastgraph.bn_act.default in targets
    torch._dynamo.reset()


def _noop_kernel(x_ptr):
    pass


def test_eager_launches_bypass_wrap_triton():
    """On a GPU the kernels are JIT functions: traced launches go through wrap_triton (so that
    torch.compile records them), eager ones launch directly, not through its higher-order
    operator. Checked on a JIT function built without the interpreter."""
    from triton.runtime.jit import JITFunction

    kernel = JITFunction(_noop_kernel)
    if hasattr(torch.library, "wrap_triton"):
        assert bn._wrap(kernel) is not kernel
    assert bn._launched_directly(bn._wrap, kernel) is kernel
    assert not bn._launch.direct


# ----------------------------------------------------------------------------- the module


@interpreted_loops
def test_module_is_a_drop_in_for_batchnorm2d():
    bn2d = nn.BatchNorm2d(5, momentum=0.2, eps=1e-4)
    bn2d.weight.data.uniform_(0.5, 1.5), bn2d.bias.data.normal_()
    x = torch.randn(6, 5, 4, 4)
    bn2d(x)  # non-trivial running statistics and num_batches_tracked
    fused = BatchNormActivation(5, activation="silu", momentum=0.2, eps=1e-4)
    assert list(fused.state_dict()) == list(bn2d.state_dict())
    fused.load_state_dict(bn2d.state_dict())
    for train in (True, False):
        bn2d.train(train), fused.train(train)
        assert_close(fused(x), F.silu(bn2d(x)), rtol=1e-5, atol=1e-5)
    for key, value in bn2d.state_dict().items():
        assert_close(fused.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert int(fused.num_batches_tracked) == 2


@interpreted_loops
def test_module_ghost_batch_size_matches_ghost_batchnorm():
    """``ghost_batch_size`` groups samples exactly as fastgraph.core.modules.GhostBatchNorm does."""
    ghost = GhostBatchNorm(4, ghost_batch_size=3)
    fused = BatchNormActivation(4, activation="celu", alpha=0.3, ghost_batch_size=3)
    x = torch.randn(12, 4, 3, 3, generator=torch.Generator().manual_seed(6))
    assert_close(fused(x), F.celu(ghost(x), 0.3), rtol=1e-5, atol=1e-5)
    assert_close(fused.running_mean, ghost.running_mean, rtol=1e-5, atol=1e-7)
    assert_close(fused.running_var, ghost.running_var, rtol=1e-5, atol=1e-7)
    with pytest.raises(GhostBatchSizeError):
        fused(torch.randn(10, 4, 3, 3))


@interpreted_loops
def test_compiled_model_has_no_graph_break_and_matches_eager():
    """torch.compile(fullgraph=True) fails on any graph break; on the CPU the operator's graph
    holds the PyTorch path, eagerly the interpreted Triton kernels run."""
    torch.manual_seed(0)
    eager = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), BatchNormActivation(8, "celu", alpha=0.3, ghost_splits=2),
        nn.Conv2d(8, 6, 3, bias=False), BatchNormActivation(6, "gelu"),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 10),
    )
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    x = torch.randn(8, 3, 6, 6)
    for model in (eager, compiled):
        model(x).square().mean().backward()
    assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)  # second step, updated statistics
    for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters(), strict=True):
        assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    for (name, b), c in zip(eager.named_buffers(), compiled_model.buffers(), strict=True):
        assert_close(c, b, rtol=1e-5, atol=1e-6, msg=name)
    eager.eval(), compiled_model.eval()
    assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_compiled_kernels_on_cuda(run_on_gpu):
    run_on_gpu("""
import torch
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode
from fastgraph.kernels.bn_act import bn_act, bn_act_reference, BatchNormActivation
torch.manual_seed(0)
for shape, splits in (((512, 64, 32, 32), 16), ((64, 24, 7, 7), 2), ((33, 5, 4, 4), 1)):
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2), (torch.float16, 1e-2)):
        for cl in (True, False):
            for act in ("celu", "gelu", "silu"):
                x = (torch.randn(shape, device="cuda") * 2 + 1).to(dtype)
                if cl:
                    x = x.contiguous(memory_format=torch.channels_last)
                c = shape[1]
                out = []
                for fn in (bn_act, bn_act_reference):
                    xx = x.clone().requires_grad_()
                    w = torch.linspace(0.5, 1.5, c, device="cuda", requires_grad=True)
                    b = torch.linspace(-1, 1, c, device="cuda", requires_grad=True)
                    rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
                    y = fn(xx, rm, rv, w, b, training=True, activation=act, alpha=0.3, ghost_splits=splits)
                    y.float().square().sum().backward()
                    per_channel = x[:, 0].numel()  # weight/bias grads are sums over it
                    out.append((y.float(), xx.grad.float(), w.grad / per_channel, b.grad / per_channel,
                                rm, rv))
                for a, r in zip(*out, strict=True):
                    assert_close(a, r, rtol=tol, atol=tol)
model = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, padding=1), BatchNormActivation(64, "gelu")).cuda()
compiled = torch.compile(model, fullgraph=True)
x = torch.randn(256, 3, 32, 32, device="cuda")
compiled(x).sum().backward()
assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
""")


def test_everything_works_without_triton():
    """Where triton is not installed both modules import, and the public functions, the module
    and torch.compile run on the PyTorch paths."""
    code = """
import sys
sys.modules["triton"] = None  # import triton now raises ImportError
import torch
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode
from fastgraph.kernels import augment as A, bn_act as B
assert not B.HAS_TRITON
g = torch.Generator().manual_seed(0)
images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, generator=g)
shift, flip, cutout = A.draw_augmentation(4, g, pad=2, cutout_size=3, image_size=(8, 8))
kw = dict(mean=(120.0, 115.0, 100.0), std=(60.0, 61.0, 62.0), cutout_size=3)
index = torch.tensor([0, 5, 2, 2])
assert torch.equal(A.augment(images, index, shift, flip, cutout, **kw),
                   A.augment_reference(images, index, shift, flip, cutout, **kw))
m = B.BatchNormActivation(3, "celu", alpha=0.5, ghost_splits=2)
x = torch.randn(4, 3, 5, 5, requires_grad=True, generator=g)
m(x).square().sum().backward()
x2 = x.detach().clone().requires_grad_()
w, b = torch.ones(3, requires_grad=True), torch.zeros(3, requires_grad=True)
B.bn_act_reference(x2, None, None, w, b, training=True, activation="celu", alpha=0.5,
                   ghost_splits=2).square().sum().backward()
assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
assert_close(m.weight.grad, w.grad, rtol=1e-4, atol=1e-4)
torch.compile(m, backend="aot_eager", fullgraph=True)(x)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("tiles", ["linear", "ghost"])
def test_kernels_compile_for_h100(compile_for_gpu, tiles):
    """Every bn_act kernel compiles to an sm_90 cubin for bfloat16 (the GPU path cannot run
    here); with the divisibility Triton's launcher infers, channels_last tiles load and store
    as vectors: rows read linearly (one ghost batch, airbench94's shapes) and per sample
    (ghost batches, Page's ResNet-9). The linear tiles are compiled for float16 storage too."""
    ints = ["C", "HW", "G", "M", "K", "s_n", "s_c", "s_p", "tiles_per_chunk"]
    sig = {n: "i32" for n in ints} | {n: "fp32" for n in ("momentum", "eps", "alpha", "inv_alpha")}
    ptrs = ["x_ptr", "y_ptr", "dy_ptr", "dx_ptr"]
    tables = ["part_ptr", "w_ptr", "b_ptr", "rm_ptr", "rv_ptr", "mean_ptr", "invstd_ptr", "new_rm_ptr",
              "new_rv_ptr", "dw_ptr", "db_ptr"]
    sig |= {n: "*fp32" for n in tables}
    divisible = ptrs + tables + ["C", "HW", "M", "s_n", "s_p"]
    # The tiles _config picks on an H100/H200 for these shapes.
    if tiles == "linear":  # (1024, 64, 15, 15), GELU: 120 chunks
        tile = dict(BLOCK_R=128, BLOCK_C=32, IN_SAMPLE=False, LINEAR=True, s_c=1)
        merge = dict(BLOCK_K=128, BLOCK_G=1, BLOCK_J=128)
        act = 2
    else:  # (512, 128, 16, 16), CELU, 16 ghost batches of 16 chunks
        tile = dict(BLOCK_R=128, BLOCK_C=32, IN_SAMPLE=True, LINEAR=False, s_c=1)
        merge = dict(BLOCK_K=16, BLOCK_G=8, BLOCK_J=128)
        act = 1
    flags = dict(HAS_WEIGHT=True, HAS_BIAS=True, ACT=act)
    mod = "fastgraph.kernels.bn_act"
    constexprs = {
        "_bn_stats_partial": tile,
        "_bn_act_fwd": dict(tile, **flags, TRAINING=True, HAS_RUNNING=True, BLOCK_K=merge["BLOCK_K"],
                            BLOCK_G=merge["BLOCK_G"]),
        "_bn_act_bwd_partial": dict(tile, **flags),
        "_bn_act_bwd_dx": dict(tile, **flags, TRAINING=True, BLOCK_K=merge["BLOCK_K"],
                               BLOCK_J=merge["BLOCK_J"]),
    }
    specs = [(mod, kernel, sig | {n: f"*{storage}" for n in ptrs}, consts, divisible, 8)
             for storage in (("bf16", "fp16") if tiles == "linear" else ("bf16",))
             for kernel, consts in constexprs.items()]
    results = compile_for_gpu(specs)
    assert len(results) == len(specs)
    for spec, r in zip(specs, results, strict=True):
        where = f"Triton {triton.__version__}, {spec[2]['x_ptr']}: {r}"
        assert r["cubin_bytes"] > 0 and r["vector_loads"] > 0, where
        if r["kernel"] in ("_bn_act_fwd", "_bn_act_bwd_dx"):
            assert r["vector_stores"] > 0, where
