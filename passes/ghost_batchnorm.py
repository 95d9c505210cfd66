"""Ghost batch norm: batch statistics over small ghost batches instead of the whole batch."""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from fastgraph.core.modules import GhostBatchNorm

from . import Identity, copy_module, finish, register
from ._fx import module_of
from ._options import require


def _identity(gm: fx.GraphModule, options: dict, batch_size: int) -> Identity:
    """One ghost batch holding the whole batch: BatchNorm exactly (running statistics too)."""
    return Identity({"ghost_batch_size": batch_size})


@register(exact=False, modes=("train",), identity=_identity)
def ghost_batchnorm(gm: fx.GraphModule, *, ghost_batch_size: int = 32) -> fx.GraphModule:
    """Training-time: every BatchNorm2d normalises over ghost batches of S samples in training.

    Sources: Hoffer, Hubara and Soudry, "Train longer, generalize better: closing the
    generalization gap in large batch training of neural networks", 2017; Page, "How to
    Train Your ResNet 8: Bag of Tricks", 2019 (ghost batches of 32: batch 512, 16 splits).

    Each ``nn.BatchNorm2d`` becomes a :class:`~fastgraph.core.modules.GhostBatchNorm` with the
    same settings, parameters, buffers and requires_grad flags, under the same qualified
    name. In training it reshapes (N, C, H, W) to (S, (N/S)*C, H, W), so one batch-norm
    call computes per-(ghost batch, channel) statistics (ghost batch k holds samples
    k, k + N/S, ...; no Python loop), and updates the running statistics with the mean
    over ghost batches of the per-ghost-batch updates. Evaluation uses the running
    statistics and never splits. A training batch N that is not a multiple of S raises
    ``GhostBatchSizeError`` (a ``ValueError`` naming N and S): train with drop_last.

    Options:
        ghost_batch_size: S, samples per ghost batch (Page: 32).

    Identity configuration: S = the whole batch (one ghost batch) is BatchNorm2d.

    Guards: modules already GhostBatchNorm are left alone (their S is kept); nothing to
    rewrite returns the input unchanged. Raises ``PassOptionError`` for S < 1.
    """
    require(isinstance(ghost_batch_size, int) and ghost_batch_size >= 1, "ghost_batchnorm",
            f"ghost_batch_size must be an integer >= 1, got {ghost_batch_size!r}")
    targets = sorted({
        node.target for node in gm.graph.nodes
        if isinstance(module_of(gm, node), nn.BatchNorm2d)
        and not isinstance(module_of(gm, node), GhostBatchNorm)
    })
    if not targets:
        return gm
    out = copy_module(gm)
    for target in targets:
        out.add_submodule(target, GhostBatchNorm.from_batchnorm(out.get_submodule(target), ghost_batch_size))
    rewritten = [n.name for n in out.graph.nodes if n.op == "call_module" and n.target in targets]
    return finish(out, rewrites=len(targets), rewritten=rewritten)
