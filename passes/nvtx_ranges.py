"""Wrap every module call of a graph in a named range for Nsight Systems and torch.profiler."""

from __future__ import annotations

import torch.fx as fx

from fastgraph.core import nvtx

from . import copy_module, finish, register


def _first_node_argument(node: fx.Node) -> tuple[str, int | str] | None:
    """Where the node's first graph-node argument sits: ("args", index) or ("kwargs", key)."""
    for i, arg in enumerate(node.args):
        if isinstance(arg, fx.Node):
            return "args", i
    for key, arg in node.kwargs.items():
        if isinstance(arg, fx.Node):
            return "kwargs", key
    return None


@register(exact=True, modes=("train", "infer"))
def nvtx_ranges(gm: fx.GraphModule) -> fx.GraphModule:
    """Profiling: every call_module node runs inside a range named by its module path (``layer1.0.0``).

    Source: NVIDIA Tools Extension (NVTX) ranges, read by Nsight Systems
    (``nsys profile -t cuda,nvtx``); the same ranges reach a recording ``torch.profiler``
    as ``record_function`` events (see :mod:`fastgraph.core.nvtx`).

    Each ``call_module`` node ``y = m(x, ...)`` becomes ``x' = fastgraph.core.nvtx.push(x,
    "m")``, ``y = m(x', ...)``, ``y' = fastgraph.core.nvtx.pop(y, "m")``, and the node's users
    read ``y'``. ``push``/``pop`` return their input unchanged, so the function, its
    gradients and the parameter names are the same (exact), the graph stays traceable
    (they re-trace as themselves) and compiles without breaks (they do nothing while
    ``torch.compiler.is_compiling()``). Exporters strip them first
    (:func:`fastgraph.core.nvtx.strip`).

    The ranges cover the forward pass: the backward of a node runs later, from the
    autograd engine; ``fastgraph profile`` attributes backward ops to nodes through the
    profiler's forward/backward sequence numbers instead.

    Guards (input returned unchanged): no ``call_module`` node with a graph-node argument,
    or a graph that already holds ranges.
    """
    if any(nvtx.is_range_node(n) for n in gm.graph.nodes):
        return gm
    if not any(n.op == "call_module" and _first_node_argument(n) for n in gm.graph.nodes):
        return gm
    out = copy_module(gm)
    graph = out.graph
    rewrites, rewritten = 0, []
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        where = _first_node_argument(node)
        if where is None:
            continue
        kind, key = where
        source = node.args[key] if kind == "args" else node.kwargs[key]
        with graph.inserting_before(node):
            opened = graph.call_function(nvtx.push, (source, node.target))
        opened.meta.update(source.meta)
        if kind == "args":
            node.update_arg(key, opened)
        else:
            node.update_kwarg(key, opened)
        with graph.inserting_after(node):
            closed = graph.call_function(nvtx.pop, (node, node.target))
        closed.meta.update(node.meta)
        node.replace_all_uses_with(closed, delete_user_cb=lambda user, c=closed: user is not c)
        rewritten += [node.name, *(u.name for u in closed.users)]
        rewrites += 1
    return finish(out, rewrites, rewritten)
