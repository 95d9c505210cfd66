"""Optimisers of a recipe: parameter groups from pass hints, SGD or LARS, Muon for conv filters, EMA.

- :func:`build_optimizers`: ``torch.optim.SGD`` groups from the parameter hints passes
  leave in ``gm.meta["fastgraph.param_hints"]``, frozen parameters excluded; optionally
  airbench94_muon's Muon for the conv filters through :class:`ConvMuon`. A hint is
  ``{name: {"lr_scale", "weight_decay_scale", "trainable", "train_epochs"}}``, every key
  optional:

  - ``lr_scale``, ``weight_decay_scale`` (numbers, default 1): multiples of the recipe's
    SGD lr and ``weight_decay`` (airbench's bias_scaler is ``64`` and ``1/64``).
  - ``trainable`` (bool, default true): false freezes the parameter (``requires_grad`` off).
  - ``train_epochs`` (number N > 0, default none): the parameter trains during the first
    N epochs only, then stays frozen, as airbench94's whitening bias does
    (``whiten_bias_epochs = 3``). Such parameters get an SGD group of their own, never
    Muon; every SGD group carries ``group["train_epochs"]`` (N, or ``None`` for groups
    that train throughout), and the trainer sets that group's lr to 0 from epoch N on.
  - ``own_schedule`` (bool, default false, with ``train_epochs``): the group's lr follows
    the recipe's schedule compressed into its N epochs instead of the whole run, as
    airbench94_muon's whitening bias does (``1 - step / whiten_bias_train_steps``); the
    group carries ``group["own_schedule"]``.

  - ``exclude_from_adaptation`` (bool, LARS only): overrides the rule below.

  SGD groups are keyed by (lr_scale, weight_decay_scale, train_epochs, own_schedule).
- With ``[optimizer] name = "lars"`` the same groups go to :class:`~fastgraph.training.lars.LARS`
  instead of SGD, split further by :func:`excluded_from_adaptation`: 1-D parameters (BatchNorm
  and other normalisation weights and biases), every ``bias``, and every parameter of a
  normalisation layer step without trust ratio and without weight decay.
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

from fastgraph.training.lars import LARS
from fastgraph.training.recipes import Recipe, TorchHyperparameters

HINTS_KEY = "fastgraph.param_hints"
# Normalisation layers (BatchNorm and InstanceNorm derive from _NormBase): no LARS adaptation.
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def excluded_from_adaptation(gm: nn.Module, name: str, p: nn.Parameter, hint: dict) -> bool:
    """Whether LARS steps parameter ``name`` of ``gm`` without trust ratio and weight decay.

    The hint's ``exclude_from_adaptation`` when given; else true for a parameter with at
    most one dimension, one named ``bias``, or one of a normalisation layer. That is the
    common practice: Google's LARS ResNet-50 (``tensorflow/tpu``
    ``models/official/resnet/lars_util.py``, as in its MLPerf submissions) skips variables
    named ``batch_normalization`` or ``bias``; timm's ``param_groups_weight_decay`` drops
    the decay of ``ndim <= 1`` and ``.bias`` parameters, and timm's ``Lars`` adapts only
    groups with weight decay. Testing the dimension covers the BatchNorm parameters of
    fastgraph's rewritten modules (ghost BN, fused BN + activation) whatever their class,
    and also excludes any other parameter of at most one dimension (a learnable scalar).

    Raises:
        ValueError: an ``exclude_from_adaptation`` hint that is not true or false.
    """
    given = hint.get("exclude_from_adaptation")
    if given is not None:
        if not isinstance(given, bool):
            raise ValueError(f"parameter {name}: exclude_from_adaptation hint must be true or false, "
                             f"got {given!r}")
        return given
    owner_name, _, leaf = name.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    return p.dim() <= 1 or leaf == "bias" or isinstance(owner, NORM_LAYERS)


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


def _torch_muon_lr_factor(shape: torch.Size) -> float:
    """What ``torch.optim.Muon(adjust_lr_fn="original")`` multiplies the lr by for an
    (A, B) matrix: sqrt(max(1, A / B)) (its docstring and ``torch/optim/_muon.py``,
    ``_adjust_lr``)."""
    rows, cols = shape
    return math.sqrt(max(1.0, rows / cols))


_LR_FACTOR = "torch_lr_factor"  # param-group key: the factor above, shared by the group's matrices


class ConvMuon:
    """airbench94_muon's Muon on 4-D conv filter banks, run by ``torch.optim.Muon``.

    The update of each (out, in, kh, kw) float32 bank W with gradient G, lr and momentum
    m, as ``Muon.step`` in KellerJordan/cifar10-airbench ``airbench94_muon.py`` (Jordan
    2024; "Muon: An optimizer for hidden layers in neural networks")::

        B <- m B + G;  U <- G + m B (nesterov) or B
        W <- W * sqrt(out) / ||W||_F                        (normalize_weights)
        W <- W * (1 - lr * weight_decay)                    (torch's decoupled decay; airbench has none)
        W <- W - lr * NS(U as an (out, in*kh*kw) matrix)

    NS is ``ns_steps`` quintic Newton-Schulz iterations (a, b, c) = (3.4445, -4.7750,
    2.0315) in bfloat16 after dividing by the Frobenius norm (airbench's
    ``zeropower_via_newtonschulz5``). ``torch.optim.Muon`` computes the same with two
    differences, both undone here:

    - its momentum buffer is the exponential average ``m B + (1 - m) G``, so its U is
      (1 - m) times airbench's; NS divides that positive factor out (up to bfloat16
      rounding of its input);
    - it multiplies the lr by sqrt(max(1, out / fan_in)) (``adjust_lr_fn="original"``),
      which airbench does not: that is 1 for all of airbench's conv banks (out <= fan_in)
      but not for, e.g., a 1x1 conv that widens. Banks are grouped by that factor and each
      group steps with lr / factor and weight_decay * factor, so the step and the decay
      per step are airbench's.

    ``torch.optim.Muon`` accepts 2-D parameters only; each bank is handed to it as an
    (out, fan_in) parameter sharing the bank's storage, its gradient the matching view of
    the bank's gradient, so Muon's in-place update lands in the conv weight. Normalising
    the weights keeps the effective step size of these scale-invariant (BatchNorm-followed)
    filters constant. The loss reduction (sum or mean) does not matter: NS normalises.

    Args:
        params: 4-D float conv weights (trainable).
        lr: step size of the orthogonalised update (airbench94_muon: 0.24), multiplied by
            the schedule through ``param_groups[i]["lr"]``.
        momentum, nesterov: as above (airbench94_muon: 0.6, true).
        ns_steps: Newton-Schulz iterations (airbench94_muon: 3).
        weight_decay: decoupled decay per unit lr, as ``torch.optim.Muon``'s.
        normalize_weights: rescale each bank to Frobenius norm sqrt(out) before its step.

    Attributes:
        param_groups: the Muon groups; ``lr`` and ``weight_decay`` in the units above.

    Raises:
        ValueError: a weight whose layout has no 2-D view sharing its storage.
    """

    def __init__(self, params: list[nn.Parameter], *, lr: float, momentum: float, nesterov: bool,
                 ns_steps: int, weight_decay: float, normalize_weights: bool):
        self.banks = list(params)
        self.matrices, self.layouts = [], []
        by_factor: dict[float, list[nn.Parameter]] = {}
        for p in self.banks:
            found = _matrix_view(p.detach())
            if found is None:
                raise ValueError(f"conv weight of shape {tuple(p.shape)} has no 2-D view")
            matrix = nn.Parameter(found[0])
            self.matrices.append(matrix)
            self.layouts.append(found[1])
            by_factor.setdefault(_torch_muon_lr_factor(matrix.shape), []).append(matrix)
        self.normalize_weights = normalize_weights
        self.muon = torch.optim.Muon([{"params": ms, _LR_FACTOR: f} for f, ms in by_factor.items()],
                                     lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                     weight_decay=weight_decay, adjust_lr_fn="original")

    @property
    def param_groups(self) -> list[dict]:
        # read through: Optimizer.load_state_dict replaces the list, and a resumed run's
        # schedule must reach the groups that step
        return self.muon.param_groups

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
        groups = self.muon.param_groups
        given = [(g["lr"], g["weight_decay"]) for g in groups]
        try:
            for g in groups:  # undo Muon's shape factor; lr * weight_decay is unchanged
                g["lr"], g["weight_decay"] = g["lr"] / g[_LR_FACTOR], g["weight_decay"] * g[_LR_FACTOR]
            self.muon.step()
        finally:
            for g, (lr, wd) in zip(groups, given, strict=True):
                g["lr"], g["weight_decay"] = lr, wd

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the conv weights' gradients, as ``torch.optim.Optimizer.zero_grad`` does.

        Autograd accumulates into the 4-D banks, not into their matrix views: clearing only
        the views would let the banks' gradients add up over steps. The views' gradients
        are rebuilt from the banks' at every step and are always dropped.
        """
        for matrix in self.matrices:
            matrix.grad = None
        for bank in self.banks:
            if bank.grad is None:
                continue
            if set_to_none:
                bank.grad = None
                continue
            if bank.grad.grad_fn is not None:
                bank.grad.detach_()
            else:
                bank.grad.requires_grad_(False)
            bank.grad.zero_()

    def state_dict(self) -> dict:
        return self.muon.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.muon.load_state_dict(state)


