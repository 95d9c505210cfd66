"""Named ranges for Nsight Systems (NVTX) and torch.profiler, free when no profiler listens.

A range is pushed to two places:

- NVTX, for ``nsys profile -t cuda,nvtx``: through the ``nvtx`` package when it is
  installed (extra ``gpu``), else ``torch.cuda.nvtx`` when CUDA is available, else
  nowhere. NVTX calls are empty stubs until a tool such as Nsight Systems injects
  itself, so they cost nanoseconds when nothing is attached.
- ``torch.autograd.profiler.record_function``, only while a ``torch.profiler`` session
  is recording (``torch.autograd._profiler_enabled()``), so the ranges appear as
  ``user_annotation`` events in the profiler's Chrome trace on any device, CPU included,
  and ``fastgraph profile`` can attribute the profiler's op events to graph nodes.
  Without a recording session nothing is created.

Ranges are skipped while ``torch.compiler.is_compiling()`` (torch.compile, torch.export
and the ONNX exporter trace through them): a range inside a compiled region would break
the graph (DESIGN.md, known traps).

Two forms: :func:`range`, a context manager for code (the trainer's forward, backward,
optimizer and evaluation phases; :func:`iterate` marks each batch a loader produces), and
:func:`push` / :func:`pop`, identity
functions on a tensor that a graph calls around a node (the ``nvtx_ranges`` pass); they
thread the tensor through so that no dead-code elimination drops them and the graph's
order fixes when they run. :func:`strip` removes them again (export does, before ONNX).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.autograd.profiler import record_function

_local = threading.local()  # NVTX ranges are per thread; so is the stack of open record_functions


@dataclass(frozen=True)
class _Backend:
    name: str
    push: Callable[[str], object] | None
    pop: Callable[[], object] | None


@functools.cache
def _backend() -> _Backend:
    try:
        import nvtx as nvtx_package  # extra "gpu"
    except ImportError:
        nvtx_package = None
    if nvtx_package is not None:
        return _Backend("nvtx", lambda name: nvtx_package.push_range(message=name), nvtx_package.pop_range)
    if torch.cuda.is_available():
        return _Backend("torch.cuda.nvtx", torch.cuda.nvtx.range_push, torch.cuda.nvtx.range_pop)
    return _Backend("none", None, None)


def backend() -> str:
    """Where NVTX ranges go: ``"nvtx"`` (the package), ``"torch.cuda.nvtx"`` or ``"none"``.

    With ``"none"`` ranges still reach a recording ``torch.profiler`` (record_function).
    """
    return _backend().name


def _open_ranges() -> list:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def _enter(name: str) -> None:
    b = _backend()
    if b.push is not None:
        b.push(name)
    handle = None
    if torch.autograd._profiler_enabled():
        handle = record_function(name)
        handle.__enter__()
    _open_ranges().append(handle)


def _exit() -> None:
    stack = _open_ranges()
    if not stack:  # a range opened before an exception was never closed: nothing to pair with
        return
    handle = stack.pop()
    if handle is not None:
        handle.__exit__(None, None, None)
    b = _backend()
    if b.pop is not None:
        b.pop()


@contextlib.contextmanager
def range(name: str):  # shadows the builtin on purpose: call it as fastgraph.core.nvtx.range
    """Mark the body of a ``with`` block as the range ``name`` (see the module docstring).

    Example: ``with nvtx.range("forward"): out = model(x)``. Nothing is recorded while
    compiling, and nothing but an NVTX stub call happens when no profiler is attached.
    """
    if torch.compiler.is_compiling():
        yield
        return
    _enter(name)
    try:
        yield
    finally:
        _exit()


def iterate(iterable, name: str):
    """Yield the items of ``iterable``, each fetched inside the range ``name``.

    For loops whose data comes from a generator (``for x, y in nvtx.iterate(loader, "data")``):
    the time to produce every batch is marked. The final fetch, which finds the iterable
    exhausted, is a range too (a short one).
    """
    iterator = iter(iterable)
    while True:
        with range(name):
            try:
                item = next(iterator)
            except StopIteration:
                return
        yield item


def push(x, name: str):
    """Open the range ``name`` and return ``x`` unchanged (a graph calls it before a node).

    Args:
        x: the node's input (any value, typically a float (N, C, H, W) tensor); returned as is.
        name: the range's name, e.g. the module path ``"layer1.0.0"``.

    Under ``torch.fx`` symbolic tracing (re-tracing a graph that holds ranges) it records
    itself as a ``call_function`` node instead of running; under torch.compile it does nothing.
    """
    if isinstance(x, fx.Proxy):
        return x.tracer.create_proxy("call_function", push, (x, name), {})
    if not torch.compiler.is_compiling():
        _enter(name)
    return x


def pop(x, name: str):
    """Close the innermost open range (opened by :func:`push` with ``name``); return ``x`` unchanged."""
    if isinstance(x, fx.Proxy):
        return x.tracer.create_proxy("call_function", pop, (x, name), {})
    if not torch.compiler.is_compiling():
        _exit()
    return x


# Opening and closing a range is the whole point of these calls, not their value: a pop
# whose result nobody reads (after an in-place module) must survive dead-code elimination,
# or its range stays open for the rest of the run. torch.fx keeps the functions registered
# here (``Node.is_impure``), as it does its own profiler calls.
fx.node.has_side_effect(push)
fx.node.has_side_effect(pop)


def is_range_node(node: fx.Node) -> bool:
    """Whether ``node`` is a :func:`push` or :func:`pop` call."""
    return node.op == "call_function" and node.target in (push, pop)


def range_names(gm: fx.GraphModule) -> list[str]:
    """Names of the ranges ``gm`` opens, in graph order (one per :func:`push` node)."""
    return [n.args[1] for n in gm.graph.nodes if n.op == "call_function" and n.target is push]


def strip(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` without its :func:`push` / :func:`pop` nodes (a copy), or ``gm`` itself when it has none.

    Exporters get graphs without ranges: the ranges are profiling side effects, not part
    of the function.
    """
    if not any(is_range_node(n) for n in gm.graph.nodes):
        return gm
    from fastgraph.passes import copy_module, finish

    out = copy_module(gm)
    removed = 0
    for node in list(out.graph.nodes):
        if is_range_node(node):
            node.replace_all_uses_with(node.args[0])
            out.graph.erase_node(node)
            removed += 1
    return finish(out, rewrites=removed)
