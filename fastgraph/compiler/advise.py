"""Per-model advice: which of fastgraph's tricks apply to *this* model, where, what the
roofline predicts they save, and what their sources and fastgraph's benchmarks say of
their effect on accuracy.

For every registered pass (``fastgraph.passes.REGISTRY``) that serves the mode, the pass
is applied to the traced model (passes never modify their input) and:

- whether it fires and where: :func:`fastgraph.passes.rewrite_count` sites, and the node
  names it declared rewritten (:func:`fastgraph.passes.declared_rewritten`) or whose
  module it replaced or changed (a frozen BN weight);
- forward FLOPs and bytes per image before and after: sums of
  :func:`fastgraph.perf.roofline.node_costs` over the graph (bytes at the precision's
  element size, parameter reads amortised over the batch);
- the roofline time of one step of ``batch_size`` images before and after: the sum over
  nodes of max(FLOPs / peak, bytes / bandwidth) (:func:`fastgraph.perf.nodes.node_points`;
  a training step is forward, backward and an SGD update);
- the predicted gain: the fraction of that roofline time saved, 1 - after / before.

Tricks that are not graph passes are predicted from the same roofline model and say so:
precision (the advice's fp32 or tf32 against 16-bit: the peak rate and the bytes per
element change; at fp16 or bf16 already it does not apply),
channels-last (the roofline counts the same FLOPs and bytes in either layout, so it
predicts nothing), and the device-side augmentation kernel (its own bytes per image,
from ``kernels/augment.py``). Effects on accuracy come from the sources
(``../shared/sources``: Page 2019, Solomatov and Stepanov), each with its citation, and
from fastgraph's own CPU-scale benchmark (``bench/results/*.json``) where it compared
the trick's options; nothing else is claimed: "not measured" says so.

Nothing is verified or timed here: ``fastgraph optimize`` checks exact passes in float64
and measures steps; ``fastgraph train`` trains with the training-time ones.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn.functional as F
from rich.console import Group
from rich.padding import Padding
from rich.text import Text
from torch import nn

from fastgraph import passes as registry
from fastgraph.core.console import fitting_table, seconds, si
from fastgraph.core.errors import UserError

MODES = ("train", "infer")
REPO = Path(__file__).resolve().parents[2]
BENCH_RESULTS = REPO / "bench" / "results"
NOT_MEASURED = "not measured"
# Training images given to a data pass (whitening's patch statistics). The costs depend on
# the shapes the pass makes, not on the filters' values, so fewer than training uses.
DATA_IMAGES = 1000
GHOST_OPTION = "ghost_batch_size"

# Registered passes that are no speed or accuracy trick, and why they are left out.
LEFT_OUT = {
    "nvtx_ranges": "profiling ranges for Nsight Systems (fastgraph profile), not a speed or "
                   "accuracy trick; the roofline would count its identity calls as copies",
}

_PAGE = ("Page, How to Train Your ResNet 8: Bag of Tricks, Myrtle.ai 2019 "
         "(shared/sources/001_61129e65b804ac2b.txt)")
_SOLOMATOV = ("Solomatov and Stepanov, Speeding up ResNet training "
              "(shared/sources/000_2275a625d687c22e.txt)")
_EXACT_CLAIM = ("Exact: the same function, so the same accuracy (fastgraph optimize checks it in "
                "float64 against the model before keeping it).")

# Trick -> (citation, claim about accuracy as its source reports it). Page's numbers are
# ResNet-9 on the original CIFAR-10 on a V100, means of 50 runs where he says so.
ACCURACY = {
    "pool_before_activation": (
        f"{_PAGE}, section 'Moving max-pool layers'",
        "Exact ('no change at all to the function that the network is computing'); 3 s less "
        "of 24-epoch ResNet-9 training on a V100."),
    "pool_before_bn": (
        f"{_PAGE}, section 'Moving max-pool layers'",
        "Test accuracy 94.0% against 94.1% (mean of 50 runs) and 5 s less training; one "
        "extra epoch restores the accuracy."),
    "swap_activation": (
        f"{_PAGE}, section 'CELU activations'",
        "ReLU to CELU(alpha=0.075): test accuracy 94.1% to 94.3% (mean of 50 runs, 23 "
        "epochs), traded for 3 fewer epochs."),
    "ghost_batchnorm": (
        f"{_PAGE}, section 'Ghost batch norm'",
        "Ghost batches of 32 in batches of 512: 20-epoch test accuracy 94.1% to 94.2%."),
    "freeze_bn_scale": (
        f"{_PAGE}, section 'Frozen batch norm scales'",
        "BN scales fixed at 1 with CELU alpha x4 and a higher BN-bias learning rate: 18-epoch "
        "test accuracy 94.1% to 94.2%; without the bias learning rate change, 'substantially "
        "lower'."),
    "whitening": (
        f"{_PAGE}, section 'Input patch whitening'",
        "3x3 patch whitening then a learnable 1x1 conv: 17-epoch test accuracy 94.1% to 94.4%."),
    "tta_flip": (
        f"{_PAGE}, section 'Test-time augmentation'",
        "Mirror TTA: test accuracy 94.1% to 94.6% (13 epochs), 'the largest individual effect' "
        "of the post, at twice the inference computation."),
    "stochastic_depth": (
        f"{_SOLOMATOV}, sections 'Stochastic Depth' and 'Results'",
        "ResNet-20 on CIFAR-10: test accuracy 93.1% against 93.0%, trained in 1:30 instead of "
        "2:42 (1.8x) by skipping the dropped blocks."),
    "fold_bn": ("passes/fold_bn.py (registered exact; torch.nn.utils.fusion.fuse_conv_bn_eval)",
                _EXACT_CLAIM),
    "fuse_bn_activation": ("passes/fuse_bn_activation.py and kernels/bn_act.py (registered exact)",
                           "Exact to float32 rounding: the same BatchNorm and activation in one "
                           "Triton kernel (fastgraph optimize checks it before keeping it)."),
    "fuse_whitening": ("passes/whitening.py fuse_whitening (registered exact)", _EXACT_CLAIM),
    "precision": (
        f"{_PAGE}, section 'Aside: mixed precision training'; {_SOLOMATOV}, sections 'Half "
        "Precision' and 'Results'",
        "Page trains in plain fp16; proper mixed precision had 'no effect on final accuracy' against "
        "it. Solomatov and Stepanov: half precision 92.8% against fp32's 93.0% test accuracy on "
        "ResNet-20, and no faster (2:42)."),
    "channels_last": (
        "PyTorch documentation, torch.memory_format (torch.channels_last)",
        "The same values stored in NHWC order: the function is unchanged, up to the summation "
        "order of the convolution kernels chosen."),
    "augment_kernel": (
        "kernels/augment.py (module docstring)",
        "Bit-identical in fp32 to its plain-PyTorch reference: the same crops, flips and cutout "
        "as on the host."),
}


@dataclass(frozen=True)
class TrickAdvice:
    """What one trick would do to this model.

    Attributes:
        name: the pass name (``fold_bn``) or the trick (``precision``, ``channels_last``,
            ``augment_kernel``).
        kind: ``"exact pass"`` (same function), ``"training-time pass"`` (changes the function:
            train with it), ``"inference-time pass"`` (changes the function at inference
            only: TTA) or ``"roofline prediction"`` (not a graph pass).
        applies: whether it changes this model in this mode.
        reason: why it does not apply (None when it does).
        sites: rewrites the pass made (:func:`fastgraph.passes.rewrite_count`), or the
            nodes a non-pass trick touches.
        where: names of the graph nodes it rewrote, replaced or changed, in graph order.
        options: the pass options it was applied with (images given as their count).
        flops_before, flops_after: forward FLOPs per image (sums of ``node_costs``).
        bytes_before, bytes_after: forward bytes per image at the precision's element
            size, parameter reads amortised over the batch (sums of ``node_costs``).
        roofline_seconds_before, roofline_seconds_after: seconds per step of
            ``batch_size`` images on the profile (sum over nodes of max(FLOPs / peak,
            bytes / bandwidth); a training step is forward, backward and SGD update).
        predicted_gain: 1 - after / before of the roofline seconds (0.25: a quarter of the
            step's roofline time saved; negative: it costs time); None when not predicted.
        accuracy_source: {"citation", "claim"} from the trick's source, or None.
        measured: {"file", ...numbers} from ``bench/results``, or ``"not measured"``.
        notes: further computed facts and caveats, one sentence each.
    """

    name: str
    kind: str
    applies: bool
    reason: str | None = None
    sites: int = 0
    where: tuple[str, ...] = ()
    options: dict = field(default_factory=dict)
    flops_before: float | None = None
    flops_after: float | None = None
    bytes_before: float | None = None
    bytes_after: float | None = None
    roofline_seconds_before: float | None = None
    roofline_seconds_after: float | None = None
    predicted_gain: float | None = None
    accuracy_source: dict | None = None
    measured: dict | str = NOT_MEASURED
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """JSON-ready fields, in the order above (``where`` and ``notes`` as lists)."""
        record = dataclasses.asdict(self)
        return {**record, "where": list(self.where), "notes": list(self.notes)}


@dataclass(frozen=True)
class Advice:
    """The advice for one model: every trick, those that apply first, by predicted gain.

    Attributes:
        model: the model file, or the module's class name.
        mode: ``"train"`` or ``"infer"``. profile: the hardware profile's name.
        profile_name: the product it describes. precision: the precision of the costs.
        batch_size: images per step. input_shape: (C, H, W) of one image, pixels.
        images: what the data passes were given (e.g. "1000 CIFAR-10 training images
            from PATH"), or None when no data was available or no data pass serves the mode.
        baseline: the traced model's ``flops`` and ``bytes`` (forward, per image) and
            ``roofline_seconds`` (per step), as every trick's "before".
        tricks: one :class:`TrickAdvice` per trick: those that apply, by predicted gain
            (largest first; those without a prediction after), then those that do not.
        left_out: registered passes that are no trick, with the reason.
    """

    model: str
    mode: str
    profile: str
    profile_name: str
    precision: str
    batch_size: int
    input_shape: tuple[int, int, int]
    images: str | None
    baseline: dict
    tricks: tuple[TrickAdvice, ...]
    left_out: dict

    def trick(self, name: str) -> TrickAdvice:
        """The advice on trick ``name``; ``KeyError`` when there is none."""
        for t in self.tricks:
            if t.name == name:
                return t
        raise KeyError(name)

    def to_dict(self) -> dict:
        """The advice as JSON-ready data (what ``fastgraph advise --json`` writes after its header)."""
        step = "training step (forward, backward, SGD update)" if self.mode == "train" else "inference batch"
        units = {"flops": "forward FLOPs per image",
                 "bytes": f"forward bytes per image at {self.precision}, parameter reads amortised over "
                          f"{self.batch_size} images",
                 "roofline_seconds": f"seconds per {step} of {self.batch_size} images on {self.profile}: sum "
                                     "over nodes of max(FLOPs / peak, bytes / bandwidth)",
                 "predicted_gain": "1 - roofline_seconds_after / roofline_seconds_before"}
        return {
            "model": self.model, "mode": self.mode, "profile": self.profile,
            "profile_name": self.profile_name, "precision": self.precision, "batch_size": self.batch_size,
            "input_shape": list(self.input_shape), "images": self.images, "units": units,
            "baseline": dict(self.baseline),
            "tricks": [t.to_dict() for t in self.tricks],
            "left_out": dict(self.left_out),
        }

    def __rich__(self) -> Group:
        """The advice for a console: the ranked table, what does not apply, then each trick's
        sites, sources and measurements (fits 80 columns)."""
        return _render(self)


# ------------------------------------------------------------------------------ advise


def advise(model: nn.Module | str | os.PathLike, *, mode: str = "train", profile: str = "h100",
           precision: str = "bf16", batch_size: int = 512, data=None,
           input_shape: tuple[int, int, int] = (3, 32, 32), entry: str | None = None) -> Advice:
    """Which of fastgraph's tricks apply to ``model``, where, and what they are predicted to gain.

    Args:
        model: an ``nn.Module``, or a model file path (``.py``, loaded as ``fastgraph
            optimize`` loads it, with ``entry`` naming what builds the model).
        mode: ``"train"`` (the training step) or ``"infer"`` (inference): the passes
            registered for that mode are tried, and the roofline is that of the mode.
        profile: hardware profile name (``h100``...) or ``.toml`` path.
        precision: ``fp32``, ``tf32``, ``fp16`` or ``bf16``: the peak rate and the bytes
            per floating-point element of every cost (the ``precision`` trick compares
            it with 16-bit, and does not apply at fp16 or bf16).
        batch_size: images per step (parameter reads are amortised over them).
        data: CIFAR-10 for passes that need images (whitening): a path (``--data``), a
            loaded :class:`fastgraph.data.CIFAR10`, or None for ``$FASTGRAPH_DATA``, then
            ``~/.cache/fastgraph/cifar10``; when none exists those passes say "needs
            data: not evaluated".
        input_shape: (C, H, W) of one input image, pixels; CIFAR-10 images are resized
            to H x W for the data passes.
        entry: the function, class or instance in a model file that builds the model.

    Returns:
        :class:`Advice`.

    Raises:
        UserError: unknown mode, profile or precision, a batch size below 1, a bad input
            shape, a model file that cannot be loaded or traced, a model that fails on
            an input of ``input_shape``, or data given that cannot be read.
    """
    from fastgraph.core.loading import load_model
    from fastgraph.core.tracing import check_runs, trace
    from fastgraph.data import CIFAR10, resolve_data_path
    from fastgraph.perf.roofline import load_profile

    if mode not in MODES:
        raise UserError(f"mode must be 'train' or 'infer', not {mode!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch size must be an integer >= 1, got {batch_size!r}")
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(v, int) and v >= 1 for v in shape):
        raise UserError(f"input shape must be three positive integers (C, H, W), got {input_shape!r}")
    hw = load_profile(profile)
    hw.peak(precision)  # one line for a precision the profile lacks, before any work

    source = None
    if not isinstance(model, nn.Module):
        source = str(model)
        model = load_model(model, entry)
    gm = trace(model, source, mode=mode)
    gm.train(mode == "train")
    # One image: every cost is per image and runs in eval mode, where batch norm takes one.
    example = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
    check_runs(gm, example)
    if data is not None and not isinstance(data, CIFAR10):
        resolve_data_path(data)  # a mistyped path is one line, even where no pass needs images
    wanted = any(info.needs_data and mode in info.modes for info in registry.REGISTRY.values())
    images, described = _images(data, shape) if wanted else (None, None)

    ctx = _Context(gm, example, hw, precision, mode, batch_size)
    tricks = [_pass_advice(ctx, info, images) for name, info in registry.REGISTRY.items()
              if name not in LEFT_OUT]
    tricks += [_precision(ctx), _channels_last(ctx), _augment_kernel(ctx)]
    return Advice(
        model=source if source is not None else type(model).__name__, mode=mode, profile=hw.name,
        profile_name=hw.display_name, precision=precision, batch_size=batch_size, input_shape=shape,
        images=described, baseline=ctx.baseline.as_dict(), tricks=tuple(_ranked(tricks)),
        left_out={name: why for name, why in LEFT_OUT.items() if name in registry.REGISTRY})


def _ranked(tricks: list[TrickAdvice]) -> list[TrickAdvice]:
    """Those that apply by predicted gain (largest first, unpredicted after), then the rest by name."""
    def key(t: TrickAdvice):
        if not t.applies:
            return (2, 0.0, t.name)
        if t.predicted_gain is None:
            return (1, 0.0, t.name)
        return (0, -t.predicted_gain, t.name)

    return sorted(tricks, key=key)


def _images(data, shape: tuple[int, int, int]) -> tuple[torch.Tensor | None, str | None]:
    """(normalised float32 (N, 3, H, W) CIFAR-10 training images of every class, what they
    are), or (None, None) when there is no data or the model does not take 3 channels."""
    from fastgraph.data import CIFAR10, default_data_dir, load_cifar10
    from fastgraph.training.trained import spread_training_images

    if shape[0] != 3:
        return None, None
    if data is None and not os.environ.get("FASTGRAPH_DATA") and not default_data_dir().exists():
        return None, None
    cifar = data if isinstance(data, CIFAR10) else load_cifar10(data)
    # As many patches as DATA_IMAGES images hold at 32x32, fewer images when they are larger.
    count = min(DATA_IMAGES, max(DATA_IMAGES * 32 * 32 // (shape[1] * shape[2]), 100))
    images, _ = spread_training_images(cifar, count)
    described = f"{count} CIFAR-10 training images from {cifar.source}"
    if tuple(images.shape[-2:]) != shape[1:]:
        images = F.interpolate(images, size=shape[1:], mode="bilinear", align_corners=False, antialias=True)
        described += f", resized to {shape[1]}x{shape[2]}"
    return images, described


@dataclass(frozen=True)
class _Costs:
    flops: float
    bytes: float
    seconds: float
    nodes: tuple[str, ...]  # nodes that compute or move something

    def as_dict(self) -> dict:
        return {"flops": self.flops, "bytes": self.bytes, "roofline_seconds": self.seconds}


class _Context:
    """The traced model, its example input, the profile and what every trick is measured against."""

    def __init__(self, gm, example, hw, precision, mode, batch_size):
        self.gm, self.example, self.hw = gm, example, hw
        self.precision, self.mode, self.batch_size = precision, mode, batch_size
        self.baseline = self.costs(gm)

    def costs(self, gm: fx.GraphModule, precision: str | None = None) -> _Costs:
        """Forward FLOPs and bytes per image (``node_costs``) and the roofline seconds per step
        (``node_points``) of ``gm`` at ``precision`` (default the advice's)."""
        from fastgraph.perf.nodes import node_points
        from fastgraph.perf.roofline import node_costs

        precision = precision or self.precision
        points = node_points(gm, self.hw, precision, mode=self.mode, batch_size=self.batch_size,
                             example=self.example)
        if self.mode == "infer":
            # An inference point is its node's node_costs times the batch (parameters read
            # once per batch): the sums per image need no second pass over the graph.
            flops = sum(p.flops for p in points) / self.batch_size
            moved = sum(p.bytes for p in points) / self.batch_size
        else:
            nodes = node_costs(gm, self.example, batch_size=self.batch_size, precision=precision)
            flops, moved = sum(c.flops for c in nodes), sum(c.bytes for c in nodes)
        return _Costs(flops, moved, sum(p.roofline_seconds for p in points), tuple(p.name for p in points))

    def compared(self, before: _Costs, after: _Costs) -> dict:
        """The before/after fields of a :class:`TrickAdvice`."""
        gain = 1 - after.seconds / before.seconds if before.seconds > 0 else None
        return {"flops_before": before.flops, "flops_after": after.flops, "bytes_before": before.bytes,
                "bytes_after": after.bytes, "roofline_seconds_before": before.seconds,
                "roofline_seconds_after": after.seconds, "predicted_gain": gain}


def _accuracy(name: str, info=None) -> dict | None:
    """{"citation", "claim"} for a trick from :data:`ACCURACY`; an exact pass missing there
    cites its own file for the claim that exactness makes; None for any other."""
    if name in ACCURACY:
        citation, claim = ACCURACY[name]
        return {"citation": citation, "claim": claim}
    if info is not None and info.exact:
        return {"citation": f"passes/{name}.py (registered exact)", "claim": _EXACT_CLAIM}
    return None


def _kind(info) -> str:
    if info.exact:
        return "exact pass"
    return "training-time pass" if "train" in info.modes else "inference-time pass"


def _pass_advice(ctx: _Context, info, images: torch.Tensor | None) -> TrickAdvice:
    """Apply one registered pass to the traced model and describe what it did."""
    common = {"name": info.name, "kind": _kind(info), "accuracy_source": _accuracy(info.name, info),
              "measured": measured_evidence(info.name)}
    if ctx.mode not in info.modes:
        other = "inference" if info.modes == ("infer",) else "training"
        reason = f"for {other} only: advise in {info.modes[0]} mode"
        return TrickAdvice(applies=False, reason=reason, **common)
    options = {}
    if info.needs_data:
        if images is None:
            why = ("needs data: not evaluated (CIFAR-10 has 3 channels, the model takes "
                   f"{ctx.example.shape[1]})" if ctx.example.shape[1] != 3 else
                   "needs data: not evaluated (give --data or set FASTGRAPH_DATA)")
            return TrickAdvice(applies=False, reason=why, **common)
        options = {"images": images}
    shown = {k: (len(v) if isinstance(v, torch.Tensor) else v) for k, v in options.items()}
    shown |= _defaults(info.fn, exclude=options)
    try:
        after = info.fn(ctx.gm, **options)
    except Exception as exc:  # noqa: BLE001 - the advice reports a pass that cannot run here
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return TrickAdvice(applies=False, reason=f"the pass fails on this graph: {first}", options=shown,
                           **common)
    sites = registry.rewrite_count(ctx.gm, after)
    if sites == 0:
        return TrickAdvice(applies=False, reason=why_not(info.name, ctx.gm), options=shown, **common)
    notes = _pass_notes(ctx, info, shown)
    return TrickAdvice(applies=True, sites=sites, where=tuple(changed_nodes(ctx.gm, after)), options=shown,
                       notes=notes, **ctx.compared(ctx.baseline, ctx.costs(after)), **common)


def _defaults(fn, exclude: dict) -> dict:
    """The keyword options of a pass function with their default values (JSON-ready ones)."""
    found = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.KEYWORD_ONLY and p.name not in exclude and p.default is not p.empty:
            value = p.default
            found[p.name] = list(value) if isinstance(value, tuple) else value
    return found


def _pass_notes(ctx: _Context, info, options: dict) -> tuple[str, ...]:
    name, notes = info.name, []
    if not info.exact and "train" in info.modes:
        notes.append("Changes the function: the model must be trained with it (fastgraph train applies it "
                     "through a recipe).")
    elif not info.exact:
        notes.append("Changes the function by design: another classifier at inference, the model unchanged.")
    if name == "ghost_batchnorm" and ctx.batch_size % options[GHOST_OPTION]:
        notes.append(f"Batch {ctx.batch_size} is not a multiple of the ghost batch "
                     f"{options[GHOST_OPTION]}: training would refuse it.")
    if name == "stochastic_depth":
        notes.append("fastgraph's stochastic depth computes every branch and masks it, so the "
                     "roofline sees the mask's cost and none of the skipped work the source timed.")
    if name == "whitening":
        notes.append("The costs are of the training graph; for inference fuse_whitening folds the "
                     "whitening back into one conv.")
    return tuple(notes)


def changed_nodes(before: fx.GraphModule, after: fx.GraphModule) -> list[str]:
    """Names of ``before``'s nodes that the pass turning it into ``after`` rewrote: those it
    declared (:func:`fastgraph.passes.declared_rewritten`) and those whose called module it
    replaced, removed or changed (type, parameters, buffers or their ``requires_grad``), in
    graph order."""
    names = set(registry.declared_rewritten(before, after))
    modules = dict(after.named_modules())
    for node in before.graph.nodes:
        if node.op == "call_module" and _module_changed(before.get_submodule(node.target),
                                                        modules.get(node.target)):
            names.add(node.name)
    return [n.name for n in before.graph.nodes if n.name in names]


def _module_changed(old: nn.Module, new: nn.Module | None) -> bool:
    if new is None or type(new) is not type(old):
        return True
    a, b = old.state_dict(), new.state_dict()
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape or not torch.equal(a[k], b[k]) for k in a):
        return True
    return [p.requires_grad for p in old.parameters()] != [p.requires_grad for p in new.parameters()]


# ------------------------------------------------------------------------------ why a pass did not fire


_ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
                       nn.Hardswish, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus)
_ACTIVATION_NAMES = {"relu": "ReLU", "relu6": "ReLU6", "leaky_relu": "LeakyReLU", "elu": "ELU",
                     "celu": "CELU", "gelu": "GELU", "silu": "SiLU", "mish": "Mish", "hardswish": "Hardswish",
                     "hardtanh": "Hardtanh", "sigmoid": "Sigmoid", "tanh": "Tanh", "softplus": "Softplus"}
_MAX_POOL_FUNCTIONS = (F.max_pool2d, torch.max_pool2d, F.adaptive_max_pool2d)


def _modules(gm: fx.GraphModule, types) -> list[tuple[fx.Node, nn.Module]]:
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), types):
            found.append((node, gm.get_submodule(node.target)))
    return found


