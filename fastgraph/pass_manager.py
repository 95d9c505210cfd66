"""Run a list of graph passes, lint after each, and verify every one on real data.

For every *exact* pass the manager compares the module before and after on a real
CIFAR-10 batch in float64: the outputs and, in train mode, the gradients of the
cross-entropy loss with respect to the input and to every parameter the two modules
share by name. If any differs beyond tolerance it keeps the pre-pass module and reports
the refusal with the measured difference (the torch.fx pass-manager idea of checking
after each pass, with numerics in place of a lint only).

A *training-time* pass changes the function by design, so it is checked in its
*identity configuration* (``fastgraph.passes.Identity``: ghost BN with one split,
stochastic depth with survival 1, a swap to the same activation, whitening whose next
layer reproduces the stem...): the same rewrite made with those options must pass the
exact check, or the pass is refused before its real configuration is applied.

After every pass, exact or not, each node of the graph before it that the pass did not
declare rewritten must still be there, with its op and target: a pass (or its dead-code
clean-up) that drops a statement it did not mean to, such as an in-place residual
``out.add_(x)``, is refused. The manager times nothing itself.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from fastgraph import passes as registry
from fastgraph.errors import UserError

# Relative tolerance of the float64 check. The modules hold float32 weights (a fold is
# computed in float64 and rounded once to float32), so honest rewrites differ by a few
# float32 ulps of the output scale; a wrong rewrite differs by orders of magnitude more.
RTOL = 1e-5
VERIFY_IMAGES = 32  # the float64 check batch: large enough for batch-statistics BN to be meaningful


def verification_batch(images: torch.Tensor, labels: torch.Tensor, n: int = VERIFY_IMAGES):
    """The batch exact passes are checked on: ``n`` of ``images`` (float32 (N, 3, H, W),
    normalised) and their ``labels`` (int64 (N,)), spread over the N, so a class-sorted
    set gives every class and not n airplanes."""
    from fastgraph.data import spread_indices

    rows = spread_indices(n, len(images)).to(images.device)
    return images[rows], labels[rows]


def _celu_float64(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """CELU (Barron 2017) from elementary ops, whose float64 gradient is exact.

    PyTorch's own CELU backward rounds alpha to float32 before taking its reciprocal
    (``derivatives.yaml``: ``elu_backward(grad, alpha, 1, 1.0/alpha.toFloat(), ...)``): in
    float64, every gradient through ``CELU(alpha=0.075)`` or ``CELU(0.3)`` (Page's alphas,
    not exact in float32) is off by up to 4e-8 relative, which a BatchNorm backward that
    cancels most of a gradient can lift above the check's tolerance. The exponent's
    argument is taken at min(x, 0), so no inf (and no NaN gradient) comes from large x;
    ``x`` is not saved for the backward, so the in-place form may overwrite it.
    """
    positive = x > 0
    negative_part = torch.where(positive, torch.zeros((), dtype=x.dtype, device=x.device), x)
    return torch.where(positive, x, alpha * torch.expm1(negative_part / alpha))


class _ExactFloat64Reference(TorchFunctionMode):
    """Computes CELU with :func:`_celu_float64` for float64 tensors (modules, ``F.celu``,
    ``torch.celu`` and their in-place forms), so the check compares two float64 functions
    and not PyTorch's float32-rounded CELU gradient against a correct one."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.celu, torch.celu, torch.celu_) and args and args[0].dtype == torch.float64:
            x = args[0]
            alpha = args[1] if len(args) > 1 else kwargs.get("alpha", 1.0)
            inplace = func is torch.celu_ or (args[2] if len(args) > 2 else kwargs.get("inplace", False))
            y = _celu_float64(x, float(alpha))
            return x.copy_(y) if inplace else y
        return func(*args, **kwargs)


