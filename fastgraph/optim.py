"""Optimisers of a recipe: parameter groups from pass hints, Muon for conv filters, EMA.

- :func:`build_optimizers`: ``torch.optim.SGD`` groups from the parameter hints passes
  leave in ``gm.meta["fastgraph.param_hints"]`` (``{name: {"lr_scale",
  "weight_decay_scale", "trainable"}}``), frozen parameters excluded; optionally
  ``torch.optim.Muon`` for the conv filters through :class:`ConvMuon`.
- :class:`WeightAverage`: an exponential moving average of weights and BatchNorm
  statistics (Page's EMA), optionally copied back into the trained weights (Lookahead as
  in hlb-CIFAR10 and airbench), on ``torch.optim.swa_utils.AveragedModel``.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from fastgraph.recipes import Recipe, TorchHyperparameters

HINTS_KEY = "fastgraph.param_hints"


_LAYOUTS = ((0, 1, 2, 3), (0, 2, 3, 1))  # (out, in, kh, kw) contiguous; channels-last storage order


def _matrix_view(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]] | None:
    """A 2-D (out, fan_in) view of a conv filter bank sharing its storage, and the axis
    order of its columns; ``None`` when the bank's layout has no such view.

    Newton-Schulz orthogonalisation commutes with permuting columns, so a channels-last
    filter bank may be viewed in its storage order (out, kh, kw, in); its gradient must
    then be read in the same order.
    """
    for perm in _LAYOUTS:
        try:
            return t.permute(perm).view(t.shape[0], -1), perm
        except RuntimeError:
            continue
    return None


class ConvMuon:
    """``torch.optim.Muon`` on 4-D conv filter banks, each seen as a 2-D matrix.

    ``torch.optim.Muon`` accepts 2-D parameters only; each (out, in, kh, kw) filter bank
    is handed to it as an (out, in*kh*kw) parameter that shares the bank's storage, and
    its gradient is the matching view of the bank's gradient, so Muon's in-place update
    lands in the conv weight. With ``normalize_weights`` each bank is rescaled to
    Frobenius norm sqrt(out) before the step, as airbench94_muon does (Jordan 2024),
    which keeps the effective step size of these scale-invariant (BatchNorm-followed)
    filters constant.

    Args:
        params: 4-D conv weights (trainable). lr, momentum, nesterov, ns_steps,
            weight_decay: ``torch.optim.Muon``'s.
    """

    def __init__(self, params: list[nn.Parameter], *, lr: float, momentum: float, nesterov: bool,
                 ns_steps: int, weight_decay: float, normalize_weights: bool):
        self.banks = list(params)
        self.matrices, self.layouts = [], []
        for p in self.banks:
            found = _matrix_view(p.detach())
            if found is None:
                raise ValueError(f"conv weight of shape {tuple(p.shape)} has no 2-D view")
            self.matrices.append(nn.Parameter(found[0]))
            self.layouts.append(found[1])
        self.normalize_weights = normalize_weights
        self.muon = torch.optim.Muon(self.matrices, lr=lr, momentum=momentum, nesterov=nesterov,
                                     ns_steps=ns_steps, weight_decay=weight_decay)
        self.param_groups = self.muon.param_groups

    @torch.no_grad()
    def step(self) -> None:
        for bank, matrix, layout in zip(self.banks, self.matrices, self.layouts, strict=True):
            if bank.grad is None:
                matrix.grad = None
                continue
            # the gradient's columns in the weight view's order (a copy if its layout differs)
            matrix.grad = bank.grad.permute(layout).reshape(matrix.shape)
            if self.normalize_weights:
                bank.mul_(math.sqrt(bank.shape[0]) / bank.norm().clamp_min(1e-12))
        self.muon.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for matrix in self.matrices:
            matrix.grad = None

    def state_dict(self) -> dict:
        return self.muon.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.muon.load_state_dict(state)


def build_optimizers(gm: fx.GraphModule, recipe: Recipe, hyper: TorchHyperparameters) -> list:
    """SGD (and Muon) over ``gm``'s trainable parameters, grouped by their hints.

    Each group stores ``peak_lr`` (the recipe's lr times the hint's ``lr_scale``); the
    trainer sets ``lr = peak_lr * schedule`` every step. Parameters whose hint says
    ``trainable: false``, or that have ``requires_grad`` off, are frozen and left out.

    Returns:
        ``[torch.optim.SGD]`` or ``[torch.optim.SGD, ConvMuon]``.
    """
    hints = gm.meta.get(HINTS_KEY, {})
    muon_cfg = recipe["muon"]
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    banks: list[nn.Parameter] = []
    for name, p in gm.named_parameters():
        hint = hints.get(name, {})
        if not hint.get("trainable", True):
            p.requires_grad_(False)
        if not p.requires_grad:
            continue
        lr_scale = float(hint.get("lr_scale", 1.0))
        wd_scale = float(hint.get("weight_decay_scale", 1.0))
        if muon_cfg["enabled"] and p.dim() == 4 and lr_scale == 1.0 and wd_scale == 1.0:
            banks.append(p)
            continue
        groups.setdefault((lr_scale, wd_scale), []).append(p)
    param_groups = [
        {"params": params, "lr": hyper.lr * lr_scale, "peak_lr": hyper.lr * lr_scale,
         "weight_decay": hyper.weight_decay * wd_scale}
        for (lr_scale, wd_scale), params in groups.items()
    ]
    optimizers: list = []
    if param_groups:
        optimizers.append(torch.optim.SGD(param_groups, lr=hyper.lr, momentum=hyper.momentum,
                                          nesterov=hyper.nesterov and hyper.momentum > 0))
    if banks:
        muon = ConvMuon(banks, lr=muon_cfg["lr"], momentum=muon_cfg["momentum"],
                        nesterov=muon_cfg["nesterov"], ns_steps=muon_cfg["ns_steps"],
                        weight_decay=muon_cfg["weight_decay"],
                        normalize_weights=muon_cfg["normalize_weights"])
        for group in muon.param_groups:
            group["peak_lr"] = muon_cfg["lr"]
        optimizers.append(muon)
    return optimizers


class WeightAverage:
    """EMA of a module's parameters and buffers, updated every ``every`` steps.

    The decay of one update at training step ``step`` of ``total`` is
    ``decay**every * (step / total)**warmup_power``: Page's EMA is ``decay=0.99, every=5,
    warmup_power=0``; airbench's Lookahead is ``0.95, 5, 3`` (little averaging early,
    strong late). BatchNorm running statistics are averaged with the weights
    (``use_buffers=True``), as Page averages the whole state. With ``lookahead`` the
    average is copied back into the trained module after each update and at the end.

    Attributes:
        averaged: the ``AveragedModel``; ``averaged.module`` is the averaged GraphModule.
    """

    def __init__(self, module: nn.Module, *, decay: float, every: int, warmup_power: float,
                 lookahead: bool):
        self.decay, self.every, self.warmup_power, self.lookahead = decay, every, warmup_power, lookahead
        self._current = 0.0
        self.averaged = AveragedModel(module, multi_avg_fn=self._average, use_buffers=True)
        self.averaged.update_parameters(module)  # the first update copies the module

    def _average(self, averaged, current, n_averaged) -> None:
        get_ema_multi_avg_fn(self._current)(averaged, current, n_averaged)

    def decay_at(self, step: int, total: int) -> float:
        """Decay of the update after training step ``step`` (1-based) of ``total``."""
        return self.decay ** self.every * (step / total) ** self.warmup_power

    @torch.no_grad()
    def maybe_update(self, module: nn.Module, step: int, total: int) -> None:
        """Update after training step ``step`` (1-based) when it is a multiple of ``every``."""
        if step % self.every:
            return
        self._current = self.decay_at(step, total)
        self.averaged.update_parameters(module)
        if self.lookahead:
            self.copy_back(module)

    @torch.no_grad()
    def copy_back(self, module: nn.Module) -> None:
        """Write the average into ``module``'s parameters and floating-point buffers."""
        averaged = self.averaged.module
        for avg, cur in zip([*averaged.parameters(), *averaged.buffers()],
                            [*module.parameters(), *module.buffers()], strict=True):
            if cur.is_floating_point():
                cur.copy_(avg)

    def state_dict(self) -> dict:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.averaged.load_state_dict(state)