def activations(gm: fx.GraphModule) -> Counter:
    """Activation name (``"ReLU"``, ``"ReLU6"``, ``"GELU"``...) -> how many nodes apply it,
    as modules, ``torch.nn.functional`` calls or tensor methods."""
    found = Counter()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, _ACTIVATION_MODULES):
                found[type(module).__name__] += 1
            continue
        if node.op == "call_function":
            name = getattr(node.target, "__name__", "")
        elif node.op == "call_method":
            name = str(node.target)
        else:
            continue
        name = name.rstrip("_")
        if name in _ACTIVATION_NAMES:
            found[_ACTIVATION_NAMES[name]] += 1
    return found


def _listed(counts: Counter) -> str:
    return ", ".join(f"{name} x{n}" for name, n in counts.most_common()) or "none"


def _max_pools(gm: fx.GraphModule) -> int:
    functions = sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in _MAX_POOL_FUNCTIONS)
    return len(_modules(gm, (nn.MaxPool2d, nn.AdaptiveMaxPool2d))) + functions


def why_not(name: str, gm: fx.GraphModule) -> str:
    """One sentence on why pass ``name`` found nothing to rewrite in ``gm``, from what the
    graph holds; for a pass this function does not know, the guards its docstring states."""
    from fastgraph.core.modules import GhostBatchNorm, PatchWhitening

    bns = _modules(gm, nn.BatchNorm2d)
    acts = activations(gm)
    no_bn = "no BatchNorm2d in the graph"
    if name == "fold_bn":
        return no_bn if not bns else ("no BatchNorm2d in eval mode follows a Conv2d called once whose "
                                      "output feeds it alone")
    if name == "fuse_bn_activation":
        if not bns:
            return no_bn
        swap = "; swap_activation makes ReLU one of them" if acts["ReLU"] else ""
        return f"no BatchNorm2d feeds a CELU, GELU or SiLU alone (activations: {_listed(acts)}){swap}"
    if name == "ghost_batchnorm" and (not bns or all(isinstance(bn, GhostBatchNorm) for _, bn in bns)):
        return no_bn if not bns else "every BatchNorm2d already is a GhostBatchNorm"
    if name == "freeze_bn_scale":
        if not any(bn.affine for _, bn in _modules(gm, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))):
            return "no BatchNorm with a learnable scale in the graph"
        return "every BatchNorm scale is already frozen at 1 and every CELU has the alpha asked for"
    if name in ("pool_before_activation", "pool_before_bn"):
        if not _max_pools(gm):
            return "no max-pool in the graph"
        if name == "pool_before_activation":
            return (f"no monotonic activation (ReLU, ReLU6, LeakyReLU, ELU, CELU, Hardtanh) feeds a max-pool "
                    f"alone (activations: {_listed(acts)})")
        return "no Conv2d -> BatchNorm2d -> activation -> max-pool chain with single users"
    if name == "swap_activation":
        return f"no ReLU in the graph (activations: {_listed(acts)})"
    if name == "stochastic_depth":
        return "no residual add whose branch holds more convolutions than its shortcut"
    if name == "tta_flip":
        return "the graph must take one input and return one tensor"
    if name == "fuse_whitening":
        return "no PatchWhitening in the graph (the whitening pass makes one for training)"
    if name == "whitening":
        if _modules(gm, PatchWhitening):
            return "already whitened (the graph holds a PatchWhitening)"
        first = next(((n, m) for n, m in _modules(gm, nn.Conv2d) if m.in_channels == 3), None)
        if first is None:
            return "no Conv2d on 3 input channels"
        node, conv = first
        problems = [f"stride {conv.stride[0]}" if conv.stride != (1, 1) else "",
                    "a non-square kernel" if conv.kernel_size[0] != conv.kernel_size[1] else "",
                    f"dilation {conv.dilation[0]}" if conv.dilation != (1, 1) else "",
                    f"groups {conv.groups}" if conv.groups != 1 else "",
                    f"{conv.padding_mode} padding" if conv.padding_mode != "zeros" else ""]
        problems = [p for p in problems if p]
        if problems:
            kernel = "x".join(map(str, conv.kernel_size))
            return (f"the first conv on 3 channels, {node.name} ({kernel}), has {' and '.join(problems)}: "
                    "whitening needs stride 1, no dilation, one group, "
                    "a square kernel and zero padding")
        return f"the first conv on 3 channels, {node.name}, is called from several places or is frozen"
    return _guards(name)