@dataclass
class PassOutcome:
    """What one pass did: status is applied, refused (an exact pass whose check failed) or no-op."""

    name: str
    exactness: str
    status: str
    rewrites: int = 0
    max_output_diff: float | None = None
    max_grad_diff: float | None = None
    tolerance: float | None = None
    flops_before: float | None = None  # forward FLOPs per image
    flops_after: float | None = None
    bytes_before: float | None = None  # forward bytes moved per image (eager, unfused)
    bytes_after: float | None = None
    identity: dict | None = None  # a training-time pass: the options its check ran with
    message: str = ""


@dataclass
class PassReport:
    """The outcome of every pass, in order, for one mode."""

    mode: str
    outcomes: list[PassOutcome] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready: ``{"mode", "passes": [one dict per PassOutcome]}``."""
        return {"mode": self.mode, "passes": [asdict(o) for o in self.outcomes]}

    @property
    def applied(self) -> list[str]:
        """Names of the passes applied, in order."""
        return [o.name for o in self.outcomes if o.status == "applied"]


def _forward_backward(gm: fx.GraphModule, mode: str, x: torch.Tensor, y: torch.Tensor | None):
    """Float64 outputs and (train mode) gradients of a copy of ``gm``; ``gm`` is untouched."""
    model = copy.deepcopy(gm).double()
    model.train(mode == "train")
    x = x.detach().double().requires_grad_(mode == "train")
    if mode != "train":
        with torch.no_grad(), _ExactFloat64Reference():
            return model(x).detach(), {}
    with _ExactFloat64Reference():
        out = model(x)
    loss = F.cross_entropy(out, y) if y is not None and out.dim() == 2 else out.square().mean()
    loss.backward()
    grads = {"<input>": x.grad.detach()}
    grads.update({n: p.grad.detach() for n, p in model.named_parameters() if p.grad is not None})
    return out.detach(), grads


def _max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max |a - b|, the tolerance for it): RTOL times the larger of 1 and max |a|."""
    if a.shape != b.shape:
        return float("inf"), 0.0
    return (a - b).abs().max().item(), RTOL * max(1.0, a.abs().max().item())


class Verification(NamedTuple):
    """The float64 comparison of a module before and after a rewrite."""

    ok: bool
    max_output_diff: float
    max_grad_diff: float | None  # over the input and every shared parameter; None in infer mode
    tolerance: float  # of the outputs: RTOL * max(1, max |output|)
    worst: str  # the comparison nearest to (or furthest over) its own tolerance, in words
    results: tuple  # ``after``'s (outputs, gradients), the reference for the next pass


def verify(before: fx.GraphModule, after: fx.GraphModule, mode: str,
           batch: tuple[torch.Tensor, torch.Tensor | None], reference=None) -> Verification:
    """Compare ``before`` and ``after`` on ``batch`` in float64.

    Each tensor (the outputs; in train mode the gradient w.r.t. the input and to every
    parameter both modules have with the same shape) must agree within RTOL times the larger of 1 and its
    largest magnitude in ``before``.

    Args:
        before, after: the modules; neither is modified (copies run).
        mode: "train" (batch-statistics BN, outputs and gradients) or "infer" (eval, outputs).
        batch: (x float (N, 3, H, W), labels int64 (N,) or None).
        reference: ``_forward_backward(before, ...)`` if already computed.
    """
    x, y = batch
    ref_out, ref_grads = reference or _forward_backward(before, mode, x, y)
    out, grads = _forward_backward(after, mode, x, y)
    out_diff, tol = _max_rel_diff(ref_out, out)
    checks = [("outputs", out_diff, tol)]
    grad_diff = None
    if mode == "train":
        # A parameter a rewrite re-shaped under its old name (whitening's 1x1 conv takes the
        # stem's name) is a new parameterisation: its gradient has nothing to match.
        common = sorted(k for k in ref_grads.keys() & grads.keys() if ref_grads[k].shape == grads[k].shape)
        grad_checks = [(f"gradient of {name}", *_max_rel_diff(ref_grads[name], grads[name]))
                       for name in common]
        grad_diff = max((d for _, d, _ in grad_checks), default=0.0)
        checks += grad_checks
    what, diff, limit = max(checks, key=lambda c: c[1] / c[2] if c[2] else float("inf"))
    ok = all(d <= t for _, d, t in checks)
    return Verification(ok, out_diff, grad_diff, tol, f"{what} by {diff:.3g} (tolerance {limit:.3g})",
                        (out, grads))


