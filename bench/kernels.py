"""Benchmark fastgraph's Triton kernels against eager PyTorch and torch.compile on one CUDA GPU.

    python bench/kernels.py                      # everything
    python bench/kernels.py --only bn_act --recipes fast --no-compile
    python bench/kernels.py --dry-run            # CPU + Triton interpreter, tiny shapes (first
                                                 # bn_act case of each recipe): checks the script
                                                 # end to end, writes no file

What is timed, for CIFAR-10 (3x32x32 images):
- ``augment``: gather + crop (pad/translate) + flip + optional cutout + normalise + cast +
  channels-last, from a uint8 dataset of 50,000 images resident on the GPU (random pixel
  values: the kernel's time does not depend on them), batches of 512 and 1024
  (``--batch-sizes``). Two recipes: Page's (pad 4, flip, cutout 8) and airbench's (pad 2,
  flip, no cutout); float32 and bfloat16 outputs.
- ``bn_act``: training-mode BatchNorm + activation, forward and forward+backward (grads of
  the input, the bias, and the weight where the recipe trains it), bfloat16 channels-last
  (the training format; ``--dtypes`` adds float32 or float16, the recipes' own autocast
  precision), at the shapes the recipes' training graphs run. Those are not written here:
  :func:`derive_bn_cases` builds each recipe's training graph as ``fastgraph train`` does
  (the model file, traced in train mode, rewritten by the recipe's passes with
  ``fastgraph.training.trained.training_graph``, then ``fuse_bn_activation``), moves it to
  the ``meta`` device and propagates a (batch, 3, 32, 32) input through it with
  ``torch.fx.passes.shape_prop.ShapeProp``; every fused BN + activation module gives its
  input shape, activation, CELU alpha, ghost batch size, momentum, eps and whether its
  weight trains. ``fast`` (airbench94, batch 1024: 2x2 stem without padding -> 31x31, then
  pool before BN) gives 64@15x15, 256@7x7, 256@3x3 with GELU; ``page2019`` (ResNet-9,
  batch 512, pool before BN) 64@32x32, 128@16x16, 256@8x8, 512@4x4 with CELU alpha 0.3
  (after ``freeze_bn_scale``) and ghost batches of 32.
Each against the same computation in eager PyTorch and compiled by ``torch.compile``
(Inductor, default mode). The eager bn_act baseline, :func:`eager_bn_act`, is what a PyTorch
model runs (``F.batch_norm`` on the storage dtype, then the activation; ghost batches by one
reshape); compiled, it is Inductor's own fused kernels for the same BN + activation (Inductor
decomposes ``F.batch_norm`` and fuses it with the activation). ``bn_act_reference``, which
upcasts explicitly, computes the same function, but compiled with torch 2.13's ``aot_eager``
backend its backward fails on channels-last ghost batches, so it is not the compiled baseline;
it is the reference the Triton result is checked against before it is timed.

Timing: ``triton.testing.do_bench`` (CUDA events; L2 cache flushed before every run;
warm-up 25 ms, then runs for 100 ms), median and 20th/80th percentiles, milliseconds; the
torch.compile warm-up (compilation) happens before timing. Each implementation is timed two
ways (the rows' ``timing``): ``call``, the Python call as a training step without CUDA
graphs makes it (host work, dispatch and launches included: at these sizes a few
microseconds of launch latency per kernel are a large part of it), and ``graph``, the same
call captured once in a CUDA graph and replayed (``torch.cuda.CUDAGraph``), which is the GPU
time of its kernels alone, as under ``torch.compile(mode="reduce-overhead")`` or a captured
training step. The goals are read off the ``graph`` rows (the kernels' own speed), and off
the ``call`` rows where no graph could be captured. Bandwidth: an explicit byte count
divided by the median time. For bn_act the count is the minimum traffic any implementation
needs (forward: read x, write y; forward+backward adds read x, read dy, write dx), so GB/s
compares implementations on one scale; the kernels' own traffic (module docstring of
``fastgraph.kernels.bn_act``) is also recorded. GB/s is set against the device-to-device
copy bandwidth measured in the same run (a 1 GiB ``copy_``, counting read + write) and
against the hardware profile's peak (``profiles/hardware/<gpu>.toml``), when one matches.

Writes ``bench/results/kernels-<device>-<date>.json`` and ``.md`` (device, torch, triton and
CUDA versions, git commit, date, timing method, every number), with a goal table for bn_act:
per shape and pass, the fused kernels' time, Inductor's, the ratio (goal: faster than Inductor
at every shape) and the fraction of the copy bandwidth (goal: at least 70% forward+backward at
the large shapes, whose input is at least 16 MiB; below that a few microseconds of launch
latency per kernel dominate). Without a CUDA device it exits with status 2 and one line: GPU
numbers are never taken on a CPU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
TIMING_METHOD = ("triton.testing.do_bench: CUDA events, L2 flushed before each run, warmup 25 ms, "
                 "rep 100 ms; median and 20th/80th percentiles in ms; torch.compile warm-up excluded; "
                 "timing 'call': the Python call (host work and launches included); timing 'graph': "
                 "the call captured in a CUDA graph and replayed (GPU time of its kernels)")
DRY_TIMING_METHOD = "dry run: time.perf_counter on the CPU through Triton's interpreter; not a measurement"

BN_RECIPES = ("fast", "page2019")  # the recipes whose training graphs give the bn_act shapes
LARGE_BYTES = 16 << 20  # bn_act input size from which the 70%-of-copy-bandwidth goal applies
COPY_GOAL, INDUCTOR_GOAL = 0.70, 1.0
# (label, pad, cutout size): Page's and airbench's augmentation
AUGMENT_RECIPES = [("page: pad 4, flip, cutout 8", 4, 8), ("airbench: pad 2, flip", 2, 0)]
DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}


@dataclass
class Row:
    kernel: str
    case: str
    shape: list[int]
    dtype: str
    pass_: str  # "fwd" or "fwd+bwd"
    impl: str  # "triton", "eager", "compile"
    timing: str = "call"  # "call": the Python call; "graph": its CUDA graph replayed
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    bytes_min: int = 0
    bytes_kernel: int = 0
    gbps: float | None = None
    frac_copy: float | None = None
    frac_profile: float | None = None
    speedup_vs_eager: float | None = None
    speedup_vs_compile: float | None = None  # torch.compile's median / this one's
    checked: bool | None = None
    error: str | None = None


@dataclass
class Context:
    torch: object
    device: object
    dry_run: bool
    copy_bw: float | None = None  # bytes/s
    profile_bw: float | None = None  # bytes/s
    compile_: bool = True
    rows: list[Row] = field(default_factory=list)


# ----------------------------------------------------------------------------- timing


def _time(ctx: Context, fn) -> tuple[float, float, float]:
    """(median, p20, p80) in ms."""
    if ctx.dry_run:  # one warm-up call (compiles) and one timed: the interpreter is slow
        fn()
        t0 = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t0) * 1e3
        return ms, ms, ms
    import triton.testing

    p50, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
    return p50, p20, p80


def _graphed(ctx: Context, fn):
    """``fn`` captured in a CUDA graph: a function that replays it (same inputs, same output
    buffers). Warmed up first on a side stream, as capture requires (lazy initialisation,
    the allocator's pools, cuDNN and Triton autotuning happen outside the graph)."""
    torch = ctx.torch
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph.replay


def _measure_copy_bandwidth(ctx: Context) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write of a 1 GiB tensor)."""
    torch = ctx.torch
    nbytes = (1 << 20) if ctx.dry_run else (1 << 30)
    src = torch.empty(nbytes, dtype=torch.uint8, device=ctx.device)
    dst = torch.empty_like(src)
    median_ms, _, _ = _time(ctx, lambda: dst.copy_(src))
    return 2 * nbytes / (median_ms * 1e-3)


def _profile_bandwidth(device_name: str):
    """(profile name, display name, bytes/s) of the hardware profile matching the GPU, else None."""
    try:
        from fastgraph.perf.roofline import list_profiles, load_profile
    except ImportError:
        return None
    for name in list_profiles():
        profile = load_profile(name)
        if profile.describes(device_name):  # not a PCIe or NVL card under an SXM profile
            return name, profile.display_name, float(profile.memory_bandwidth)
    return None


def _record(ctx: Context, row: Row, fn, *, graph: bool = True) -> Row:
    """Time ``fn`` into ``row`` (timing "call") and, on a GPU with ``graph``, into a copy of it
    with timing "graph" (its CUDA graph replayed). A failure is recorded in the row's
    ``error`` and the benchmark goes on."""
    _timed(ctx, row, fn)
    if graph and not ctx.dry_run:
        replica = replace(row, timing="graph", median_ms=None, p20_ms=None, p80_ms=None, gbps=None,
                          frac_copy=None, frac_profile=None, error=None)
        try:
            replay = _graphed(ctx, fn)
        except Exception as exc:  # not capturable (a host sync, a CPU fallback): say so, go on
            replica.error = _error_text(exc)
            ctx.rows.append(replica)
        else:
            _timed(ctx, replica, replay)
    return row


def _error_text(exc: Exception) -> str:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first_line}"[:300]


def _timed(ctx: Context, row: Row, fn) -> None:
    try:
        row.median_ms, row.p20_ms, row.p80_ms = _time(ctx, fn)
    except Exception as exc:  # a failing compile must not lose the other numbers
        row.error = _error_text(exc)
        ctx.rows.append(row)
        return
    row.gbps = row.bytes_min / (row.median_ms * 1e-3) / 1e9
    if ctx.copy_bw:
        row.frac_copy = row.gbps * 1e9 / ctx.copy_bw
    if ctx.profile_bw:
        row.frac_profile = row.gbps * 1e9 / ctx.profile_bw
    ctx.rows.append(row)


def _speedups(rows: list[Row]) -> None:
    def key(r):
        return r.kernel, r.case, r.dtype, r.pass_, tuple(r.shape), r.timing

    eager = {key(r): r.median_ms for r in rows if r.impl == "eager"}
    compiled = {key(r): r.median_ms for r in rows if r.impl == "compile"}
    for r in rows:
        base, inductor = eager.get(key(r)), compiled.get(key(r))
        if base and r.median_ms:
            r.speedup_vs_eager = base / r.median_ms
        if inductor and r.median_ms:
            r.speedup_vs_compile = inductor / r.median_ms


def bn_act_goals(rows: list[Row]) -> list[dict]:
    """The bn_act goal read off the rows: per case, dtype and pass, the fused kernels' (impl
    "triton") median ms and GB/s, the fraction of the copy bandwidth, Inductor's median ms and
    the speed-up over it; ``large`` when the input is at least ``LARGE_BYTES``; ``copy_goal``
    (>= 70% of copy bandwidth, fwd+bwd at large shapes, else None) and ``inductor_goal``
    (faster than Inductor), each None where a number is missing. Read off the CUDA-graph rows
    (``timing`` "graph": the kernels' GPU time) where a case has them, else the call rows.

    Two more fractions say where a shortfall comes from. ``ceiling``, minimum bytes over the
    kernels' own bytes (fwd 2/3, fwd+bwd 5/8), is the most of the copy bandwidth the
    two-pass design can show at all, since it reads x again after the statistics; and
    ``frac_copy_kernel_bytes``, the kernels' own bytes per second over the copy bandwidth,
    is how well they stream the bytes they do move (1.0: as fast as a copy)."""
    bn = [r for r in rows if r.kernel == "bn_act"]
    graphed = {(r.case, r.dtype, r.pass_) for r in bn if r.timing == "graph" and r.median_ms is not None}
    compiled = {(r.case, r.dtype, r.pass_, r.timing): r for r in bn if r.impl == "compile"}
    goals = []
    for r in bn:
        key = (r.case, r.dtype, r.pass_)
        if r.impl != "triton" or r.timing != ("graph" if key in graphed else "call"):
            continue
        inductor = compiled.get((*key, r.timing))
        large = r.bytes_min // (2 if r.pass_ == "fwd" else 5) >= LARGE_BYTES
        copy_goal = None
        if large and r.pass_ == "fwd+bwd" and r.frac_copy is not None:
            copy_goal = r.frac_copy >= COPY_GOAL
        ceiling = r.bytes_min / r.bytes_kernel if r.bytes_kernel else None
        kernel_frac = None if r.frac_copy is None or not ceiling else r.frac_copy / ceiling
        goals.append(dict(case=r.case, shape=r.shape, dtype=r.dtype, pass_=r.pass_, timing=r.timing,
                          large=large, triton_ms=r.median_ms, gbps=r.gbps, frac_copy=r.frac_copy,
                          ceiling=ceiling, frac_copy_kernel_bytes=kernel_frac,
                          inductor_ms=inductor.median_ms if inductor else None,
                          speedup_vs_inductor=r.speedup_vs_compile, copy_goal=copy_goal,
                          inductor_goal=None if r.speedup_vs_compile is None
                          else r.speedup_vs_compile > INDUCTOR_GOAL))
    return goals


def _compiled(ctx: Context, fn):
    """``torch.compile(fn)``; each benchmark case is a new shape, so allow one recompilation
    per case and fail loudly (an error row) rather than fall back to eager past the limit."""
    torch = ctx.torch
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, 1024)
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, 4096)
    if hasattr(dynamo_config, "fail_on_recompile_limit_hit"):
        dynamo_config.fail_on_recompile_limit_hit = True
    if ctx.dry_run:  # inductor's C++ build is minutes on a small CPU; aot_eager exercises the path
        return torch.compile(fn, backend="aot_eager", dynamic=False)
    return torch.compile(fn, dynamic=False)


# ----------------------------------------------------------------------------- augment


def bench_augment(ctx: Context, batch_sizes, dtypes) -> None:
    torch = ctx.torch
    from fastgraph.data import CIFAR10_MEAN, CIFAR10_STD
    from fastgraph.kernels.augment import _launch_augment, augment_reference, draw_augmentation

    n_images = 2000 if ctx.dry_run else 50_000
    g = torch.Generator(device=ctx.device).manual_seed(0)
    images = torch.randint(0, 256, (n_images, 3, 32, 32), dtype=torch.uint8, device=ctx.device, generator=g)
    for batch in batch_sizes:
        index = torch.randperm(n_images, device=ctx.device, generator=g)[:batch]
        for label, pad, cutout_size in AUGMENT_RECIPES:
            shift, flip, cutout = draw_augmentation(batch, g, pad=pad, cutout_size=cutout_size)
            for dtype_name in dtypes:
                out_dtype = getattr(torch, DTYPES[dtype_name])
                if ctx.dry_run and out_dtype != torch.float32:
                    continue  # the interpreter has no bfloat16
                kw = dict(mean=CIFAR10_MEAN, std=CIFAR10_STD, pad=pad, pad_mode="reflect",
                          cutout_size=cutout_size, out_dtype=out_dtype, channels_last=True)
                args = (images, index, shift, flip, cutout)
                size = torch.empty((), dtype=out_dtype).element_size()
                nbytes = batch * 3 * 32 * 32 * (1 + size) + batch * 41
                base = dict(kernel="augment", case=label, shape=[batch, 3, 32, 32], dtype=dtype_name,
                            pass_="fwd", bytes_min=nbytes, bytes_kernel=nbytes)
                checked = torch.equal(_launch_augment(*args, **kw), augment_reference(*args, **kw))
                impls = [("triton", _launch_augment), ("eager", augment_reference)]
                if ctx.compile_:
                    impls.append(("compile", _compiled(ctx, augment_reference)))
                for impl, fn in impls:
                    row = Row(impl=impl, checked=checked if impl == "triton" else None, **base)
                    _record(ctx, row, lambda fn=fn, args=args, kw=kw: fn(*args, **kw))


# ----------------------------------------------------------------------------- bn_act


@dataclass(frozen=True)
class BNCase:
    """One BatchNorm + activation shape of a recipe's training graph (see :func:`derive_bn_cases`).

    ``shape`` is the BN input (N, C, H, W) at the recipe's batch size; ``sites`` the qualified
    names of the fused modules that run it; ``ghost_batch_size`` samples per ghost batch, or
    None for plain BatchNorm; ``weight_trained`` whether the BN weight gets a gradient.
    """

    recipe: str
    model: str
    shape: tuple[int, int, int, int]
    activation: str
    alpha: float
    ghost_batch_size: int | None
    momentum: float
    eps: float
    weight_trained: bool
    sites: tuple[str, ...]

    @property
    def label(self) -> str:
        n, c, h, w = self.shape
        ghost = f", ghost {self.ghost_batch_size}" if self.ghost_batch_size else ""
        act = f"celu {self.alpha:g}" if self.activation == "celu" else self.activation
        return f"{self.recipe} {c}x{h}x{w}, {act}{ghost}"


def derive_bn_cases(recipes=BN_RECIPES, batch_size: int | None = None) -> list[BNCase]:
    """The BN + activation shapes each recipe's training graph runs, traced, not written down.

    For each recipe (shipped name or TOML path): its model file (``[""]["model"]``, relative
    to the repository) is loaded, traced in train mode and rewritten by the recipe's passes
    exactly as ``fastgraph train`` builds it (``training_graph``; the data passes get 64
    random images: whitening's filter values do not change any shape), then by
    ``fuse_bn_activation``; the graph moves to the ``meta`` device and ``ShapeProp``
    propagates a float32 (batch, 3, 32, 32) input, batch = ``batch_size`` or the recipe's
    ``[train] batch_size``. No arithmetic runs (a few seconds on a CPU); the traces are cached
    per (recipes, batch size).

    Returns:
        One :class:`BNCase` per distinct (shape, activation, alpha, ghost batch size, momentum,
        eps, weight trained), in graph order, with the sites that share it.

    Raises:
        UserError: unknown recipe, or a model file that cannot be loaded or traced.
        RuntimeError: a recipe whose training graph has no fused BN + activation.
    """
    return list(_derive_bn_cases(tuple(recipes), batch_size))


@functools.cache
def _derive_bn_cases(recipes: tuple[str, ...], batch_size: int | None) -> tuple[BNCase, ...]:
    import torch
    from torch.fx.passes.shape_prop import ShapeProp

    from fastgraph import passes as registry
    from fastgraph.core.loading import load_model
    from fastgraph.core.tracing import trace
    from fastgraph.kernels.bn_act import BatchNormActivation
    from fastgraph.training.recipes import load_recipe
    from fastgraph.training.trained import training_graph

    cases: dict[tuple, BNCase] = {}
    for name in recipes:
        recipe = load_recipe(name)
        model_path = str(REPO / recipe[""]["model"])
        batch = batch_size or int(recipe["train"]["batch_size"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            gm = trace(load_model(model_path), source=model_path, mode="train")
            images, labels = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
            gm, _ = training_graph(gm, recipe.to_dict(), images=images, labels=labels, checks=False)
        gm = registry.get("fuse_bn_activation").fn(gm).to("meta").train()
        ShapeProp(gm).propagate(torch.empty(batch, 3, 32, 32, device="meta"))
        found = 0
        for node in gm.graph.nodes:
            module = gm.get_submodule(node.target) if node.op == "call_module" else None
            if not isinstance(module, BatchNormActivation):
                continue
            found += 1
            shape = tuple(int(d) for d in node.args[0].meta["tensor_meta"].shape)
            weight_trained = module.weight is not None and module.weight.requires_grad
            key = (recipe.name, shape, module.activation, float(module.alpha), module.ghost_batch_size,
                   float(module.momentum), float(module.eps), weight_trained)
            sites = (cases[key].sites if key in cases else ()) + (node.target,)
            cases[key] = BNCase(recipe.name, recipe[""]["model"], shape, module.activation,
                                float(module.alpha), module.ghost_batch_size, float(module.momentum),
                                float(module.eps), weight_trained, sites)
        if not found:
            raise RuntimeError(f"recipe {recipe.name}: its training graph has no fused BN + activation")
    return tuple(cases.values())


def eager_bn_act(x, running_mean, running_var, weight, bias, *, training, activation, alpha, ghost_splits,
                 momentum=0.1, eps=1e-5):
    """What a PyTorch model runs: ``F.batch_norm`` on the storage dtype (cuDNN takes bfloat16
    input with float32 parameters), then the activation; ghost batches as Page's one reshape
    (N, C, H, W) -> (N/S, S*C, H, W) with repeated running statistics, averaged back."""
    import torch.nn.functional as F

    n, c, h, w = x.shape
    if ghost_splits == 1:
        z = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    else:
        rm, rv = running_mean.repeat(ghost_splits), running_var.repeat(ghost_splits)
        grouped = x.reshape(n // ghost_splits, ghost_splits * c, h, w)
        z = F.batch_norm(grouped, rm, rv, weight.repeat(ghost_splits), bias.repeat(ghost_splits), training,
                         momentum, eps).reshape(n, c, h, w)
        running_mean.copy_(rm.view(ghost_splits, c).mean(0))
        running_var.copy_(rv.view(ghost_splits, c).mean(0))
    if activation == "celu":
        return F.celu(z, alpha)
    return F.gelu(z) if activation == "gelu" else F.silu(z)


def _dry_case(case: BNCase) -> BNCase:
    """The case shrunk for the interpreter: batch 16, C / 32 (at least 3), H and W / 8 (at
    least 2), ghost batches of 4."""
    _, c, h, w = case.shape
    shape = (16, max(3, c // 32), max(2, h // 8), max(2, w // 8))
    return BNCase(case.recipe, case.model, shape, case.activation, case.alpha,
                  case.ghost_batch_size and 4, case.momentum, case.eps, case.weight_trained, case.sites)


def bench_bn_act(ctx: Context, cases: list[BNCase], dtypes) -> None:
    torch = ctx.torch
    from fastgraph.kernels.bn_act import bn_act, bn_act_reference

    if ctx.dry_run:  # the first case of each recipe, shrunk: the interpreter is slow
        cases = [c for i, c in enumerate(cases) if i == 0 or c.recipe != cases[i - 1].recipe]
    for case in cases:
        label = case.label
        if ctx.dry_run:
            case = _dry_case(case)
        batch, channels, _, _ = shape = case.shape
        splits = batch // case.ghost_batch_size if case.ghost_batch_size else 1
        for dtype_name in dtypes:
            dtype = getattr(torch, DTYPES[dtype_name])
            if ctx.dry_run and dtype != torch.float32:
                continue
            x = torch.randn(shape, device=ctx.device).to(dtype).contiguous(memory_format=torch.channels_last)
            dy = torch.randn_like(x)
            weight = torch.rand(channels, device=ctx.device) + 0.5
            bias = torch.randn(channels, device=ctx.device)
            running = (torch.zeros(channels, device=ctx.device), torch.ones(channels, device=ctx.device))
            kw = dict(training=True, activation=case.activation, alpha=case.alpha, ghost_splits=splits,
                      momentum=case.momentum, eps=case.eps)
            numel, size = x.numel(), x.element_size()
            base = dict(kernel="bn_act", case=label, shape=list(shape), dtype=dtype_name)

            def run(fn, x=x, kw=kw, running=running, weight=weight, bias=bias):
                return fn(x, *running, weight, bias, **kw)

            checked = _check_bn_act(torch, x, running, weight, bias, dy, kw, bn_act, bn_act_reference)
            impls = [("triton", bn_act), ("eager", eager_bn_act)]
            if ctx.compile_:  # Inductor's own fused kernels for the same BN + activation
                impls.append(("compile", _compiled(ctx, lambda *a, **k: eager_bn_act(*a, **k))))
            for impl, fn in impls:
                row_base = dict(base, impl=impl, checked=checked if impl == "triton" else None)
                _record(ctx, Row(pass_="fwd", bytes_min=2 * numel * size, bytes_kernel=3 * numel * size,
                                 **row_base), lambda fn=fn: run(fn))
                xg = x.detach().requires_grad_()
                wg = weight.detach().requires_grad_(case.weight_trained)
                bg = bias.detach().requires_grad_()
                wrt = (xg, wg, bg) if case.weight_trained else (xg, bg)

                def step(fn=fn, xg=xg, wg=wg, bg=bg, wrt=wrt, dy=dy, kw=kw, running=running):
                    y = fn(xg, *running, wg, bg, **kw)
                    return torch.autograd.grad(y, wrt, dy)

                _record(ctx, Row(pass_="fwd+bwd", bytes_min=5 * numel * size, bytes_kernel=8 * numel * size,
                                 **row_base), step)


def _check_bn_act(torch, x, running, weight, bias, dy, kw, fused, reference) -> bool:
    """Whether the kernels' output and input gradient match the reference (dtype tolerance)."""
    outs = []
    for fn in (fused, reference):
        xg = x.detach().requires_grad_()
        y = fn(xg, *(r.clone() for r in running), weight, bias, **kw)
        (dx,) = torch.autograd.grad(y, (xg,), dy)
        outs.append((y.float(), dx.float()))
    tol = 1e-4 if x.dtype == torch.float32 else 5e-2
    return all(torch.allclose(a, b, rtol=tol, atol=tol) for a, b in zip(outs[0], outs[1], strict=True))


# ----------------------------------------------------------------------------- reporting


def _git_commit() -> tuple[str, bool | None]:
    """(commit, uncommitted changes); ``FASTGRAPH_GIT_COMMIT`` names the commit of a copied
    tree without git history (its changes then unknown: None)."""
    if os.environ.get("FASTGRAPH_GIT_COMMIT"):
        return os.environ["FASTGRAPH_GIT_COMMIT"], None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True,
                                    text=True, check=True).stdout.strip())
        return commit, dirty
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def _table_rows(rows: list[Row]):
    header = ["kernel", "case", "shape", "dtype", "pass", "impl", "timing", "median ms", "p20-p80 ms", "GB/s",
              "% copy BW", "% profile BW", "x eager", "x inductor", "checked"]
    body = []
    for r in rows:
        spread = "-" if r.p20_ms is None else f"{r.p20_ms:.4f}-{r.p80_ms:.4f}"
        median = _fmt(r.median_ms, ".4f") if not r.error else f"error: {r.error}"
        pct_copy = _fmt(r.frac_copy and 100 * r.frac_copy, ".0f")
        pct_profile = _fmt(r.frac_profile and 100 * r.frac_profile, ".0f")
        checked = "-" if r.checked is None else ("yes" if r.checked else "NO")
        body.append([r.kernel, r.case, "x".join(map(str, r.shape)), r.dtype, r.pass_, r.impl, r.timing,
                     median, spread, _fmt(r.gbps, ".0f"), pct_copy, pct_profile,
                     _fmt(r.speedup_vs_eager, ".2f"), _fmt(r.speedup_vs_compile, ".2f"), checked])
    return header, body


