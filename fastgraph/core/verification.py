"""The float64 check every rewrite passes: two modules must compute the same function.

:func:`verify` runs float64 copies of two modules on the same inputs, with the random
number generator forked and seeded alike (dropout draws the same masks in both), and
compares, tensor by tensor, what a user of the model could observe:

- the outputs on two batches: a real one spread over the classes, and a *stress* batch
  derived from it (mirrored in intensity, shifted negative, reversed in order) whose
  pre-activations are mostly negative, so a rewrite that depends on the order of a pool
  and an activation, or on the sign of its input, cannot hide behind one lucky batch;
- every output of a model that returns a tuple, list or dict (compared leaf by leaf);
- in train mode, the gradients of a loss with respect to the input and to every
  parameter, on both batches; a gradient present in one module and absent in the other
  is a mismatch, never skipped (a traced-through ``no_grad`` block, a lost custom
  ``autograd.Function``);
- every buffer after the forward passes (BatchNorm running statistics, a running-stat
  ``lerp_``);
- in train mode, the outputs after one SGD step on the first batch's gradients: a
  statement that does nothing at initialisation (ReZero's ``x.add_(alpha * f(x))`` with
  alpha = 0, Fixup's scale 1 and bias 0) has a gradient and moves after one step, so
  losing it shows there.

Tolerance: every tensor is compared relative to its own scale, ``max |a - b| <= RTOL *
max(max |a|, FLOOR * group)``, not to ``max(1, |a|)``, which is an absolute tolerance
for outputs below 1 and accepted a rewrite that negates logits of magnitude 1e-4.
RTOL = 1e-5: both modules run in float64 but hold float32 weights, and an exact rewrite
that computes new weights (``fold_bn``) rounds them once to float32, a relative error of
about 6e-8 per weight; honest rewrites measure 1e-7 or less, a wrong one differs by
orders of magnitude more. ``group`` is the largest tensor of the same kind on the same
batch (all outputs, all gradients, all buffers); FLOOR = 1e-4 keeps a tensor that is
mathematically zero and numerically float64 round-off (the gradient of a conv bias
that a batch-statistics BatchNorm cancels, ~1e-17) from being compared relative to its
own noise: it must agree within 1e-9 of its group's scale instead.

Both modules run inside :class:`fastgraph.core.float64_ops.Float64Reference`: CELU with a
float64-exact gradient, and max pools whose gradient at a tie is shared among the tied
values instead of going to whichever one rounding made largest, so that two roundings of
the same function (a GPU's convolution algorithms, a Dirac-initialised network) are not
read as two functions.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import keystr, tree_flatten_with_path

from fastgraph.core.float64_ops import Float64Reference

RTOL = 1e-5
FLOOR = 1e-4  # fraction of the group's scale below which a tensor is compared to the group's
ATOL = 1e-30  # only an all-zero group needs it: float64 exact rewrites of zero give zero
VERIFY_IMAGES = 32  # the float64 check batch: large enough for batch-statistics BN to be meaningful
STEP_LR = 1e-2  # the SGD step after which outputs are compared again (train mode)
SEED = 0  # the random generator's seed for both runs (dropout masks, stochastic ops)


def spread_indices(n: int, total: int) -> torch.Tensor:
    """``min(n, total)`` distinct int64 indices spread evenly over ``range(total)``, first
    and last included.

    A few images taken this way from a split stored class by class (the ImageFolder layout)
    hold every class, where the first few would all be airplanes.
    """
    return torch.linspace(0, total - 1, min(n, total)).round().long()


def verification_batch(images: torch.Tensor, labels: torch.Tensor, n: int = VERIFY_IMAGES):
    """The batch rewrites are checked on: ``n`` of ``images`` (float32 (N, 3, H, W),
    normalised) and their ``labels`` (int64 (N,)), spread over the N, so a class-sorted
    set gives every class and not n airplanes. :func:`verify` adds :func:`stress_batch`."""
    rows = spread_indices(n, len(images)).to(images.device)
    return images[rows], labels[rows]


def stress_batch(x: torch.Tensor, y: torch.Tensor | None):
    """A second check batch from ``(x, y)``: ``-1.5 * x - 1`` in reversed order, so most
    pre-activations of a freshly initialised network are negative and the images meet
    the batch statistics in another company."""
    return -1.5 * x.flip(0) - 1.0, (None if y is None else y.flip(0))


class ModelFailed(RuntimeError):
    """A module raised while the check ran it (the message says which run and the error)."""


def _leaves(out, prefix: str) -> dict[str, torch.Tensor]:
    """The floating-point tensors of a model output (a tensor, or a tuple/list/dict of
    them, nested), by path: ``outputs[0]``, ``outputs['logits']``."""
    flat, _ = tree_flatten_with_path(out)
    return {f"{prefix}{keystr(path)}": leaf.detach() for path, leaf in flat
            if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()}


def _loss(out, y: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy of the first 2-D output against ``y`` when that fits, plus the mean
    square of every other floating output, so every output reaches the gradients."""
    flat = [t for t in tree_flatten_with_path(out)[0] if isinstance(t[1], torch.Tensor)]
    tensors = [t for _, t in flat if t.is_floating_point() and t.requires_grad]
    if not tensors:
        raise ModelFailed("no output depends on the input or the parameters")
    first, rest = tensors[0], tensors[1:]
    if y is not None and first.dim() == 2 and len(first) == len(y) and int(y.max()) < first.shape[1]:
        loss = F.cross_entropy(first, y)
    else:
        loss = first.square().mean()
    return loss + sum(t.square().mean() for t in rest)