def _guards(name: str) -> str:
    """'nothing matched its guards: <the Guards paragraph of the pass docstring>'."""
    doc = registry.get(name).fn.__doc__ or ""
    match = re.search(r"Guards[^:]*:(.*?)(\n\s*\n|$)", doc, re.S)
    guards = " ".join(match.group(1).split()) if match else "see its docstring"
    return f"nothing matched its guards: {guards}"


# ------------------------------------------------------------------------------ tricks that are not passes


def _precision(ctx: _Context) -> TrickAdvice:
    """16-bit storage and tensor-core peak against the advice's own precision: the roofline
    at both. At fp16 or bf16 already there is nothing lower to go to, and no gain."""
    from fastgraph.perf.roofline import ELEMENT_BYTES

    common = {"name": "precision", "kind": "roofline prediction", "accuracy_source": _accuracy("precision"),
              "measured": NOT_MEASURED}
    step = "training step" if ctx.mode == "train" else "inference batch"
    if ctx.precision in ("fp16", "bf16"):
        reason = f"already at {ctx.precision}, the lowest precision advise considers: no gain"
        if "fp32" in ctx.hw.peak_flops:
            reason += f" (fp32 would take {seconds(ctx.costs(ctx.gm, 'fp32').seconds)} per {step})"
        return TrickAdvice(applies=False, reason=reason, **common)
    low = next((p for p in ("bf16", "fp16") if p in ctx.hw.peak_flops), None)
    if low is None:
        reason = f"{ctx.hw.display_name} has no 16-bit rate to compare with {ctx.precision}"
        return TrickAdvice(applies=False, reason=reason, **common)
    after = ctx.costs(ctx.gm, low)
    notes = (f"Before: {ctx.precision}, {ELEMENT_BYTES[ctx.precision]} bytes per element and the "
             f"{ctx.precision} peak; after: {low}, {ELEMENT_BYTES[low]} bytes per element and the {low} "
             "tensor-core peak.",
             f"The other tricks' costs are at {ctx.precision}.")
    return TrickAdvice(applies=True, sites=len(ctx.baseline.nodes), where=ctx.baseline.nodes,
                       options={"precision": low}, notes=notes, **ctx.compared(ctx.baseline, after), **common)