def build_optimizers(gm: fx.GraphModule, recipe: Recipe, hyper: TorchHyperparameters) -> list:
    """SGD (and Muon), or LARS, over ``gm``'s trainable parameters, grouped by their hints.

    Each group stores ``peak_lr`` (the recipe's lr times the hint's ``lr_scale``); the
    trainer sets ``lr = peak_lr * schedule`` every step. Parameters whose hint says
    ``trainable: false``, or that have ``requires_grad`` off, are frozen and left out. With
    ``[muon] enabled`` the 4-D weights without lr, weight-decay or ``train_epochs`` hints go
    to :class:`ConvMuon`; every SGD group holds ``train_epochs`` (the hint's N, else
    ``None``), see the module docstring. With ``[optimizer] name = "lars"`` the groups go to
    :class:`~fastgraph.training.lars.LARS` with the recipe's ``trust_coefficient`` and
    ``eps``, each group also holding ``exclude_from_adaptation``
    (:func:`excluded_from_adaptation`). With ``decay_bn_and_bias = false`` the SGD groups of
    those same parameters get no weight decay; with ``no_decay_names`` the parameters whose
    qualified name contains one of those strings get none (FFCV's ResNet-50: ``["bn"]``,
    ffcv-imagenet train_imagenet.py ``create_optimizer``).

    Returns:
        ``[torch.optim.SGD]``, ``[torch.optim.SGD, ConvMuon]``, ``[ConvMuon]`` or ``[LARS]``.

    Raises:
        ValueError: a ``train_epochs`` hint that is not a number > 0, or an
            ``exclude_from_adaptation`` hint that is not a boolean.
    """
    hints = gm.meta.get(HINTS_KEY, {})
    muon_cfg = recipe["muon"]
    lars = recipe["optimizer"].get("name", "sgd") == "lars"
    no_1d_decay = not recipe["optimizer"].get("decay_bn_and_bias", True)
    no_decay_names = tuple(recipe["optimizer"].get("no_decay_names", ()))
    groups: dict[tuple[float, float, float | None, bool, bool, bool], list[nn.Parameter]] = {}
    banks: list[nn.Parameter] = []
    for name, p in gm.named_parameters():
        hint = hints.get(name, {})
        if not hint.get("trainable", True):
            p.requires_grad_(False)
        if not p.requires_grad:
            continue
        lr_scale = float(hint.get("lr_scale", 1.0))
        wd_scale = float(hint.get("weight_decay_scale", 1.0))
        epochs = hint.get("train_epochs")
        if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, (int, float))
                                   or not math.isfinite(epochs) or epochs <= 0):
            raise ValueError(f"parameter {name}: train_epochs hint must be a number > 0, got {epochs!r}")
        if (muon_cfg["enabled"] and p.dim() == 4 and lr_scale == 1.0 and wd_scale == 1.0
                and epochs is None):
            banks.append(p)
            continue
        own = bool(hint.get("own_schedule", False)) and epochs is not None
        # LARS: no trust ratio and no decay; SGD with decay_bn_and_bias = false: no decay
        excluded = (lars or no_1d_decay) and excluded_from_adaptation(gm, name, p, hint)
        no_decay = excluded or any(part in name for part in no_decay_names)
        groups.setdefault((lr_scale, wd_scale, epochs, own, excluded, no_decay), []).append(p)
    param_groups = [
        {"params": params, "lr": hyper.lr * lr_scale, "peak_lr": hyper.lr * lr_scale,
         "weight_decay": 0.0 if no_decay else hyper.weight_decay * wd_scale, "train_epochs": epochs,
         "own_schedule": own,
         **({"exclude_from_adaptation": excluded} if lars else {})}
        for (lr_scale, wd_scale, epochs, own, excluded, no_decay), params in groups.items()
    ]
    optimizers: list = []
    if param_groups and lars:
        opt = recipe["optimizer"]
        optimizers.append(LARS(param_groups, lr=hyper.lr, momentum=hyper.momentum,
                               nesterov=hyper.nesterov and hyper.momentum > 0,
                               weight_decay=hyper.weight_decay, trust_coefficient=opt["trust_coefficient"],
                               eps=opt["eps"]))
    elif param_groups:
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
