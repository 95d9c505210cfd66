"""Frozen batch-norm scales, with Page's compensation in the CELU alpha and the bias optimiser."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import Identity, copy_module, finish, register
from ._fx import module_of
from ._options import require

PARAM_HINTS_KEY = "fastgraph.param_hints"
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CELU_FUNCTIONS = (F.celu, torch.celu)


def _identity(gm: fx.GraphModule, options: dict, batch_size: int) -> Identity:
    """BN weights frozen at their current values and CELUs left alone."""
    return Identity({"scale": None, "celu_alpha": None})


@register(exact=False, modes=("train",), identity=_identity)
def freeze_bn_scale(
    gm: fx.GraphModule,
    *,
    bias_lr_scale: float = 64.0,
    bias_wd_scale: float = 1 / 64,
    celu_alpha: float | None = 0.3,
    scale: float | None = 1.0,
) -> fx.GraphModule:
    """Training-time: BN weights fixed at 1 and untrained; BN biases get scaled lr and weight decay.

    Source: Page, "How to Train Your ResNet 8: Bag of Tricks", 2019, and his final
    DAWNBench code (davidcpage/cifar10-fast, dawn.py and bag_of_tricks.ipynb). The
    learned BN scales settle near 1/4; Page fixes them instead, at 1, and compensates by
    multiplying the CELU alpha by 4 (0.075 -> 0.3) and the BN biases' learning rate by
    4^2 and weight decay by 1/4^2; his final code goes further and trains the biases with
    lr x 64 and weight decay / 64 (GhostBatchNorm with ``weight=False`` /
    ``weight_freeze=True``, ``nn.CELU(alpha=0.3)``). airbench94 (Jordan, 2024) keeps the
    frozen scale and the 64x bias learning rate (``bias_scaler``, decay per step kept) with
    GELU.

    Every affine ``nn.BatchNorm1d/2d/3d`` (GhostBatchNorm included) gets weight = 1 with
    ``requires_grad=False``. The optimiser compensation is written as hints the trainer
    reads, merged into ``out.meta["fastgraph.param_hints"]`` = {qualified parameter name:
    {"lr_scale": x, "weight_decay_scale": y, "trainable": bool}} (keys this pass sets
    replace earlier ones for the same parameter): BN weights {0, 0, False}; BN biases
    {bias_lr_scale, bias_wd_scale, True}. Both scales multiply the optimiser's learning
    rate and its (PyTorch, lr-coupled) weight_decay coefficient, so the decay per step,
    lr x weight_decay, stays that of the other parameters, as in both sources.

    Options:
        bias_lr_scale: multiplier on the BN biases' learning rate (Page: 64).
        bias_wd_scale: multiplier on their weight_decay coefficient (Page: 1/64).
        scale: the value the BN weights are frozen at (Page, airbench: 1); None freezes
            each at its current value (the identity configuration).
        celu_alpha: alpha for every CELU already in the graph (``nn.CELU`` and
            ``F.celu``); None leaves them. A ReLU graph gets its CELUs from
            ``swap_activation(to="celu")``: apply that first, this pass after.

    Guards: BN without affine parameters is skipped; a graph whose BN weights are all
    frozen at 1 with these hints and whose CELUs already have this alpha is returned
    unchanged. Raises ``PassOptionError`` for non-positive scales or alpha.
    """
    require(bias_lr_scale > 0 and bias_wd_scale >= 0, "freeze_bn_scale",
            f"bias_lr_scale must be > 0 and bias_wd_scale >= 0, got {bias_lr_scale}, {bias_wd_scale}")
    require(celu_alpha is None or celu_alpha > 0, "freeze_bn_scale",
            f"celu_alpha must be > 0 or None, got {celu_alpha}")

    hints = {}
    for target in _batchnorm_targets(gm):
        hints[f"{target}.weight"] = {"lr_scale": 0.0, "weight_decay_scale": 0.0, "trainable": False}
        hints[f"{target}.bias"] = {"lr_scale": float(bias_lr_scale),
                                   "weight_decay_scale": float(bias_wd_scale), "trainable": True}
    old_hints = gm.meta.get(PARAM_HINTS_KEY, {})
    stale_bn = [t for t in _batchnorm_targets(gm)
                if not _frozen(gm.get_submodule(t), scale)
                or not _hinted(old_hints, hints, (f"{t}.weight", f"{t}.bias"))]
    celu_modules, celu_calls = _stale_celus(gm, celu_alpha)
    if not stale_bn and not celu_modules and not celu_calls:
        return gm

    out = copy_module(gm)
    for target in _batchnorm_targets(out):
        bn = out.get_submodule(target)
        if scale is not None:
            with torch.no_grad():
                bn.weight.fill_(float(scale))
        bn.weight.requires_grad_(False)
    for target in celu_modules:
        out.get_submodule(target).alpha = float(celu_alpha)
    for node in out.graph.nodes:
        if node.name in celu_calls:
            # F.celu(input, alpha, inplace): move what sits positionally to keywords.
            kwargs = dict(node.kwargs)
            if len(node.args) > 2:
                kwargs["inplace"] = node.args[2]
            kwargs["alpha"] = float(celu_alpha)
            node.args, node.kwargs = node.args[:1], kwargs
    merged = {name: dict(h) for name, h in old_hints.items()}
    for name, h in hints.items():
        merged[name] = {**merged.get(name, {}), **h}
    out.meta[PARAM_HINTS_KEY] = merged
    return finish(out, rewrites=len(stale_bn) + len(celu_modules) + len(celu_calls), rewritten=celu_calls)


def _batchnorm_targets(gm: fx.GraphModule) -> list[str]:
    return sorted({n.target for n in gm.graph.nodes
                   if isinstance(module_of(gm, n), _BATCHNORMS) and module_of(gm, n).affine})


def _frozen(bn: nn.Module, scale: float | None) -> bool:
    return not bn.weight.requires_grad and (scale is None or bool(torch.all(bn.weight == scale)))


def _hinted(old: dict, new: dict, names: tuple[str, ...]) -> bool:
    """Whether ``old`` already holds every key/value of ``new`` for these parameter names."""
    return all(old.get(name, {}).get(key) == value for name in names for key, value in new[name].items())


def _stale_celus(gm: fx.GraphModule, alpha: float | None) -> tuple[list[str], set[str]]:
    """CELU module targets and F.celu node names whose alpha differs from ``alpha``."""
    if alpha is None:
        return [], set()
    modules = sorted({n.target for n in gm.graph.nodes
                      if isinstance(module_of(gm, n), nn.CELU) and module_of(gm, n).alpha != alpha})
    calls = set()
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in _CELU_FUNCTIONS:
            current = n.kwargs.get("alpha", n.args[1] if len(n.args) > 1 else 1.0)
            if current != alpha:
                calls.add(n.name)
    return modules, calls