def _is_conv(gm: fx.GraphModule, node: fx.Node) -> bool:
    return (node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Conv2d)) or (
        node.op == "call_function" and node.target in (F.conv2d, torch.conv2d))


def _channels_last(ctx: _Context) -> TrickAdvice:
    """NHWC activations: the roofline counts the same FLOPs and bytes, so it predicts no change."""
    common = {"name": "channels_last", "kind": "roofline prediction",
              "accuracy_source": _accuracy("channels_last"), "measured": NOT_MEASURED}
    convs = tuple(n.name for n in ctx.gm.graph.nodes if _is_conv(ctx.gm, n))
    if not convs:
        return TrickAdvice(applies=False, reason="no 2-D convolution in the graph", **common)
    notes = ("The roofline counts the same FLOPs and bytes in either memory layout, so it predicts no "
             "change; what the layout changes is which convolution kernels run, which only a measured "
             "step shows.",
             "fastgraph train already feeds channels-last batches and weights on CUDA.")
    return TrickAdvice(applies=True, sites=len(convs), where=convs, notes=notes,
                       **ctx.compared(ctx.baseline, ctx.baseline), **common)


AUGMENT_BYTES_PER_IMAGE = 41  # kernels/augment.py: index 8, shift 16, flip 1, cutout 16 bytes
AUGMENT_FLOPS_PER_ELEMENT = 2  # kernels/augment.py: subtract, divide


