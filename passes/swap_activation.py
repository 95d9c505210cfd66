"""Swap the activation function: ReLU to CELU (Page), GELU (airbench94) or SiLU."""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import Identity, copy_module, finish, register
from ._fx import module_of, unique_name
from ._options import require

# Activation name -> (module types, functions, tensor methods) that compute it; names
# ending in "_" work in place.
_FORMS = {
    "relu": ((nn.ReLU,), (F.relu, F.relu_, torch.relu, torch.relu_), ("relu", "relu_")),
    "gelu": ((nn.GELU,), (F.gelu,), ()),
    "silu": ((nn.SiLU,), (F.silu,), ()),
    "celu": ((nn.CELU,), (F.celu, F.celu_, torch.celu, torch.celu_), ()),
}
_TARGETS = ("celu", "gelu", "silu", "same")


def _identity(gm: fx.GraphModule, options: dict, batch_size: int) -> Identity:
    """A swap of every matched activation to a fresh module computing the same function."""
    return Identity({"to": "same"})


@register(exact=False, modes=("train", "infer"), identity=_identity)
def swap_activation(
    gm: fx.GraphModule,
    *,
    to: str = "celu",
    alpha: float = 0.075,
    from_: tuple[str, ...] | list[str] | str = ("relu",),
) -> fx.GraphModule:
    """Training-time: every ReLU (or other ``from_`` activation) becomes nn.CELU(alpha), nn.GELU or nn.SiLU.

    Sources: Page, "How to Train Your ResNet 8: Bag of Tricks", 2019 (ReLU -> CELU with
    alpha 0.075, a smoothed ReLU that trains better); airbench94 (Jordan, 2024) and the
    2025 records use GELU; SiLU (Elfwing et al. 2018) is the other smooth choice.

    A ``call_module`` activation gets the new module under the same qualified name (a
    module called from several places changes everywhere); a functional or method call
    (``F.relu``, ``torch.relu_``, ``x.relu()``, ...) becomes a call to a new module. The
    new module never works in place.

    Options:
        to: "celu", "gelu" or "silu"; "same" (the identity configuration) replaces each
            matched activation by a fresh, not in-place module computing its own
            function (ReLU by nn.ReLU, GELU by nn.GELU with its approximation...).
        alpha: CELU's alpha (only for to="celu"); Page used 0.075 with learnable BN
            scales, 0.3 with frozen ones (see ``freeze_bn_scale``).
        from_: activation names to replace, among "relu", "gelu", "silu", "celu".

    Guards: an in-place activation whose input has other users is left alone (they
    would see the mutated tensor in the original, the unmutated one after the swap); an
    activation that already is the target (same alpha) is left alone; nothing to swap
    returns the input unchanged. Raises ``PassOptionError`` for unknown names or
    alpha <= 0.
    """
    sources = (from_,) if isinstance(from_, str) else tuple(from_)
    require(to in _TARGETS, "swap_activation", f"to must be one of {_TARGETS}, got {to!r}")
    require(bool(sources) and set(sources) <= set(_FORMS), "swap_activation",
            f"from_ must name activations among {tuple(_FORMS)}, got {from_!r}")
    require(to != "celu" or alpha > 0, "swap_activation", f"alpha must be > 0, got {alpha}")

    module_types = tuple(t for s in sources for t in _FORMS[s][0])
    functions = tuple(f for s in sources for f in _FORMS[s][1])
    methods = tuple(m for s in sources for m in _FORMS[s][2])

    module_targets, unsafe_targets, call_names = set(), set(), set()
    for node in gm.graph.nodes:
        mod = module_of(gm, node)
        if isinstance(mod, module_types):
            if _unsafe_inplace(node, getattr(mod, "inplace", False)):
                unsafe_targets.add(node.target)  # a shared module changes at every call site
            elif to == "same" or not _already(mod, to, alpha):
                module_targets.add(node.target)
        elif (node.op == "call_function" and node.target in functions) or (
                node.op == "call_method" and node.target in methods):
            if to == "same" and _same_as_module(node) is None:
                continue  # an argument computed at run time: no fixed module reproduces it
            if ((to == "same" or not _already_call(node, to, alpha))
                    and not _unsafe_inplace(node, _inplace_call(node))):
                call_names.add(node.name)
    module_targets -= unsafe_targets
    if not module_targets and not call_names:
        return gm

    out = copy_module(gm)
    rewritten = [n.name for n in out.graph.nodes if n.op == "call_module" and n.target in module_targets]
    rewritten += sorted(call_names)
    for target in module_targets:
        new = _same_module(out.get_submodule(target)) if to == "same" else _make(to, alpha)
        out.add_submodule(target, new.train(gm.training))
    for node in list(out.graph.nodes):
        if node.name not in call_names:
            continue
        name = unique_name(out, f"{node.name}_{to}")
        new = _same_as_module(node) if to == "same" else _make(to, alpha)
        out.add_submodule(name, new.train(gm.training))
        with out.graph.inserting_before(node):
            new = out.graph.call_module(name, args=(node.args[0],))
        node.replace_all_uses_with(new)
        out.graph.erase_node(node)
    return finish(out, rewrites=len(module_targets) + len(call_names), rewritten=rewritten)


def _make(to: str, alpha: float) -> nn.Module:
    if to == "celu":
        return nn.CELU(alpha=float(alpha))
    return nn.GELU() if to == "gelu" else nn.SiLU()


def _same_module(mod: nn.Module) -> nn.Module:
    """A copy of an activation module that does not work in place."""
    new = copy.deepcopy(mod)
    if hasattr(new, "inplace"):
        new.inplace = False
    return new


def _same_as_module(node: fx.Node) -> nn.Module | None:
    """The module computing what a functional or method activation call computes, or None
    when one of its arguments is a graph value (known only at run time)."""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    name = name.rstrip("_")
    if name == "relu":
        return nn.ReLU()
    if name == "silu":
        return nn.SiLU()
    if name == "gelu":
        approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        return None if isinstance(approximate, fx.Node) else nn.GELU(approximate=approximate)
    if name == "celu":
        alpha = node.kwargs.get("alpha", node.args[1] if len(node.args) > 1 else 1.0)
        return None if isinstance(alpha, fx.Node) else nn.CELU(alpha=float(alpha))
    return None


def _already(mod: nn.Module, to: str, alpha: float) -> bool:
    if to == "celu":
        return isinstance(mod, nn.CELU) and mod.alpha == alpha
    exact_type = nn.GELU if to == "gelu" else nn.SiLU
    return type(mod) is exact_type and getattr(mod, "approximate", "none") == "none"


def _already_call(node: fx.Node, to: str, alpha: float) -> bool:
    """Whether a functional activation call already computes the target activation."""
    if node.target not in _FORMS[to][1]:
        return False
    if to == "celu":
        return node.kwargs.get("alpha", node.args[1] if len(node.args) > 1 else 1.0) == alpha
    if to == "gelu":
        return node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none") == "none"
    return True


def _inplace_call(node: fx.Node) -> bool:
    """Whether a functional/method activation call works in place (``relu_`` or inplace=True)."""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if name.endswith("_"):
        return True
    if node.kwargs.get("inplace", False):
        return True
    # F.relu(x, True), F.celu(x, alpha, True), F.silu(x, True): inplace is the last positional.
    return node.target in (F.relu, F.silu, F.celu) and len(node.args) > 1 and node.args[-1] is True


def _unsafe_inplace(node: fx.Node, inplace: bool) -> bool:
    source = node.args[0] if node.args else None
    return bool(inplace) and isinstance(source, fx.Node) and len(source.users) > 1