def _yes_no(v):
    return "-" if v is None else ("yes" if v else "NO")


def _goal_table(goals: list[dict]):
    header = ["bn_act case", "dtype", "pass", "timing", "fused ms", "inductor ms", "x inductor", "GB/s",
              "% copy BW", "ceiling %", "% copy BW, kernel bytes", "faster than inductor",
              ">= 70% copy BW (fwd+bwd, large)"]
    body = [[g["case"], g["dtype"], g["pass_"], g["timing"], _fmt(g["triton_ms"], ".4f"),
             _fmt(g["inductor_ms"], ".4f"),
             _fmt(g["speedup_vs_inductor"], ".2f"), _fmt(g["gbps"], ".0f"),
             *(_fmt(g[k] and 100 * g[k], ".0f") for k in ("frac_copy", "ceiling", "frac_copy_kernel_bytes")),
             _yes_no(g["inductor_goal"]),
             _yes_no(g["copy_goal"]) if g["large"] and g["pass_"] == "fwd+bwd" else "n/a"] for g in goals]
    return header, body


def _markdown_table(header, body) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(str(c) for c in row) + " |" for row in body])


def _markdown(meta: dict, rows: list[Row]) -> str:
    header, body = _table_rows(rows)
    lines = [f"# fastgraph kernels on {meta['device']['name']}", ""]
    for key in ("date", "git_commit", "git_dirty", "torch", "triton", "cuda", "timing_method"):
        lines.append(f"- {key}: {meta[key]}")
    copy_gbps = meta["copy_bandwidth_bytes_per_s"] / 1e9
    lines.append(f"- device-to-device copy bandwidth (measured): {copy_gbps:.0f} GB/s")
    prof = meta["profile"]
    if prof:
        lines.append(f"- hardware profile: {prof['display_name']} ({prof['name']}), "
                     f"{prof['memory_bandwidth'] / 1e9:.0f} GB/s")
    else:
        lines.append("- hardware profile: none matches this device (column left empty)")
    lines += ["- bn_act GB/s use the minimum bytes (fwd 2, fwd+bwd 5 accesses per element); the kernels "
              "move 3 and 8 (see bytes_kernel in the JSON), so at most 67% and 62% of the copy bandwidth "
              "can show (the 'ceiling'); '% copy BW, kernel bytes' counts the bytes they move", ""]
    goals = bn_act_goals(rows)
    if goals:
        lines += [f"## bn_act goals (large: input >= {LARGE_BYTES >> 20} MiB)", ""]
        lines += _markdown_table(*_goal_table(goals)) + [""]
        lines += ["## every row", ""]
    lines += _markdown_table(header, body)
    return "\n".join(lines) + "\n"