def _augment_kernel(ctx: _Context) -> TrickAdvice:
    """The device-side augmentation kernel's own roofline time against the step's."""
    from fastgraph.perf.roofline import ELEMENT_BYTES, roofline

    common = {"name": "augment_kernel", "kind": "roofline prediction",
              "accuracy_source": _accuracy("augment_kernel"), "measured": NOT_MEASURED}
    if ctx.mode != "train":
        return TrickAdvice(applies=False, reason="for training only: advise in train mode", **common)
    c, h, w = ctx.example.shape[1:]
    if c != 3:
        return TrickAdvice(applies=False, reason=f"augments 3-channel CIFAR-10 images; the model takes {c}",
                           **common)
    elements = c * h * w
    moved = (elements * (1 + ELEMENT_BYTES[ctx.precision]) + AUGMENT_BYTES_PER_IMAGE) * ctx.batch_size
    step = roofline(AUGMENT_FLOPS_PER_ELEMENT * elements * ctx.batch_size, moved, ctx.hw, ctx.precision)
    share = step.seconds / ctx.baseline.seconds if ctx.baseline.seconds else 0.0
    notes = (f"One launch per batch reads uint8 images and writes {ctx.precision}: {si(moved, 'B')} per "
             f"batch of {ctx.batch_size}, {seconds(step.seconds)} on the roofline, {share:.2%} of the "
             "step's roofline time (kernels/augment.py cost model).",
             "Its gain is not predicted: the roofline has no model of the host-side augmentation "
             "and copies it replaces.")
    return TrickAdvice(applies=True, sites=1, where=tuple(n.name for n in ctx.gm.graph.nodes
                                                          if n.op == "placeholder"),
                       options={"precision": ctx.precision}, notes=notes, **common)


