"""Graph passes and their registry.

A pass is a function ``fn(gm: torch.fx.GraphModule, **options) -> torch.fx.GraphModule``
registered with :func:`register`. The contract (DESIGN.md, "Passes"):

- it never mutates its input: it works on :func:`copy_module` of it;
- it guards before it rewrites and counts its rewrites with :func:`finish`;
- when it finds nothing to rewrite it returns its input object unchanged;
- ``exact`` passes keep the function (the pass manager checks outputs, and in train mode
  gradients, on a real batch before and after); ``training-time`` passes change it and
  the model must be trained with them;
- its docstring's first line says when it applies.

Importing this package imports every pass module, which fills :data:`REGISTRY`.
"""

from __future__ import annotations

import copy
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

import torch.fx as fx

MODES = ("train", "infer")
REWRITES_KEY = "fastgraph.rewrites"


@dataclass(frozen=True)
class PassInfo:
    """A registered pass: the function and what the pass manager needs to know of it."""

    name: str
    fn: Callable[..., fx.GraphModule]
    exact: bool
    modes: tuple[str, ...]
    needs_data: bool = False

    @property
    def exactness(self) -> str:
        """``"exact"`` or ``"training-time"``, as reports print it."""
        return "exact" if self.exact else "training-time"

    @property
    def summary(self) -> str:
        """The first line of the pass's docstring: when it applies."""
        return (self.fn.__doc__ or "").strip().splitlines()[0]


REGISTRY: dict[str, PassInfo] = {}


def register(*, exact: bool, modes: tuple[str, ...], needs_data: bool = False, name: str | None = None):
    """Register a pass function under its name (default: the function's name).

    Raises ``ValueError`` for an unknown mode, a duplicate name, or a missing docstring.
    """

    def deco(fn):
        pass_name = name or fn.__name__
        if not set(modes) <= set(MODES):
            raise ValueError(f"pass {pass_name}: modes must be among {MODES}, got {modes}")
        if pass_name in REGISTRY:
            raise ValueError(f"pass {pass_name} registered twice")
        if not (fn.__doc__ or "").strip():
            raise ValueError(f"pass {pass_name} needs a docstring whose first line says when it applies")
        REGISTRY[pass_name] = PassInfo(pass_name, fn, exact, tuple(modes), needs_data)
        return fn

    return deco


def copy_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A deep copy of ``gm`` (parameters, buffers, graph) for a pass to rewrite."""
    return copy.deepcopy(gm)


def finish(gm: fx.GraphModule, rewrites: int) -> fx.GraphModule:
    """Close a pass: drop dead code, lint, recompile, and record the rewrite count."""
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    gm.meta[REWRITES_KEY] = rewrites
    return gm


def rewrite_count(before: fx.GraphModule, after: fx.GraphModule) -> int:
    """How many rewrites the pass that turned ``before`` into ``after`` made (0 if it returned its input)."""
    return 0 if after is before else int(after.meta.get(REWRITES_KEY, 0))


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
