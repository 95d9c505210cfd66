"""Small node predicates shared by the passes (private: not a pass, not registered)."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The submodule a ``call_module`` node calls, else ``None``."""
    if node.op != "call_module":
        return None
    return gm.get_submodule(node.target)


def calls_module(gm: fx.GraphModule, node: fx.Node, types: type | tuple[type, ...]) -> bool:
    """Whether ``node`` calls a submodule that is an instance of ``types``."""
    mod = module_of(gm, node)
    return mod is not None and isinstance(mod, types)


def single_user(node: fx.Node) -> bool:
    """Whether exactly one node consumes ``node``'s output (the guard before fusing it away)."""
    return len(node.users) == 1


def only_input(node: fx.Node) -> fx.Node | None:
    """The node's first positional argument when it is a graph node, else ``None``."""
    if node.args and isinstance(node.args[0], fx.Node):
        return node.args[0]
    return None


def unique_name(gm: fx.GraphModule, base: str) -> str:
    """A submodule name based on ``base`` not yet taken in ``gm``."""
    name, i = base, 1
    existing = dict(gm.named_modules())
    while name in existing:
        name, i = f"{base}_{i}", i + 1
    return name


def call_sites(gm: fx.GraphModule, target: str) -> int:
    """How many ``call_module`` nodes call the submodule ``target`` (a shared module has several)."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == target)


def has_hooks(mod: nn.Module) -> bool:
    """Whether ``mod`` carries its own forward or backward hooks (``register_forward_hook``,
    ``register_forward_pre_hook``, ``register_full_backward_hook``..., the old
    ``torch.nn.utils.weight_norm``'s pre-hook).

    ``Module.__call__`` runs them around the module's arithmetic, and a hook may change
    the input, the output or the gradient (or record them): a module rewritten by its
    arithmetic, replaced or moved would drop them or run them on other tensors, so an
    exact pass leaves such a module alone.
    """
    return bool(mod._forward_hooks or mod._forward_pre_hooks
                or mod._backward_hooks or mod._backward_pre_hooks)


def stock_module(gm: fx.GraphModule, node: fx.Node, cls: type[nn.Module]) -> nn.Module | None:
    """The submodule ``node`` calls when it is a ``cls`` whose forward is ``cls``'s own and
    that carries no hooks, else ``None``.

    An exact pass rewrites a module by its known arithmetic; a subclass that overrides
    ``forward`` may compute something else, and a hook may change what the call
    computes (:func:`has_hooks`), so either is left alone.
    """
    mod = module_of(gm, node)
    if isinstance(mod, cls) and type(mod).forward is cls.forward and not has_hooks(mod):
        return mod
    return None


def reads_attributes_of(gm: fx.GraphModule, target: str) -> bool:
    """Whether a ``get_attr`` node of ``gm`` reads the submodule ``target`` or a tensor in it
    (``F.conv2d(x, self.conv.weight)`` ties another op to ``self.conv``'s weight)."""
    prefix = f"{target}."
    return any(n.op == "get_attr" and (n.target == target or str(n.target).startswith(prefix))
               for n in gm.graph.nodes)


def _arg(node: fx.Node, index: int, name: str, default):
    """Argument ``name`` of a call: keyword, else positional ``index``, else ``default``."""
    if name in node.kwargs:
        return node.kwargs[name]
    if len(node.args) > index:
        return node.args[index]
    return default


def _literal(value) -> bool:
    """Whether a call argument is known at trace time (not computed by another node)."""
    return not isinstance(value, fx.Node)


# Elementwise activations that are non-decreasing functions, so f(max(x)) == max(f(x)).
# Exact types only: a subclass may change forward.
_MONOTONIC_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.Hardtanh)
_RELU_FUNCTIONS = (F.relu, F.relu_, torch.relu, torch.relu_, F.relu6)
_INPLACE_FUNCTIONS = (F.relu_, torch.relu_, F.leaky_relu_, F.elu_, F.celu_, F.hardtanh_)


def is_monotonic_activation(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` applies a non-decreasing elementwise activation to its first input.

    ReLU, ReLU6, LeakyReLU (slope >= 0), ELU (alpha >= 0), CELU (alpha > 0) and Hardtanh,
    as modules, ``torch.nn.functional`` calls, ``torch.relu`` or ``Tensor.relu``, in place
    or not. Parameters computed at run time (graph nodes) are refused: monotonicity
    cannot be checked then; so is a module with hooks (:func:`has_hooks`). GELU, SiLU
    and Mish fall over part of the negative axis, so they never qualify.
    """
    if only_input(node) is None:
        return False
    if node.op == "call_module":
        mod = module_of(gm, node)
        if type(mod) not in _MONOTONIC_MODULES or has_hooks(mod):
            return False
        if isinstance(mod, nn.LeakyReLU):
            return mod.negative_slope >= 0
        if isinstance(mod, nn.ELU):
            return mod.alpha >= 0
        if isinstance(mod, nn.CELU):
            return mod.alpha > 0
        return True
    if node.op == "call_method":
        return node.target in ("relu", "relu_")
    if node.op != "call_function":
        return False
    fn = node.target
    if fn in _RELU_FUNCTIONS:
        return True
    if fn in (F.leaky_relu, F.leaky_relu_):
        slope = _arg(node, 1, "negative_slope", 0.01)
        return _literal(slope) and slope >= 0
    if fn in (F.elu, F.elu_):
        alpha = _arg(node, 1, "alpha", 1.0)
        return _literal(alpha) and alpha >= 0
    if fn in (F.celu, F.celu_):
        alpha = _arg(node, 1, "alpha", 1.0)
        return _literal(alpha) and alpha > 0
    if fn in (F.hardtanh, F.hardtanh_):
        return _literal(_arg(node, 1, "min_val", -1.0)) and _literal(_arg(node, 2, "max_val", 1.0))
    return False


# Elementwise activations of any shape (a training-time pass may move any of them).
_POINTWISE_MODULES = _MONOTONIC_MODULES + (
    nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Sigmoid, nn.Tanh, nn.Softplus,
)
_POINTWISE_FUNCTIONS = _RELU_FUNCTIONS + _INPLACE_FUNCTIONS + (
    F.leaky_relu, F.elu, F.celu, F.hardtanh, F.gelu, F.silu, F.mish, F.hardswish,
    F.softplus, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh,
)
_POINTWISE_METHODS = ("relu", "relu_", "sigmoid", "tanh")


def is_pointwise_activation(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` applies a known elementwise activation (monotonic or not) to its input."""
    if only_input(node) is None:
        return False
    if node.op == "call_module":
        return type(module_of(gm, node)) in _POINTWISE_MODULES
    if node.op == "call_method":
        return node.target in _POINTWISE_METHODS
    return node.op == "call_function" and node.target in _POINTWISE_FUNCTIONS


def is_inplace(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` overwrites its input (``inplace=True`` module or flag, ``*_`` function)."""
    if node.op == "call_module":
        return bool(getattr(module_of(gm, node), "inplace", False))
    if node.op == "call_method":
        return str(node.target).endswith("_")
    if node.op == "call_function":
        index = _INPLACE_FLAG_INDEX.get(node.target)
        return node.target in _INPLACE_FUNCTIONS or (
            index is not None and _arg(node, index, "inplace", False) is True)
    return False


# Position of the ``inplace`` flag in each functional activation's signature.
_INPLACE_FLAG_INDEX = {F.relu: 1, F.relu6: 1, F.leaky_relu: 2, F.elu: 2, F.celu: 2, F.hardtanh: 3}


def is_max_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` is a 2-D max-pool (fixed or adaptive) returning values only, no indices,
    whose every window holds at least one input element (a module with hooks is refused:
    :func:`has_hooks`).

    A padded and dilated window can fall entirely on padding (input 1x1, kernel 2,
    padding 1, dilation 2: taps at -1 and +1); its output is -inf, and max-pool then
    commutes with no activation (relu(-inf) = 0), so such pools are refused. Without
    padding, or with dilation 1, every window touches the input.
    """
    if only_input(node) is None:
        return False
    if node.op == "call_module":
        mod = module_of(gm, node)
        if has_hooks(mod):
            return False
        if type(mod) is nn.AdaptiveMaxPool2d:
            return not mod.return_indices
        return (type(mod) is nn.MaxPool2d and not mod.return_indices
                and _windows_touch_input(mod.padding, mod.dilation))
    if node.op != "call_function":
        return False
    if node.target is F.adaptive_max_pool2d:
        return _arg(node, 2, "return_indices", False) is False
    # torch.max_pool2d returns values only; torch.adaptive_max_pool2d returns (values, indices).
    if node.target is F.max_pool2d and _arg(node, 6, "return_indices", False) is not False:
        return False
    if node.target is F.max_pool2d or node.target is torch.max_pool2d:
        return _windows_touch_input(_arg(node, 3, "padding", 0), _arg(node, 4, "dilation", 1))
    return False


def _windows_touch_input(padding, dilation) -> bool:
    """Whether max-pool windows with this padding and dilation always cover an input element."""
    if not (_literal(padding) and _literal(dilation)):
        return False
    pads = padding if isinstance(padding, (tuple, list)) else (padding,)
    dils = dilation if isinstance(dilation, (tuple, list)) else (dilation,)
    if not all(isinstance(v, int) for v in (*pads, *dils)):
        return False
    return all(p == 0 for p in pads) or all(d == 1 for d in dils)


def reorder_chain(head: fx.Node, old: list[fx.Node], new: list[fx.Node]) -> None:
    """Rewire the single-input chain ``head -> old[0] -> ... -> old[-1]`` as ``head -> new[0] -> ...``.

    ``new`` is a permutation of ``old``; every node of the chain takes the previous one as
    its first argument, and the users of ``old[-1]`` then read ``new[-1]``. The chain is
    placed where ``old[-1]`` was, after all of its inputs and before all of its users,
    so the graph stays in topological order.
    """
    anchor = old[-1].next
    if new[-1] is not old[-1]:
        old[-1].replace_all_uses_with(new[-1])
    prev = head
    for node in new:
        node.update_arg(0, prev)
        prev = node
    for node in new:
        anchor.prepend(node)


# In-place operator functions: ``x += y`` on a tensor traces to ``operator.iadd``.
_INPLACE_OPERATORS = frozenset(getattr(operator, name) for name in (
    "iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "imatmul",
    "iand", "ior", "ixor", "ilshift", "irshift", "setitem", "delitem"))


def _mutable_schema(target) -> bool:
    """Whether an ATen op (``torch.ops.aten.add_.Tensor``) or any overload of a packet
    declares that it writes one of its arguments."""
    schemas = []
    if isinstance(target, torch._ops.OpOverload):
        schemas = [target._schema]
    elif isinstance(target, torch._ops.OpOverloadPacket):
        schemas = [getattr(target, o)._schema for o in target.overloads()]
    return any(s.is_mutable for s in schemas)


def has_side_effect(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether deleting ``node`` could change what the graph computes even if nobody reads its result.

    True for fx's own impure nodes (placeholders, outputs, known side effects) and for
    everything that writes memory: a method or function whose name ends in ``_``
    (``out.add_(x)``, ``x.relu_()``, ``torch.relu_``), ``out=`` or ``inplace=True``
    arguments, in-place operators (``x += y``, ``x[i] = v``), ATen ops with a mutable
    schema, and modules that work in place or hold buffers (a training-mode BatchNorm
    updates its running statistics even when its output is unused), as do training-mode
    ``F.batch_norm`` / ``torch.batch_norm`` calls given running statistics. So are the
    ``nvtx_ranges`` pass's ``push`` / ``pop`` calls (``fastgraph.core.nvtx`` registers them
    with torch.fx as side-effecting, so ``Node.is_impure`` says so): the ``pop`` after an
    in-place module whose result nobody reads (``self.relu(x)`` with ``inplace=True``) is
    unused, yet dropping it leaves its range open for the rest of the run. Dead-code
    elimination must keep all of them (DESIGN.md, "Known traps").
    """
    if node.is_impure():
        return True
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return bool(getattr(mod, "inplace", False)) or any(True for _ in mod.buffers(recurse=True))
    if node.op not in ("call_method", "call_function"):
        return False
    if "out" in node.kwargs or node.kwargs.get("inplace") is True or is_inplace(gm, node):
        return True
    if _writes_running_statistics(node):
        return True
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.endswith("__")
    target = node.target
    if target in _INPLACE_OPERATORS or _mutable_schema(target):
        return True
    name = getattr(target, "__name__", "")
    return name.endswith("_") and not name.endswith("__")


# Ops whose result may share storage with their first input (views, and reshape-like ops
# that return a view when they can).
_VIEW_METHODS = frozenset({"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "transpose",
                           "permute", "t", "expand", "expand_as", "squeeze", "unsqueeze", "narrow", "select",
                           "as_strided", "contiguous", "detach", "__getitem__", "unfold", "split", "chunk"})
_VIEW_FUNCTIONS = frozenset({operator.getitem, torch.flatten, torch.reshape, torch.transpose,
                             torch.permute, torch.squeeze, torch.unsqueeze, torch.narrow, torch.select,
                             torch.t, torch.detach, torch.split, torch.chunk, torch.unflatten})
_VIEW_MODULES = (nn.Flatten, nn.Unflatten, nn.Identity)


def is_view(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node``'s result may share storage with its first input."""
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    if node.op == "call_function":
        return node.target in _VIEW_FUNCTIONS
    return node.op == "call_module" and type(module_of(gm, node)) in _VIEW_MODULES


def _writes_first_input(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` writes its first argument in place and returns it: an in-place
    activation, ``y.add_(s)``, ``y += s`` (``operator.iadd``, as torch.compile records it),
    ``torch.relu_(y)``."""
    if is_inplace(gm, node):
        return True
    if node.op == "call_method":
        name = str(node.target)
    elif node.op == "call_function":
        if node.target in _INPLACE_OPERATORS:
            return True
        name = getattr(node.target, "__name__", "")
    else:
        return False
    return name.endswith("_") and not name.endswith("__")


def _alias_source(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The node whose storage ``node``'s result shares, else None: the ``out=`` argument of
    a call writing into it, the input of a view, or the input an in-place op wrote and
    returned (after ``y += s`` the graph holds two names for one tensor)."""
    out = node.kwargs.get("out") if node.op in ("call_function", "call_method") else None
    if isinstance(out, fx.Node):
        return out
    if is_view(gm, node) or _writes_first_input(gm, node):
        return only_input(node)
    return None


def aliases(node: fx.Node) -> set[fx.Node]:
    """The nodes whose results may share storage with ``node``'s: up through views and
    in-place ops to the base, then down through every view of it and every in-place op on
    it (what an in-place write to one changes)."""
    gm = node.graph.owning_module
    base = node
    while (source := _alias_source(gm, base)) is not None:
        base = source
    group, stack = {base}, [base]
    while stack:
        current = stack.pop()
        for user in current.users:
            if user not in group and _alias_source(gm, user) is current:
                group.add(user)
                stack.append(user)
    return group


# Matching one operation in either of the forms fastgraph meets it in. torch.fx.symbolic_trace
# keeps module calls (``call_module`` to an ``nn.Conv2d``, ``nn.BatchNorm2d``) whose tensors are
# module attributes; torch.compile's Dynamo inlines every module into function calls
# (``torch.conv2d``, ``F.batch_norm``) whose parameters and buffers are graph inputs
# (placeholders), as are those of functional code traced by fx (``get_attr`` nodes). A pass
# asks for the operation and gets one description of either form; it then rewrites a module
# call by replacing the module, a function call by rewiring graph nodes.

# Positional order of each batch-norm function's arguments.
_BATCH_NORM_SIGNATURES = {
    F.batch_norm: ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
    torch.batch_norm: ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum",
                       "eps", "cudnn_enabled"),
}
_BATCH_NORM_DEFAULTS = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
_REQUIRED = object()


@dataclass(frozen=True)
class ConvCall:
    """A 2-D convolution in a graph.

    Module form (``module`` is the stock ``nn.Conv2d`` called, with one argument): its
    weight and bias are the module's. Function form (``torch.conv2d``, which is
    ``F.conv2d``): ``weight`` (C_out, C_in / groups, kH, kW) and ``bias`` (C_out,) or None
    are graph nodes; stride, padding, dilation and groups stay in ``node``'s arguments.
    """

    node: fx.Node
    input: fx.Node
    module: nn.Conv2d | None = None
    weight: fx.Node | None = None
    bias: fx.Node | None = None


@dataclass(frozen=True)
class BatchNormCall:
    """A batch norm in a graph, normalising ``input`` (N, C, ...) per channel C.

    Module form (``module``: a stock ``nn.BatchNorm2d``, or a ``GhostBatchNorm`` in eval
    mode, where it never splits): its tensors are the module's. Function form
    (``F.batch_norm`` or ``torch.batch_norm``): ``running_mean``, ``running_var`` (C,),
    ``weight``, ``bias`` (C,) are graph nodes or None, ``eps`` a number or a graph node
    (Dynamo passes it as one under dynamic shapes).

    ``training`` is the call's own flag; ``batch_statistics`` says whether it normalises
    by the batch's statistics (training, or no running statistics to use), i.e. whether
    it is *not* an affine map of its input.
    """

    node: fx.Node
    input: fx.Node
    training: bool
    batch_statistics: bool
    module: nn.Module | None = None
    running_mean: fx.Node | None = None
    running_var: fx.Node | None = None
    weight: fx.Node | None = None
    bias: fx.Node | None = None
    eps: float | fx.Node = 1e-5


def conv2d_call(gm: fx.GraphModule, node: fx.Node) -> ConvCall | None:
    """``node`` as a :class:`ConvCall`, or None when it is not a 2-D convolution of a known form.

    Module form: a stock ``nn.Conv2d`` (its ``forward`` and ``_conv_forward`` PyTorch's own)
    called with its input alone. Function form: ``torch.conv2d(x, weight, bias, ...)`` with
    the input and weight graph nodes and the bias a graph node or None.
    """
    if node.op == "call_module":
        conv = stock_module(gm, node, nn.Conv2d)
        if conv is None or type(conv)._conv_forward is not nn.Conv2d._conv_forward:
            return None
        if len(node.args) != 1 or node.kwargs or only_input(node) is None:
            return None
        return ConvCall(node, node.args[0], module=conv)
    if node.op != "call_function" or node.target is not torch.conv2d or only_input(node) is None:
        return None
    weight, bias = _arg(node, 1, "weight", None), _arg(node, 2, "bias", None)
    if not isinstance(weight, fx.Node) or not (bias is None or isinstance(bias, fx.Node)):
        return None
    return ConvCall(node, node.args[0], weight=weight, bias=bias)


def batch_norm_call(gm: fx.GraphModule, node: fx.Node) -> BatchNormCall | None:
    """``node`` as a :class:`BatchNormCall`, or None when it is not a batch norm of a known form.

    Module form: a stock ``nn.BatchNorm2d``, or a ``GhostBatchNorm`` in eval mode, called
    with its input alone. Function form: ``F.batch_norm`` or ``torch.batch_norm`` whose
    ``training`` flag is known at trace time and whose tensors are graph nodes or None.
    """
    if node.op == "call_module":
        from fastgraph.core.modules import GhostBatchNorm

        bn = stock_module(gm, node, nn.BatchNorm2d)
        ghost = module_of(gm, node)
        if bn is None and type(ghost) is GhostBatchNorm and not ghost.training and not has_hooks(ghost):
            bn = ghost  # in eval mode it is exactly BatchNorm2d (never splits)
        if bn is None or len(node.args) != 1 or node.kwargs or only_input(node) is None:
            return None
        no_stats = not bn.track_running_stats or bn.running_mean is None or bn.running_var is None
        return BatchNormCall(node, node.args[0], bn.training, bn.training or no_stats, module=bn, eps=bn.eps)
    names = _BATCH_NORM_SIGNATURES.get(node.target) if node.op == "call_function" else None
    if names is None:
        return None
    values = {name: _arg(node, i, name, _BATCH_NORM_DEFAULTS.get(name, _REQUIRED))
              for i, name in enumerate(names)}
    tensors = ("input", "running_mean", "running_var", "weight", "bias")
    if any(v is _REQUIRED for v in values.values()) or not isinstance(values["input"], fx.Node):
        return None
    if not all(values[k] is None or isinstance(values[k], fx.Node) for k in tensors):
        return None
    training = values["training"]
    if not isinstance(training, bool):
        return None  # computed at run time: neither form of the function can be assumed
    no_stats = values["running_mean"] is None or values["running_var"] is None
    return BatchNormCall(node, values["input"], training, training or no_stats,
                         running_mean=values["running_mean"], running_var=values["running_var"],
                         weight=values["weight"], bias=values["bias"], eps=values["eps"])


def _writes_running_statistics(node: fx.Node) -> bool:
    """Whether ``node`` is a batch-norm function call that may update running statistics
    in place (training flag not known to be False, and a running mean given)."""
    names = _BATCH_NORM_SIGNATURES.get(node.target) if node.op == "call_function" else None
    if names is None:
        return False
    training = _arg(node, names.index("training"), "training", False)
    running_mean = _arg(node, names.index("running_mean"), "running_mean", None)
    return training is not False and running_mean is not None
