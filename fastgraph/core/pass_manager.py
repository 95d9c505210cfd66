"""Run a list of graph passes, lint after each, and verify every one on real data.

For every *exact* pass the manager compares the module before and after in float64
(:func:`fastgraph.core.verification.verify`: outputs on a real CIFAR-10 batch and a stress
batch, in train mode the gradients of the input and of every parameter, the buffers, and
the outputs after one SGD step, each relative to its own scale). If any differs beyond
tolerance, or the rewritten module fails to run, it keeps the pre-pass module and
reports the refusal with the measured difference or the error (the torch.fx
pass-manager idea of checking after each pass, with numerics in place of a lint only).
In inference mode the checks run on a *calibrated twin* of the module
(:func:`fastgraph.core.verification.calibrated`: BatchNorm with real running statistics and
non-trivial affine parameters), to which every pass is applied alongside, since a
freshly built BatchNorm (mean 0, variance 1, weight 1, bias 0) makes a wrong fold look
right.

A *training-time* pass changes the function by design, so it is checked in its
*identity configuration* (``fastgraph.passes.Identity``: ghost BN with one split,
stochastic depth with survival 1, a swap to the same activation, whitening whose next
layer reproduces the stem...): the same rewrite made with those options must pass the
exact check, or the pass is refused before its real configuration is applied.

After every pass, exact or not, each node of the graph before it that the pass did not
declare rewritten must still be there, with its op and target: a pass (or its dead-code
clean-up) that drops a statement it did not mean to, such as an in-place residual
``out.add_(x)``, is refused. So is one after which a module's forward or backward hooks
no longer run (a module replaced by another, as a ghost BatchNorm replaces a BatchNorm2d).
The manager times nothing itself.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.fx as fx

from fastgraph import passes as registry
from fastgraph.core.console import progress
from fastgraph.core.errors import UserError
from fastgraph.core.verification import VERIFY_IMAGES, calibrated, verification_batch, verify  # noqa: F401


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


def _hooks(gm: fx.GraphModule) -> dict[str, tuple]:
    """The hooks of every module ``gm``'s graph calls, by qualified name: forward, forward
    pre-, backward and backward pre-hooks, each as its function (a deep copy keeps a plain
    function, and the function of a bound method or ``functools.partial``)."""
    def key(hook):
        return getattr(hook, "__func__", getattr(hook, "func", hook))

    found = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target in found:
            continue
        mod = gm.get_submodule(node.target)
        hooks = tuple(tuple(key(h) for h in d.values()) for d in (
            mod._forward_hooks, mod._forward_pre_hooks, mod._backward_hooks, mod._backward_pre_hooks))
        if any(hooks):
            found[node.target] = hooks
    return found


def lost_hooks(before: fx.GraphModule, after: fx.GraphModule) -> list[str]:
    """Qualified names of the modules ``before`` calls with hooks whose hooks ``after`` no
    longer runs: the module is gone, replaced by one without them (a swapped activation,
    a ghost BatchNorm), or no longer called. A hook may change what its module computes,
    and the user added it to run."""
    kept = _hooks(after)
    return [name for name, hooks in _hooks(before).items() if kept.get(name) != hooks]


def _float64(gm: fx.GraphModule, options: dict) -> tuple[fx.GraphModule, dict]:
    """A float64 copy of ``gm`` and ``options`` with its floating tensors in float64."""
    def widen(v):
        return v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    return copy.deepcopy(gm).double(), {k: widen(v) for k, v in options.items()}


def _check_identity(info, gm: fx.GraphModule, options: dict, batch, outcome: PassOutcome) -> str | None:
    """Check ``info``'s identity configuration on ``gm`` (the module or its calibrated
    twin); fill ``outcome``; return why it is refused, or None.

    The identity configuration is built on a float64 copy of ``gm``, from float64 options:
    a pass that computes weights (whitening's 1x1 conv reproducing the stem) would otherwise
    round them to the model's float32, and the float64 check would compare two functions
    about 4e-8 apart, where a max-pool window with two values that close sends the gradient
    to another pixel: ResNet-9 under page2019 was refused that way on real CIFAR-10, its
    input gradient off by 0.0165 (on a CPU, and in the H200 check of
    bench/results/gpu_check-nvidia-h200-2026-12-04.json). In float64 it is exact to ~1e-15.
    """
    gm, options = _float64(gm, options)
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
    check = verify(gm, same, identity.mode, batch, allow_frozen=True)
    outcome.max_output_diff, outcome.max_grad_diff = check.max_output_diff, check.max_grad_diff
    outcome.tolerance = check.tolerance
    if not check.ok:
        return (f"its identity configuration {outcome.identity} is not exact ({identity.mode} mode): "
                f"{check.worst}")
    outcome.message = f"identity configuration exact ({identity.mode} mode); "
    return None


def _costs(gm: fx.GraphModule, costs) -> tuple[float | None, float | None]:
    """``costs(gm)`` (FLOPs, bytes) when a cost model is given, else (None, None)."""
    return (None, None) if costs is None else costs(gm)


def run_passes(gm: fx.GraphModule, names: list[str], *, mode: str,
               batch: tuple[torch.Tensor, torch.Tensor | None] | None = None,
               options: dict[str, dict] | None = None,
               costs: Callable[[fx.GraphModule], tuple[float, float]] | None = None,
               checks: bool = True) -> tuple[fx.GraphModule, PassReport]:
    """Apply the passes ``names`` in order to ``gm`` for ``mode``.

    Args:
        gm: the traced model; never modified (passes work on copies).
        names: registered pass names (see ``fastgraph.passes.REGISTRY``).
        mode: "train" or "infer"; a pass registered for neither raises.
        batch: a real batch (x float32 (N, 3, 32, 32) normalised, labels int64 (N,)),
            needed when the list holds an exact pass or a training-time pass (whose
            identity configuration is checked on it).
        options: per-pass keyword options, e.g. ``{"whitening": {"images": x}}``.
        costs: a cost model, ``gm -> (FLOPs, bytes)`` (the roofline's forward FLOPs and
            bytes per image, :func:`fastgraph.perf.roofline.per_image_costs`); when
            given, counted before and after every pass. The pass manager takes it as an
            argument: core knows nothing of the roofline.
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
    flops, nbytes = _costs(gm, costs)
    # What the checks run on: the module itself, or in inference its calibrated twin.
    twin = calibrated(gm, batch[0]) if checks and mode == "infer" and batch is not None else gm
    with progress("passes, checked in float64", total=len(infos)) as update:
        for i, info in enumerate(infos):
            update(completed=i, note=info.name)
            gm, twin, reference, flops, nbytes = _apply_one(
                info, gm, twin, reference, flops, nbytes, report, mode=mode, batch=batch,
                options=options.get(info.name, {}), checks=checks, costs=costs)
    return gm, report


def _apply_one(info, gm, twin, reference, flops, nbytes, report: PassReport, *, mode, batch,
               options: dict, checks: bool, costs):
    """One pass of :func:`run_passes`: apply, check, record its outcome in ``report``.

    Returns the new (module, check twin, float64 reference, FLOPs, bytes): the inputs
    unchanged when the pass is a no-op or refused.
    """
    outcome = PassOutcome(info.name, info.exactness, "no-op", flops_before=flops,
                          bytes_before=nbytes, flops_after=flops, bytes_after=nbytes)
    report.outcomes.append(outcome)
    unchanged = gm, twin, reference, flops, nbytes
    try:
        after = info.fn(gm, **options)
        after.graph.lint()
    except (UserError, ValueError) as exc:
        # A pass's own guard rejecting the user's options or batch: the user's to fix.
        message = str(exc).removeprefix(f"{info.name}: ")  # PassOptionError names the pass already
        raise UserError(f"pass {info.name}: {message}") from None
    outcome.rewrites = registry.rewrite_count(gm, after)
    if outcome.rewrites == 0:
        outcome.message = "nothing to rewrite"
        return unchanged
    twin_after = after if twin is gm else info.fn(twin, **options)
    lost = lost_nodes(gm, after, registry.declared_rewritten(gm, after))
    if lost:
        outcome.status = "refused"
        outcome.message = (f"dropped nodes it did not declare rewritten: {', '.join(lost)}; "
                           "kept the module before it")
        return unchanged
    hooked = lost_hooks(gm, after)
    if hooked:
        outcome.status = "refused"
        outcome.message = (f"drops the hooks of {', '.join(hooked)}, which would no longer run; "
                           "kept the module before it")
        return unchanged
    if not checks:
        outcome.message = "applied unchecked (checked on this graph before)"
    elif info.exact:
        check = verify(twin, twin_after, mode, batch, reference)
        outcome.max_output_diff, outcome.max_grad_diff = check.max_output_diff, check.max_grad_diff
        outcome.tolerance = check.tolerance
        if not check.ok:
            outcome.status = "refused"
            outcome.message = f"differs: {check.worst}; kept the module before it"
            return unchanged
        reference = check.results
    else:
        refusal = (_check_identity(info, twin, options, batch, outcome)
                   if info.identity is not None else None)
        if refusal is not None:
            outcome.status = "refused"
            outcome.message = f"{refusal}; kept the module before it"
            return unchanged
        reference = None  # the function changed: the next exact pass needs a new reference
        outcome.message += ("changes the function: train with it" if "train" in info.modes
                            else "changes the function at inference only: no training needed")
    outcome.status = "applied"
    gm, twin = after, (after if twin is gm else twin_after)
    flops, nbytes = _costs(gm, costs)
    outcome.flops_after, outcome.bytes_after = flops, nbytes
    return gm, twin, reference, flops, nbytes