def _print_table(rows: list[Row], title: str) -> None:
    _print_rich(*_table_rows(rows), title)
    goals = bn_act_goals(rows)
    if goals:
        _print_rich(*_goal_table(goals), f"{title}: bn_act goals (large: input >= {LARGE_BYTES >> 20} MiB)")


def _print_rich(header, body, title: str) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        for row in [header] + body:
            print("  ".join(str(c) for c in row))
        return
    table = Table(title=title)
    for h in header:
        table.add_column(h)
    for row in body:
        table.add_row(*(str(c) for c in row))
    console = Console()
    if not console.is_terminal:  # a log file: do not squeeze the table into 80 columns
        console = Console(width=220)
    console.print(table)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# ----------------------------------------------------------------------------- main


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=["augment", "bn_act"], default=["augment", "bn_act"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[512, 1024], help="augment batch sizes")
    p.add_argument("--recipes", nargs="+", default=list(BN_RECIPES),
                   help="recipes whose training graphs give the bn_act shapes, at their batch sizes")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None,
                   help="bn_act storage dtypes (default bf16); augment output dtypes (default fp32 bf16)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder (default bench/results)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU + Triton interpreter, tiny shapes; prints the table, writes nothing")
    return p.parse_args(argv)


def gpu_torch(script: str, dry_run: bool):
    """``torch`` for a GPU benchmark: imported after ``TRITON_INTERPRET=1`` is set for a dry
    run (Triton reads it at import); None, after one line on stderr, where there is no CUDA
    device and this is no dry run (GPU numbers are never taken on a CPU)."""
    if dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    if not dry_run and not torch.cuda.is_available():
        print(f"{script}: no CUDA device; GPU numbers are only taken on a GPU "
              "(--dry-run checks the script on the CPU without writing results)", file=sys.stderr)
        return None
    return torch


