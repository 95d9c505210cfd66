"""Fuse BatchNorm2d -> CELU/GELU/SiLU into one ``BatchNormActivation`` (the Triton BN kernel)."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fastgraph.passes import copy_module, finish, register
from fastgraph.passes._fx import call_sites, module_of, only_input, single_user

_ACTIVATION_FUNCTIONS = {F.celu: "celu", torch.celu: "celu", F.gelu: "gelu", F.silu: "silu"}


def _activation_of(gm: fx.GraphModule, node: fx.Node) -> tuple[str, float] | None:
    """(activation name, CELU alpha) if ``node`` applies a supported activation to its input only."""
    mod = module_of(gm, node)
    if mod is not None:
        if type(mod) is nn.CELU:
            return "celu", float(mod.alpha)
        if type(mod) is nn.GELU and mod.approximate == "none":
            return "gelu", 1.0
        if type(mod) is nn.SiLU:
            return "silu", 1.0
        return None
    if node.op != "call_function" or node.target not in _ACTIVATION_FUNCTIONS:
        return None
    name = _ACTIVATION_FUNCTIONS[node.target]
    extra_args, kwargs = node.args[1:], dict(node.kwargs)
    kwargs.pop("inplace", None)  # in place or not, the value is the same
    if name == "celu":
        alpha = kwargs.pop("alpha", extra_args[0] if extra_args else 1.0)
        extra_args = extra_args[1:2]  # F.celu(x, alpha, inplace)
        if isinstance(alpha, fx.Node) or not isinstance(alpha, (int, float)):
            return None
        if kwargs or any(not isinstance(a, bool) for a in extra_args):
            return None
        return "celu", float(alpha)
    if name == "gelu":
        approximate = kwargs.pop("approximate", extra_args[0] if extra_args else "none")
        return ("gelu", 1.0) if approximate == "none" and not kwargs and len(extra_args) <= 1 else None
    # silu(x, inplace=False)
    return ("silu", 1.0) if not kwargs and all(isinstance(a, bool) for a in extra_args) else None


def _fusable_bn(gm: fx.GraphModule, node: fx.Node) -> tuple[nn.BatchNorm2d, int | None] | None:
    """(the BatchNorm2d ``node`` calls, its ghost batch size or None) if the fused module can
    reproduce it exactly and replace it in place (the module is called from this node only)."""
    from fastgraph.core.modules import GhostBatchNorm

    bn = module_of(gm, node)
    if type(bn) is nn.BatchNorm2d:
        ghost = None
    elif type(bn) is GhostBatchNorm:
        ghost = bn.ghost_batch_size
    else:
        return None
    if not bn.track_running_stats or bn.momentum is None or only_input(node) is None:
        return None
    if call_sites(gm, node.target) != 1:
        return None
    return bn, ghost


@register(exact=True, modes=("train", "infer"))
def fuse_bn_activation(gm: fx.GraphModule) -> fx.GraphModule:
    """When a BatchNorm2d's only user is a CELU, GELU (erf form) or SiLU (module or functional).

    The pair becomes one :class:`fastgraph.kernels.bn_act.BatchNormActivation`, under the
    BN's qualified name (state_dict keys unchanged), with the BN's parameters, running
    statistics, ``num_batches_tracked``, eps, momentum, affine flag, parameter
    ``requires_grad``, train/eval mode and, for a ``fastgraph.core.modules.GhostBatchNorm``, its
    ghost batch size (same grouping of samples): the same function, computed by the
    fused Triton kernel (one read of the BN input and one write of the activation instead of
    a write and a read of the BN output in between, and no stored pre-activation).

    Guards: an exact ``nn.BatchNorm2d`` or ``GhostBatchNorm`` (not another subclass) with
    running statistics and a momentum (not the cumulative average), called from one place
    only (a shared module is left alone); the BN output has a single user, the activation,
    whose only tensor input it is. A BN output used twice (e.g. a residual taken before the
    activation) is left alone, since fusing would drop the value the other user needs.

    ReLU is deliberately not fused: the kernel serves the smooth activations of the
    fast-CIFAR recipes (CELU in Page's ResNet-9, GELU/SiLU in airbench and later records);
    a ReLU network is better served by ``pool_before_activation``, which moves the ReLU after
    the max-pool where it touches 4x fewer elements, a rewrite this fusion would block.
    GELU's tanh approximation is not fused either: the kernel computes the erf form.
    """
    # Imported here: importing the pass registry must not import triton and build kernels.
    from fastgraph.kernels.bn_act import BatchNormActivation

    out = copy_module(gm)
    rewrites, rewritten = 0, []
    for node in list(out.graph.nodes):
        found = _fusable_bn(out, node)
        if found is None or not single_user(node):
            continue
        bn, ghost_batch_size = found
        act_node = next(iter(node.users))
        if only_input(act_node) is not node:
            continue
        activation = _activation_of(out, act_node)
        if activation is None:
            continue
        name, alpha = activation
        fused = BatchNormActivation(bn.num_features, activation=name, alpha=alpha, momentum=bn.momentum,
                                    eps=bn.eps, affine=bn.affine, ghost_batch_size=ghost_batch_size,
                                    device=bn.running_mean.device, dtype=bn.running_mean.dtype)
        fused.load_state_dict(bn.state_dict())
        if bn.affine:
            fused.weight.requires_grad_(bn.weight.requires_grad)
            fused.bias.requires_grad_(bn.bias.requires_grad)
        fused.train(bn.training)
        # Under the BN's own name: parameter and buffer names, hence checkpoints and
        # optimizer parameter groups, stay those of the original model.
        out.add_submodule(node.target, fused)
        node.meta.update(act_node.meta)
        act_node.replace_all_uses_with(node)
        rewritten += [node.name, act_node.name]
        out.graph.erase_node(act_node)
        rewrites += 1
    if rewrites == 0:
        return gm
    return finish(out, rewrites, rewritten)