# ------------------------------------------------------------------------------ measured evidence


def measured_evidence(name: str, folder: Path = BENCH_RESULTS) -> dict | str:
    """fastgraph's own measurements of pass ``name``: the comparisons in ``folder``'s
    benchmark records (``bench/results/*.json`` with ``variants`` and ``comparisons``)
    whose two variants differ only in that pass's options.

    Returns ``{"file", "scale", "numbers": [...]}`` with, per comparison, the two
    variants' labels, runs, TTA accuracy mean and std (fractions), the difference of the
    means (source - other, as the record has it), Welch's p and the options changed;
    ``"not measured"`` when no record compares it.
    """
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        variants = record.get("variants") if isinstance(record, dict) else None
        if not isinstance(variants, dict) or not isinstance(record.get("comparisons"), list):
            continue
        rows = []
        for comparison in record["comparisons"]:
            source, other = variants.get(comparison.get("source")), variants.get(comparison.get("other"))
            if source is None or other is None:
                continue
            changed = _only_pass_changed(source, other)
            if changed is None or changed[0] != name:
                continue
            rows.append({
                "source": comparison["source"], "other": comparison["other"],
                "source_label": source.get("label"), "other_label": other.get("label"),
                "options_changed": changed[1], "runs": [len(source["tta_acc"]), len(other["tta_acc"])],
                "source_mean": source["mean"], "source_std": source["std"],
                "other_mean": other["mean"], "other_std": other["std"],
                "difference": comparison["difference"], "p": comparison["p"]})
        if rows:
            return {"file": str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path),
                    "scale": record.get("scale"), "numbers": rows}
    return NOT_MEASURED


