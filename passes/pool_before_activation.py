"""Move a max-pool in front of the monotonic activation that feeds it."""

from __future__ import annotations

import torch.fx as fx

from . import copy_module, finish, register
from ._fx import aliases, is_inplace, is_max_pool, is_monotonic_activation, only_input, reorder_chain


def _match(gm: fx.GraphModule, pool: fx.Node) -> fx.Node | None:
    """The activation node feeding ``pool`` that may swap with it, else ``None`` (the guards)."""
    if not is_max_pool(gm, pool):
        return None
    act = only_input(pool)
    if act is None or len(act.users) != 1 or not is_monotonic_activation(gm, act):
        return None
    # An in-place activation also overwrote its input and every tensor sharing its
    # storage; after the swap it no longer does, so any other reader of any of them (a
    # view taken before, the base it is a view of, the tensor an earlier ``y += s`` wrote,
    # the caller's input, a module's parameter or buffer) would see different values.
    if is_inplace(gm, act):
        group = aliases(only_input(act))
        readers = {user for node in group - {act} for user in node.users if user not in group}
        if readers - {act} or any(node.op in ("placeholder", "get_attr") for node in group):
            return None
    return act


@register(exact=True, modes=("train", "infer"))
def pool_before_activation(gm: fx.GraphModule) -> fx.GraphModule:
    """Any mode: monotonic activation -> max-pool becomes max-pool -> activation.

    Source: Page, "How to Train Your ResNet 8: Bag of Tricks" (2019), "moving max-pool
    layers"; airbench's blocks pool before their activation too. It is exact because a non-decreasing f
    commutes with max: max(f(a), f(b)) = f(max(a, b)), with the same argmax where f
    is strictly increasing and a zero gradient where f is flat, so gradients match too.
    It is faster because the activation then runs on the pooled tensor (1/4 of the
    elements behind a 2x2 pool).

    Guards: the pool is a 2-D max-pool returning no indices (``nn.MaxPool2d``,
    ``F.max_pool2d``, ``torch.max_pool2d``, ``nn.AdaptiveMaxPool2d``,
    ``F.adaptive_max_pool2d``; never an average pool); the activation is ReLU, ReLU6,
    LeakyReLU (slope >= 0), ELU (alpha >= 0), CELU (alpha > 0) or Hardtanh, as a module
    or a function, whose output feeds the pool alone (never GELU, SiLU, Mish: they are
    not monotonic); an in-place activation's input, and every tensor sharing its storage,
    has no other reader and is no graph input or module tensor. Chains of such
    activations all move behind the pool.

    Returns ``gm`` itself when nothing matches, else a new GraphModule whose
    ``meta["fastgraph.rewrites"]`` is the number of swaps.
    """
    if not any(_match(gm, n) for n in gm.graph.nodes):
        return gm
    out = copy_module(gm)
    rewrites, rewritten = 0, set()
    changed = True
    while changed:  # a swap can expose another activation in front of the same pool
        changed = False
        for pool in list(out.graph.nodes):
            act = _match(out, pool)
            if act is None:
                continue
            reorder_chain(only_input(act), [act, pool], [pool, act])
            rewritten |= {act.name, pool.name}
            act.meta, pool.meta = _swapped_meta(act.meta, pool.meta)
            rewrites += 1
            changed = True
    return finish(out, rewrites=rewrites, rewritten=rewritten)


def _swapped_meta(act_meta: dict, pool_meta: dict) -> tuple[dict, dict]:
    """Shape metadata after the swap: the activation now has the pooled shape."""
    act_meta, pool_meta = dict(act_meta), dict(pool_meta)
    for key in ("tensor_meta", "val"):
        if key in pool_meta:
            act_meta[key] = pool_meta[key]
    return act_meta, pool_meta
