"""Small node predicates shared by the passes (private: not a pass, not registered)."""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn


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