def lost_nodes(before: fx.GraphModule, after: fx.GraphModule, declared: frozenset[str]) -> list[str]:
    """Names of ``before``'s nodes missing from ``after`` (or with another op or target)
    that the pass did not declare rewritten. Nodes that were already dead (unused and
    free of side effects) in ``before`` are not counted: clean-up may drop them."""
    from fastgraph.passes._fx import has_side_effect

    kept = {n.name: n for n in after.graph.nodes}
    lost = []
    for node in before.graph.nodes:
        if node.name in declared or (not node.users and not has_side_effect(before, node)):
            continue
        now = kept.get(node.name)
        if now is None or now.op != node.op or now.target != node.target:
            lost.append(node.name)
    return lost


def _check_identity(info, gm: fx.GraphModule, options: dict, batch, outcome: PassOutcome) -> str | None:
    """Check ``info``'s identity configuration on ``gm``; fill ``outcome``; return why it
    is refused, or None."""
    identity = info.identity(gm, options, len(batch[0]))
    if isinstance(identity, str):
        outcome.message = f"no identity configuration for this graph ({identity}); "
        return None
    outcome.identity = {k: v for k, v in identity.options.items() if not isinstance(v, torch.Tensor)}
    try:
        same = info.fn(gm, **{**options, **identity.options})
        same.graph.lint()
    except (UserError, ValueError) as exc:
        return f"its identity configuration {outcome.identity} fails: {exc}"
    if registry.rewrite_count(gm, same) == 0:
        outcome.message = f"identity configuration {outcome.identity} rewrites nothing; "
        return None
    lost = lost_nodes(gm, same, registry.declared_rewritten(gm, same))
    if lost:
        return f"its identity configuration drops nodes it did not declare: {', '.join(lost)}"
    check = verify(gm, same, identity.mode, batch)
    outcome.max_output_diff, outcome.max_grad_diff = check.max_output_diff, check.max_grad_diff
    outcome.tolerance = check.tolerance
    if not check.ok:
        return (f"its identity configuration {outcome.identity} is not exact ({identity.mode} mode): "
                f"{check.worst}")
    outcome.message = f"identity configuration exact ({identity.mode} mode); "
    return None


def _costs(gm: fx.GraphModule, example: torch.Tensor | None, batch_size: int):
    """(forward FLOPs per image, forward bytes per image at ``batch_size``) of ``gm``, or (None, None)."""
    if example is None:
        return None, None
    from fastgraph.roofline import node_costs  # deferred: FLOP counting is not needed to verify

    costs = node_costs(gm, example, batch_size=batch_size)
    return sum(c.flops for c in costs), sum(c.bytes for c in costs)