def _only_pass_changed(source: dict, other: dict) -> tuple[str, dict] | None:
    """(pass name, the options ``other`` sets) when ``other`` is ``source``'s recipe, model,
    batch and epochs with one pass's options changed and nothing else; else None."""
    if any(source.get(k) != other.get(k) for k in ("recipe", "model", "batch_size", "epochs")):
        return None
    a, b = copy.deepcopy(source.get("changes", {})), copy.deepcopy(other.get("changes", {}))
    passes_a, passes_b = a.pop("passes", {}), b.pop("passes", {})
    if a != b:
        return None
    differing = [p for p in set(passes_a) | set(passes_b) if passes_a.get(p) != passes_b.get(p)]
    if len(differing) != 1:
        return None
    return differing[0], passes_b.get(differing[0], {})


# ------------------------------------------------------------------------------ rendering


def _percent(fraction: float) -> str:
    """A signed percentage with one decimal, or one significant digit below 0.1% ("+0.0003%",
    not a misleading "+0.0%"); zero is "+0.0%"."""
    value = fraction * 100
    if abs(value) >= 0.1 or value == 0:
        return f"{value:+.1f}%"
    return f"{value:+.{-math.floor(math.log10(abs(value)))}f}%"


def _change(before: float | None, after: float | None) -> str:
    if before is None or after is None:
        return "-"
    if before == after:
        return "="
    return _percent(after / before - 1) if before else si(after)


