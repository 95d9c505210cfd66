"""Graph passes and their registry.

A pass is a function ``fn(gm: torch.fx.GraphModule, **options) -> torch.fx.GraphModule``
registered with :func:`register`. The contract (DESIGN.md, "Passes"):

- it never mutates its input: it works on :func:`copy_module` of it;
- it guards before it rewrites and counts its rewrites with :func:`finish`;
- when it finds nothing to rewrite it returns its input object unchanged;
- ``exact`` passes keep the function (the pass manager checks outputs, and in train mode
  gradients, on a real batch before and after); ``training-time`` passes change it and
  the model must be trained with them, and register an *identity configuration*: the
  options in which the same rewrite must be exact (ghost BN with one split, stochastic
  depth with survival 1...), which the pass manager checks like an exact pass first;
- it declares, through :func:`finish`, the nodes of its input graph it replaced, moved
  or removed: every other node must survive, which the pass manager checks;
- its docstring's first line says when it applies.

Importing this package imports every pass module, which fills :data:`REGISTRY`.
"""

from __future__ import annotations

import copy
import importlib
import pkgutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch.fx as fx

MODES = ("train", "infer")
REWRITES_KEY = "fastgraph.rewrites"
REWRITTEN_KEY = "fastgraph.rewritten_nodes"


@dataclass(frozen=True)
class Identity:
    """The identity configuration of a training-time pass: the same rewrite, made with
    ``options`` (merged over the real ones), must leave the function unchanged when
    checked in ``mode`` ("train": batch statistics, outputs and gradients; "infer":
    eval mode, outputs)."""

    options: dict
    mode: str = "train"


# (the graph, the real options, the check batch size) -> the identity configuration, or a
# string saying why this graph has none (the pass manager reports it and checks the rest).
IdentityFn = Callable[[fx.GraphModule, dict, int], "Identity | str"]


@dataclass(frozen=True)
class PassInfo:
    """A registered pass: the function and what the pass manager needs to know of it."""

    name: str
    fn: Callable[..., fx.GraphModule]
    exact: bool
    modes: tuple[str, ...]
    needs_data: bool = False
    identity: IdentityFn | None = None

    @property
    def exactness(self) -> str:
        """``"exact"``, ``"training-time"`` (changes the function: train with it) or
        ``"inference-time"`` (changes the function at inference only, as TTA does), as
        reports print it."""
        if self.exact:
            return "exact"
        return "training-time" if "train" in self.modes else "inference-time"

    @property
    def summary(self) -> str:
        """The first line of the pass's docstring: when it applies."""
        return (self.fn.__doc__ or "").strip().splitlines()[0]


REGISTRY: dict[str, PassInfo] = {}


def register(*, exact: bool, modes: tuple[str, ...], needs_data: bool = False, name: str | None = None,
             identity: IdentityFn | None = None):
    """Register a pass function under its name (default: the function's name).

    ``identity`` (training-time passes that run in train mode) maps (graph, real options,
    check batch size) to the pass's :class:`Identity` configuration.

    Raises ``ValueError`` for an unknown mode, a duplicate name, a missing docstring, or a
    training-time train-mode pass without an identity configuration.
    """

    def deco(fn):
        pass_name = name or fn.__name__
        if not set(modes) <= set(MODES):
            raise ValueError(f"pass {pass_name}: modes must be among {MODES}, got {modes}")
        if pass_name in REGISTRY:
            raise ValueError(f"pass {pass_name} registered twice")
        if not (fn.__doc__ or "").strip():
            raise ValueError(f"pass {pass_name} needs a docstring whose first line says when it applies")
        if not exact and "train" in modes and identity is None:
            raise ValueError(f"training-time pass {pass_name} needs an identity configuration")
        REGISTRY[pass_name] = PassInfo(pass_name, fn, exact, tuple(modes), needs_data, identity)
        return fn

    return deco


def copy_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A deep copy of ``gm`` (parameters, buffers, graph) for a pass to rewrite."""
    return copy.deepcopy(gm)


def finish(gm: fx.GraphModule, rewrites: int, rewritten: Iterable[str] = ()) -> fx.GraphModule:
    """Close a pass: drop dead code, lint, recompile, and record what the pass did.

    Args:
        gm: the pass's rewritten copy.
        rewrites: how many sites it rewrote.
        rewritten: names of the nodes of its *input* graph that it replaced, moved,
            re-wired or removed; the pass manager checks every other node survives.

    Dead code is dropped with :func:`~fastgraph.passes._fx.has_side_effect` as the purity
    test: fx's own test keeps only a few known side effects, and deletes a statement
    such as ``out.add_(shortcut)`` whose result is unused but whose mutation is the point
    (a ResNet would lose its residual adds).
    """
    from ._fx import has_side_effect

    gm.graph.eliminate_dead_code(is_impure_node=lambda node: has_side_effect(gm, node))
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    gm.meta[REWRITES_KEY] = rewrites
    gm.meta[REWRITTEN_KEY] = frozenset(rewritten)
    return gm


def rewrite_count(before: fx.GraphModule, after: fx.GraphModule) -> int:
    """How many rewrites the pass that turned ``before`` into ``after`` made (0 if it returned its input)."""
    return 0 if after is before else int(after.meta.get(REWRITES_KEY, 0))


def declared_rewritten(before: fx.GraphModule, after: fx.GraphModule) -> frozenset[str]:
    """Names of ``before``'s nodes that the pass turning it into ``after`` declared rewritten."""
    return frozenset() if after is before else frozenset(after.meta.get(REWRITTEN_KEY, ()))


def get(name: str) -> PassInfo:
    """The registered pass called ``name``; ``KeyError`` lists the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown pass {name!r}; known passes: {', '.join(sorted(REGISTRY))}") from None


def _import_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_all()