def run_passes(gm: fx.GraphModule, names: list[str], *, mode: str,
               batch: tuple[torch.Tensor, torch.Tensor | None] | None = None,
               options: dict[str, dict] | None = None,
               cost_example: torch.Tensor | None = None,
               cost_batch_size: int = 512, checks: bool = True) -> tuple[fx.GraphModule, PassReport]:
    """Apply the passes ``names`` in order to ``gm`` for ``mode``.

    Args:
        gm: the traced model; never modified (passes work on copies).
        names: registered pass names (see ``fastgraph.passes.REGISTRY``).
        mode: "train" or "infer"; a pass registered for neither raises.
        batch: a real batch (x float32 (N, 3, 32, 32) normalised, labels int64 (N,)),
            needed when the list holds an exact pass or a training-time pass (whose
            identity configuration is checked on it).
        options: per-pass keyword options, e.g. ``{"whitening": {"images": x}}``.
        cost_example: a (1, 3, H, W) input; when given, FLOPs and bytes per image are
            counted before and after every pass.
        cost_batch_size: the batch over which parameter reads are spread in the byte count.
        checks: False skips the float64 checks (exact passes, identity configurations),
            for a rebuild of a pass list already checked on the same graph; node
            survival is still checked.

    Returns:
        (the final GraphModule, a ``PassReport``).

    Raises:
        UserError: unknown pass, a pass that does not apply in ``mode``, a pass to
            verify without a batch to verify it on, or a data pass without its data option.
    """
    if mode not in registry.MODES:
        raise UserError(f"mode must be one of {', '.join(registry.MODES)}, not {mode!r}")
    options = options or {}
    infos = []
    for name in names:
        try:
            info = registry.get(name)
        except KeyError as exc:
            raise UserError(exc.args[0]) from None
        if mode not in info.modes:
            raise UserError(f"pass {name} applies in {'/'.join(info.modes)} mode, not {mode}")
        if info.needs_data and "images" not in options.get(name, {}):
            raise UserError(f"pass {name} needs real training images: give it the option 'images'")
        if checks and (info.exact or info.identity is not None) and batch is None:
            kind = "is exact" if info.exact else "is checked in its identity configuration"
            raise UserError(f"pass {name} {kind} and must be verified: give a real data batch")
        infos.append(info)

    report = PassReport(mode)
    reference = None  # float64 results of the current module, reused across exact passes
    flops, nbytes = _costs(gm, cost_example, cost_batch_size)
    for info in infos:
        outcome = PassOutcome(info.name, info.exactness, "no-op", flops_before=flops,
                              bytes_before=nbytes, flops_after=flops, bytes_after=nbytes)
        report.outcomes.append(outcome)
        try:
            after = info.fn(gm, **options.get(info.name, {}))
            after.graph.lint()
        except (UserError, ValueError) as exc:
            # A pass's own guard rejecting the user's options or batch: the user's to fix.
            message = str(exc).removeprefix(f"{info.name}: ")  # PassOptionError names the pass already
            raise UserError(f"pass {info.name}: {message}") from None
        outcome.rewrites = registry.rewrite_count(gm, after)
        if outcome.rewrites == 0:
            outcome.message = "nothing to rewrite"
            continue
        lost = lost_nodes(gm, after, registry.declared_rewritten(gm, after))
        if lost:
            outcome.status = "refused"
            outcome.message = (f"dropped nodes it did not declare rewritten: {', '.join(lost)}; "
                               "kept the module before it")
            continue
        if not checks:
            outcome.message = "applied unchecked (checked on this graph before)"
        elif info.exact:
            if reference is None:
                reference = _forward_backward(gm, mode, *batch)
            check = verify(gm, after, mode, batch, reference)
            outcome.max_output_diff, outcome.max_grad_diff = check.max_output_diff, check.max_grad_diff
            outcome.tolerance = check.tolerance
            if not check.ok:
                outcome.status = "refused"
                outcome.message = f"differs: {check.worst}; kept the module before it"
                continue
            reference = check.results
        else:
            refusal = (_check_identity(info, gm, options.get(info.name, {}), batch, outcome)
                       if info.identity is not None else None)
            if refusal is not None:
                outcome.status = "refused"
                outcome.message = f"{refusal}; kept the module before it"
                continue
            reference = None  # the function changed: the next exact pass needs a new reference
            outcome.message += "changes the function: train with it"
        outcome.status = "applied"
        gm = after
        flops, nbytes = _costs(gm, cost_example, cost_batch_size)
        outcome.flops_after, outcome.bytes_after = flops, nbytes
    return gm, report