def main(argv=None) -> int:
    args = parse_args(argv)
    torch = gpu_torch("bench/kernels.py", args.dry_run)
    if torch is None:
        return 2
    import triton

    device = torch.device("cpu") if args.dry_run else torch.device("cuda")
    ctx = Context(torch=torch, device=device, dry_run=args.dry_run, compile_=not args.no_compile)
    batch_sizes = [8] if args.dry_run else args.batch_sizes
    if args.dry_run:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    device_name = (platform.processor() or "cpu") if args.dry_run else torch.cuda.get_device_name(device)
    ctx.copy_bw = _measure_copy_bandwidth(ctx)
    profile = None if args.dry_run else _profile_bandwidth(device_name)
    ctx.profile_bw = profile[2] if profile else None
    if "augment" in args.only:
        bench_augment(ctx, batch_sizes, args.dtypes or ["fp32", "bf16"])
    from fastgraph.core.errors import UserError

    try:
        cases = derive_bn_cases(args.recipes) if "bn_act" in args.only else []
    except UserError as exc:  # an unknown recipe, a model file that does not load
        print(f"bench/kernels.py: {exc}", file=sys.stderr)
        return 2
    if cases:
        bench_bn_act(ctx, cases, args.dtypes or (["fp32"] if args.dry_run else ["bf16"]))
    _speedups(ctx.rows)

    commit, dirty = _git_commit()
    meta = {
        "benchmark": "kernels",
        "device": {"name": device_name, **({} if args.dry_run else {
            "capability": list(torch.cuda.get_device_capability(device)),
            "memory_bytes": torch.cuda.get_device_properties(device).total_memory,
            "sm_count": torch.cuda.get_device_properties(device).multi_processor_count})},
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": dirty,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "timing_method": DRY_TIMING_METHOD if args.dry_run else TIMING_METHOD,
        "copy_bandwidth_bytes_per_s": ctx.copy_bw,
        "profile": ({"name": profile[0], "display_name": profile[1], "memory_bandwidth": profile[2]}
                    if profile else None),
        "bn_act_cases": [dict(asdict(c), label=c.label) for c in cases],
        "goals": {"copy_fraction_fwd_bwd_large": COPY_GOAL, "large_bytes": LARGE_BYTES,
                  "faster_than_inductor": True},
    }
    title = f"fastgraph kernels, {device_name}, {meta['date']}"
    if args.dry_run:
        _print_table(ctx.rows, "DRY RUN on the CPU (Triton interpreter, tiny shapes): NOT a measurement")
        failed = [r for r in ctx.rows if r.error or r.checked is False]
        for r in failed:
            print(f"dry run problem: {r.kernel} {r.case} {r.impl} {r.pass_}: {r.error or 'check failed'}",
                  file=sys.stderr)
        return 1 if failed else 0
    _print_table(ctx.rows, title)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"kernels-{_slug(device_name)}-{meta['date'][:10]}"
    payload = dict(meta, results=[{("pass" if k == "pass_" else k): v for k, v in asdict(r).items()}
                                  for r in ctx.rows],
                   bn_act_goals=[{("pass" if k == "pass_" else k): v for k, v in g.items()}
                                 for g in bn_act_goals(ctx.rows)])
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    stem.with_suffix(".md").write_text(_markdown(meta, ctx.rows))
    print(f"wrote {stem}.json and {stem}.md")
    return 0 if all(r.checked is not False for r in ctx.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
