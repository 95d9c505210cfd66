"""Move a max-pool ahead of the BatchNorm and activation that follow a convolution."""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from . import Identity, copy_module, finish, register
from ._fx import (
    calls_module,
    is_max_pool,
    is_monotonic_activation,
    is_pointwise_activation,
    only_input,
    reorder_chain,
    single_user,
)


def _match(gm: fx.GraphModule, tail: fx.Node) -> tuple[fx.Node, list[fx.Node], list[fx.Node]] | None:
    """``(conv, old chain, new chain)`` when ``tail`` ends a chain this pass reorders, else ``None``.

    Two chains end at ``tail``: conv -> BN -> act -> pool (``tail`` is the pool) and
    conv -> BN -> pool -> act (``tail`` is the activation, the form pool_before_activation
    leaves). Both become conv -> pool -> BN -> act.
    """
    mid = only_input(tail)
    bn = only_input(mid) if mid is not None else None
    conv = only_input(bn) if bn is not None else None
    if conv is None or not calls_module(gm, conv, nn.Conv2d):
        return None
    if not calls_module(gm, bn, nn.BatchNorm2d) or len(bn.args) != 1 or bn.kwargs:
        return None
    # Single users along the chain: any other reader would see values that moved.
    if not (single_user(conv) and single_user(bn) and single_user(mid)):
        return None
    if is_max_pool(gm, tail) and is_pointwise_activation(gm, mid):
        act, pool = mid, tail
    elif is_pointwise_activation(gm, tail) and is_max_pool(gm, mid):
        act, pool = tail, mid
    else:
        return None
    return conv, [bn, mid, tail], [pool, bn, act]


def _identity(gm: fx.GraphModule, options: dict, batch_size: int) -> Identity | str:
    """The rewrite itself, checked in evaluation mode, where it is exact when every moved
    activation is monotonic and every BatchNorm scale weight / sqrt(var + eps) is
    positive: a max-pool then commutes with the per-channel increasing affine map and
    the activation."""
    for tail in gm.graph.nodes:
        match = _match(gm, tail)
        if match is None:
            continue
        bn_node, act = match[2][1], match[2][2]
        bn = gm.get_submodule(bn_node.target)
        if not is_monotonic_activation(gm, act):
            return f"{act.name} is not monotonic, so no configuration of the reorder is exact"
        if bn.affine and not bool((bn.weight > 0).all()):
            return f"{bn_node.name} has a scale <= 0, so no configuration of the reorder is exact"
    return Identity({}, mode="infer")


@register(exact=False, modes=("train", "infer"), identity=_identity)
def pool_before_bn(gm: fx.GraphModule) -> fx.GraphModule:
    """Training-time: conv -> BN -> activation -> max-pool becomes conv -> max-pool -> BN -> activation.

    Source: Page, "How to Train Your ResNet 8: Bag of Tricks" (2019), "moving max-pool
    layers": pooling straight after the conv lets BatchNorm and the activation run on a
    quarter of the elements; airbench's conv groups are built this way. It changes the
    function (BN then normalises pooled statistics, and max no longer sees the BN affine
    map or a non-monotonic activation), so the model must be trained with it.
    conv -> BN -> max-pool -> activation (what pool_before_activation leaves) is reordered
    the same way.

    Identity configuration: the same reorder checked in evaluation mode (exact for
    monotonic activations and positive BN scales, as at initialisation); for a
    non-monotonic activation (GELU) there is none, and only node survival is checked.

    Guards: the conv is an ``nn.Conv2d``, the BN an ``nn.BatchNorm2d``, the pool a 2-D
    max-pool returning no indices (module or function, fixed or adaptive, never an
    average pool), the activation a known elementwise one; the conv, BN and middle node
    outputs each have a single user.

    Returns ``gm`` itself when nothing matches, else a new GraphModule whose
    ``meta["fastgraph.rewrites"]`` is the number of chains reordered.
    """
    if not any(_match(gm, n) for n in gm.graph.nodes):
        return gm
    out = copy_module(gm)
    rewrites, rewritten = 0, []
    for tail in list(out.graph.nodes):
        match = _match(out, tail)
        if match is None:
            continue
        conv, old, new = match
        reorder_chain(conv, old, new)
        rewritten += [n.name for n in old]
        for node in new:  # the shapes recorded by shape propagation no longer hold
            node.meta.pop("tensor_meta", None)
            node.meta.pop("val", None)
        rewrites += 1
    return finish(out, rewrites=rewrites, rewritten=rewritten)