def observe(module: nn.Module, mode: str, batches, hold: frozenset[str] = frozenset(),
            ) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Everything :func:`verify` compares, from a float64 copy of ``module`` (untouched).

    Args:
        module: the module (any parameters; it is copied and converted to float64).
        mode: "train" (training mode: batch-statistics BN, gradients, a step) or
            "infer" (eval mode, outputs and buffers).
        batches: [(x float (N, C, H, W), labels int64 (N,) or None), ...].
        hold: parameters the SGD step leaves alone (those the other module froze).

    Returns:
        ({name: float64 tensor}, names of the parameters that do not require grad), where
        names are ``b<i>:outputs...``, ``b<i>:grad:<param or <input>>``, ``buffer:<name>``
        and ``stepped:outputs...``.

    Raises:
        ModelFailed: the module raised (the message names the run and the error).
    """
    model = copy.deepcopy(module).double()
    model.train(mode == "train")
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    seen: dict[str, torch.Tensor] = {}
    try:
        with torch.random.fork_rng(devices=[]), Float64Reference():
            torch.manual_seed(SEED)
            for i, (x, y) in enumerate(batches):
                leaf = x.detach().double().requires_grad_(mode == "train")
                # a copy goes in: a model that writes its input in place must not write the leaf
                if mode != "train":
                    with torch.no_grad():
                        seen.update(_leaves(model(leaf.clone()), f"b{i}:outputs"))
                    continue
                out = model(leaf.clone())
                seen.update(_leaves(out, f"b{i}:outputs"))
                model.zero_grad(set_to_none=True)
                _loss(out, y).backward()
                if leaf.grad is not None:  # absent when nothing reaches the input: a mismatch
                    seen[f"b{i}:grad:<input>"] = leaf.grad.detach()
                seen.update({f"b{i}:grad:{n}": p.grad.detach().clone()
                             for n, p in model.named_parameters() if p.grad is not None})
                if i == 0:
                    first_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                   if p.grad is not None}
            seen.update({f"buffer:{n}": b.detach().clone() for n, b in model.named_buffers()
                         if b.is_floating_point()})
            if mode == "train":
                with torch.no_grad():
                    for n, p in model.named_parameters():
                        if n in first_grads and n not in hold:
                            p.sub_(STEP_LR * first_grads[n])
                    seen.update(_leaves(model(batches[0][0].detach().double()), "stepped:outputs"))
    except ModelFailed:
        raise
    except Exception as exc:  # the user's model or a rewrite of it raised: a reason, not a crash
        text = str(exc).strip().splitlines()
        raise ModelFailed(f"{type(exc).__name__}: {text[0] if text else ''}"[:300]) from None
    return seen, frozen


class Verification(NamedTuple):
    """The float64 comparison of a module before and after a rewrite.

    ``max_output_diff`` and ``max_grad_diff`` are relative: max |a - b| / max |a| over
    the output tensors (the gradient tensors; None in infer mode); ``tolerance`` is
    :data:`RTOL`; ``worst`` names the comparison nearest to (or furthest over) its
    tolerance in words; ``results`` is ``after``'s observation, the reference for the next
    pass.
    """

    ok: bool
    max_output_diff: float
    max_grad_diff: float | None
    tolerance: float
    worst: str
    results: tuple


def _scale(t: torch.Tensor) -> float:
    return t.abs().max().item() if t.numel() else 0.0


def _group(name: str) -> str:
    """The kind and batch of an observed tensor: ``b0:outputs``, ``b1:grad``, ``buffer``..."""
    head, _, rest = name.partition(":")
    return head if head in ("buffer", "stepped") else f"{head}:{rest.split(':')[0].split('[')[0]}"


def _relative(a: torch.Tensor, b: torch.Tensor, group_scale: float) -> float:
    """max |a - b| / max(max |a|, FLOOR * group_scale); inf for another shape."""
    if a.shape != b.shape:
        return float("inf")
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    scale = max(_scale(a), FLOOR * group_scale)
    if scale == 0.0:
        return 0.0 if diff <= ATOL else float("inf")
    return diff / scale


def compare(reference: tuple, results: tuple, *, allow_frozen: bool = False) -> tuple[bool, dict, str]:
    """Compare two observations: (ok, {name: relative difference}, the worst in words).

    A name seen in one observation only is a mismatch, except the gradient of a
    parameter ``results``' module froze when ``allow_frozen`` (a training-time pass in
    its identity configuration may freeze weights by design).
    """
    ref, ref_frozen = reference
    new, new_frozen = results
    diffs: dict[str, float] = {}
    missing = []
    groups: dict[str, float] = {}
    for name, t in ref.items():
        groups[_group(name)] = max(groups.get(_group(name), 0.0), _scale(t))
    for name in sorted(ref.keys() | new.keys()):
        if name in ref and name in new:
            if ":grad:" in name and ref[name].shape != new[name].shape:
                continue  # a parameter re-shaped under its old name (whitening's 1x1 conv): a new one
            diffs[name] = _relative(ref[name], new[name], groups[_group(name)])
            continue
        if name.startswith("buffer:"):
            continue  # a rewrite may drop a module's buffers (fold_bn) or add its own (whitening)
        param = name.split(":grad:", 1)[1] if ":grad:" in name else None
        if allow_frozen and param is not None and name in ref and param in new_frozen:
            continue
        if param is not None and name in new and param in ref_frozen:
            continue  # the rewrite unfroze nothing it was asked to: the reference had no gradient here
        missing.append(f"{name} ({'only before' if name in ref else 'only after'})")
    if missing:
        return False, diffs, "present in one module only: " + ", ".join(missing[:4])
    if not diffs:
        return True, diffs, "nothing to compare"
    worst = max(diffs, key=diffs.get)
    ok = all(d <= RTOL for d in diffs.values())
    return ok, diffs, f"{worst} by {diffs[worst]:.3g} (relative; tolerance {RTOL:g})"


def verify(before: nn.Module, after: nn.Module, mode: str, batch, reference=None, *,
           allow_frozen: bool = False) -> Verification:
    """Compare ``before`` and ``after`` in float64 on ``batch`` and its :func:`stress_batch`.

    Args:
        before, after: the modules; neither is modified (copies run).
        mode: "train" (batch-statistics BN, outputs, gradients, buffers, a step) or
            "infer" (eval mode, outputs and buffers).
        batch: (x float (N, C, H, W), labels int64 (N,) or None).
        reference: ``observe(before, ...)`` if already computed (same batches).
        allow_frozen: see :func:`compare`; the parameters ``after`` froze are then left
            out of both modules' SGD step too, as are re-shaped parameters always.

    Returns:
        A :class:`Verification`; ``ok`` is False with a reason when ``after`` (or
        ``before``) raises (:class:`ModelFailed` is not raised from here).
    """
    batches = [batch, stress_batch(*batch)]
    # Left out of the SGD step in both: what ``after`` froze by design, and parameters a
    # rewrite re-shaped under their old names (a step on them is a step on another function).
    shapes = {n: p.shape for n, p in before.named_parameters()}
    hold = frozenset(n for n, p in after.named_parameters()
                     if (allow_frozen and not p.requires_grad) or (n in shapes and shapes[n] != p.shape))
    try:
        ref = reference or observe(before, mode, batches, hold)
    except ModelFailed as exc:
        return Verification(False, float("inf"), None, RTOL, f"the module before it fails: {exc}", None)
    try:
        new = observe(after, mode, batches, hold)
    except ModelFailed as exc:
        return Verification(False, float("inf"), None, RTOL, f"the rewritten module fails: {exc}", None)
    ok, diffs, worst = compare(ref, new, allow_frozen=allow_frozen)
    outputs = [d for n, d in diffs.items() if "outputs" in n]
    grads = [d for n, d in diffs.items() if ":grad:" in n]
    return Verification(ok, max(outputs, default=0.0), max(grads, default=0.0) if mode == "train" else None,
                        RTOL, worst, new)


def calibrated(module: nn.Module, x: torch.Tensor) -> nn.Module:
    """A copy of ``module`` whose BatchNorm layers hold non-trivial statistics and affine
    parameters, for checking inference rewrites of an untrained model.

    A freshly built BatchNorm has running mean 0, variance 1, weight 1 and bias 0, with
    which a fold that forgets any of them still looks right. The copy's running
    statistics are the cumulative averages over ``x`` (float (N, C, H, W)) in training
    mode, and its weights and biases are drawn around 1 and 0 (seeded). The copy is
    returned in ``module``'s mode.
    """
    twin = copy.deepcopy(module)
    norms = [m for m in twin.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    if not norms:
        return twin
    training = twin.training
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
            if m.affine:
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=generator))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=generator))
        twin.train()
        for chunk in x.split(max(2, len(x) // 2)):
            if len(chunk) >= 2:
                twin(chunk)
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
    return twin.train(training)