def _gain(gain: float | None) -> str:
    return "-" if gain is None else _percent(gain)


def _where(names: tuple[str, ...], shown: int = 4) -> str:
    if len(names) <= shown:
        return ", ".join(names)
    return f"{', '.join(names[:shown])} and {len(names) - shown} more"


_KINDS = {"exact pass": "exact", "training-time pass": "training", "inference-time pass": "inference",
          "roofline prediction": "roofline"}


def _render(advice: Advice) -> Group:
    step = "training step" if advice.mode == "train" else "inference batch"
    base = advice.baseline
    c, h, w = advice.input_shape
    parts = [Text(f"Advice for {advice.model}: {advice.mode} mode, {advice.profile} at {advice.precision}, "
                  f"batch {advice.batch_size}, input {c}x{h}x{w}"),
             Text(f"Baseline: {si(base['flops'], 'FLOP')} and {si(base['bytes'], 'B')} per image forward; "
                  f"roofline {seconds(base['roofline_seconds'])} per {step}.")]
    applying = [t for t in advice.tricks if t.applies]
    rows = [[f"{i}. {t.name}", _KINDS[t.kind], str(t.sites), _change(t.flops_before, t.flops_after),
             _change(t.bytes_before, t.bytes_after), seconds(t.roofline_seconds_after),
             _gain(t.predicted_gain)]
            for i, t in enumerate(applying, 1)]
    columns = {"trick": "left", "kind": "left", "sites": "right", "FLOPs": "right", "bytes": "right",
               "time after": "right", "gain": "right"}
    parts.append(fitting_table(
        f"Tricks that apply, ranked by predicted gain (the share of the roofline time per {step} saved): "
        "change of forward FLOPs and bytes per image, and the roofline time after", columns, rows,
        compact=True))
    for i, t in enumerate(applying, 1):
        lines = [f"{i}. {t.name} ({t.kind}): {t.sites} site{'s' if t.sites != 1 else ''}"
                 + (f": {_where(t.where)}" if t.where else "")]
        if t.flops_before is not None:
            lines.append(f"FLOPs {si(t.flops_before)} -> {si(t.flops_after)}, bytes "
                         f"{si(t.bytes_before, 'B')} -> {si(t.bytes_after, 'B')} per image; roofline "
                         f"{seconds(t.roofline_seconds_before)} -> {seconds(t.roofline_seconds_after)} "
                         f"per {step}")
        lines += list(t.notes)
        lines.append(_accuracy_line(t))
        lines.append(_measured_line(t))
        parts.append(Text(lines[0]))
        parts += [Padding(Text(line), (0, 0, 0, 3), expand=False) for line in lines[1:]]
    parts.append(Text("Does not apply:"))
    for t in advice.tricks:
        if not t.applies:
            parts.append(Padding(Text(f"{t.name}: {t.reason}"), (0, 0, 0, 2), expand=False))
    for name, why in advice.left_out.items():
        parts.append(Padding(Text(f"{name}: left out, {why}"), (0, 0, 0, 2), expand=False))
    return Group(*parts)


def _accuracy_line(t: TrickAdvice) -> str:
    if t.accuracy_source is None:
        return "Accuracy: no source in fastgraph's references."
    return f"Accuracy, as its source reports: {t.accuracy_source['claim']} [{t.accuracy_source['citation']}]"


def _options(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items()) or "no options"


def _measured_line(t: TrickAdvice) -> str:
    if not isinstance(t.measured, dict):
        return "Measured by fastgraph: not measured."
    rows = [f"{r['other']} {r['other_mean']:.2%} +- {r['other_std']:.2%} against {r['source']} "
            f"{r['source_mean']:.2%} +- {r['source_std']:.2%} (n = {r['runs'][1]}, {r['runs'][0]}; "
            f"p = {r['p']:.2g}; {_options(r['options_changed'])})" for r in t.measured["numbers"]]
    return (f"Measured by fastgraph ({t.measured['file']}, TTA accuracy at CPU scale; compares options of "
            f"the trick, not the trick against none): " + "; ".join(rows) + ".")
