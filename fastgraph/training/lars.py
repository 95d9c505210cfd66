"""LARS: layer-wise adaptive rate scaling for large-batch SGD.

You, Gitman and Ginsburg, "Large Batch Training of Convolutional Networks" (arXiv:1708.03888,
Algorithm 1); the same sequence in You, Zhang, Hsieh, Demmel and Keutzer, "Speeding up
ImageNet Training on Supercomputers" (SysML 2018, ../shared/sources/003, section 3, whose
local-lr line prints ``beta * ||grad w||`` in the denominator where the arXiv paper and
TensorFlow's and timm's implementations have ``beta * ||w||``). For one parameter tensor w (a
layer's weight) with gradient g of the mean-reduced loss, at a step with global lr gamma::

    lambda = eta * ||w|| / (||g|| + beta * ||w|| + eps)     (1 when ||w|| = 0 or ||g|| = 0)
    u      = gamma * lambda * (g + beta * w)
    v      <- m * v + u                                     (v starts at 0)
    w      <- w - v            or, with Nesterov,  w <- w - (u + m * v)

||.|| is the Euclidean (Frobenius) norm of the whole tensor, of any shape and floating
dtype, computed in that dtype on its device (no host synchronisation). gamma and lambda
sit inside the momentum buffer, as in the paper and TensorFlow's ``LARSOptimizer``
(``tensorflow/contrib/opt/python/training/lars_optimizer.py``: ``apply_momentum`` with lr 1
on ``grad * scaled_lr``), not outside it as in ``torch.optim.SGD``: when the schedule
changes gamma, earlier steps keep the lr they were taken with. The Nesterov form is
TensorFlow's ``apply_momentum(use_nesterov=True)``.

A parameter group with ``exclude_from_adaptation`` (BatchNorm weights and biases, all
biases) steps as plain momentum SGD with the global lr and no weight decay::

    u = gamma * g;  v <- m * v + u;  w <- w - v   (or w - (u + m * v))

which is what TensorFlow's ``LARSOptimizer`` does for the variables in its ``skip_list``
(the LARS setup of ``tensorflow/tpu`` ``models/official/resnet/lars_util.py`` and Google's
MLPerf ResNet-50 submissions pass ``skip_list=['batch_normalization', 'bias']``).

The zero-norm rule (lambda = 1 when the weight or the gradient is zero, so a zero-initialised
layer still moves by gamma * g and a layer whose gradient is zero only decays) is
TensorFlow's ``LARSOptimizer`` ``compute_lr`` and timm's ``Lars`` (``timm/optim/lars.py``);
``eps`` is added to the denominator as both do (TensorFlow's default 0, timm's 1e-8).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["LARS"]


def _check(group: dict[str, Any]) -> None:
    """Raise ValueError naming the first hyperparameter of ``group`` out of its range."""

    def bad(name: str, want: str) -> ValueError:
        return ValueError(f"LARS: {name} must be {want}, got {group[name]!r}")

    for name in ("lr", "momentum", "weight_decay", "trust_coefficient", "eps"):
        value = group[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad(name, "a finite number")
    if group["lr"] < 0:
        raise bad("lr", ">= 0")
    if not 0 <= group["momentum"] < 1:
        raise bad("momentum", "in [0, 1)")
    if group["weight_decay"] < 0:
        raise bad("weight_decay", ">= 0")
    if group["trust_coefficient"] <= 0:
        raise bad("trust_coefficient", "> 0")
    if group["eps"] < 0:
        raise bad("eps", ">= 0")
    for name in ("nesterov", "exclude_from_adaptation"):
        if not isinstance(group[name], bool):
            raise bad(name, "true or false")
    if group["nesterov"] and group["momentum"] == 0:
        raise ValueError("LARS: nesterov needs momentum > 0")


class LARS(torch.optim.Optimizer):
    """LARS (see the module docstring for the update and its sources).

    Args:
        params: parameters, or dicts of parameter groups that may set any keyword below.
        lr: global lr gamma, >= 0 (the schedule multiplies it through
            ``param_groups[i]["lr"]``). For adapted tensors gamma * eta bounds the first
            step's size as a fraction of ||w|| (||u|| <= gamma * eta * ||w||); for excluded
            ones it is plain SGD's lr for a mean-reduced loss.
        momentum: m in [0, 1).
        weight_decay: beta >= 0, the L2 coefficient (added to the gradient and to the
            trust ratio's denominator); ignored for excluded groups.
        trust_coefficient: eta > 0 (0.001: the scaling factor l of ../shared/sources/003,
            section 3, for AlexNet and ResNet, and TensorFlow's default ``eeta``).
        eps: >= 0, added to the trust ratio's denominator.
        nesterov: Nesterov momentum (needs momentum > 0).
        exclude_from_adaptation: no trust ratio and no weight decay (BatchNorm, biases).

    State per parameter (``state_dict`` round-trips it): ``momentum_buffer``, v, of the
    parameter's shape and dtype, once the parameter has stepped with momentum > 0.

    Raises:
        ValueError: a hyperparameter out of its range (at construction and for every
            group added), or a sparse gradient at ``step``.
    """

    def __init__(self, params: Iterable, lr: float, *, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 0.0, nesterov: bool = False,
                 exclude_from_adaptation: bool = False):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, eps=eps, nesterov=nesterov,
                        exclude_from_adaptation=exclude_from_adaptation)
        _check(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        _check({**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}})
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None):
        """One LARS step over every parameter with a gradient; returns ``closure()``'s loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, m, beta = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse:
                    raise ValueError("LARS: sparse gradients are not supported")
                if group["exclude_from_adaptation"]:
                    u = g * lr
                else:
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(g)
                    ratio = group["trust_coefficient"] * w_norm / (g_norm + beta * w_norm + group["eps"])
                    # no host synchronisation: the zero-norm rule as a select on the device
                    ratio = torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
                    u = g.add(p, alpha=beta).mul_(ratio * lr)
                if m == 0:
                    p.sub_(u)
                    continue
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = u.clone()
                else:
                    buf.mul_(m).add_(u)
                p.sub_(u.add_(buf, alpha=m) if group["nesterov"] else buf)
        return loss
