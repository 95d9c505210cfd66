"""Roofline of a model on real hardware: FLOPs, bytes moved, and the time they bound.

The roofline model (Williams, Waterman and Patterson, "Roofline: an insightful visual
performance model", CACM 2009) bounds the time of a piece of work from below by
``max(FLOPs / peak FLOP/s, bytes / memory bandwidth)``; the ratio FLOPs/byte is its
arithmetic intensity, and the intensity at which the two terms are equal, peak /
bandwidth, is the ridge point. Page used it to hold his DAWNBench ResNet against a V100
("How to Train Your ResNet", part 1: ~5e15 FLOPs, ~40 s at 125 TFLOP/s).

Here:
- hardware profiles (``profiles/hardware/*.toml``) give dense peak FLOP/s per precision,
  memory bandwidth and SM count, each with its vendor source;
- :func:`count_flops` and :func:`node_costs` count FLOPs with
  ``torch.utils.flop_counter.FlopCounterMode`` (matrix multiplies and convolutions;
  elementwise ops, batch norm and pooling count zero FLOPs there, but move bytes), with
  the weight gradient of a grouped convolution counted per group (torch 2.13 counts it
  ``groups`` times over);
- :func:`step_bytes` estimates the bytes a training step moves under a stated model;
- :func:`roofline`, :func:`training_roofline`, :func:`inference_roofline` turn those
  into seconds, and :func:`efficiency` / :func:`mfu` compare measured times with them.

Every FLOP and byte count is *per image* unless a name says otherwise.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.resources
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch
import torch.fx
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from fastgraph.core.errors import UserError
from fastgraph.core.tracing import check_runs

PRECISIONS = ("fp32", "tf32", "fp16", "bf16")
# Bytes per stored element. TF32 is a tensor-core compute mode: tensors stay fp32 in memory.
ELEMENT_BYTES = MappingProxyType({"fp32": 4, "tf32": 4, "fp16": 2, "bf16": 2})


# --------------------------------------------------------------------------------------
# Hardware profiles
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HardwareProfile:
    """Peak rates of one accelerator, read from ``profiles/hardware/<name>.toml``.

    Attributes:
        name: profile name (file stem), e.g. ``"a100"``.
        display_name: the product, e.g. ``"NVIDIA A100 SXM4 80GB"``.
        peak_flops: dense peak rate in FLOP/s per precision name (``fp32``, ``tf32``,
            ``fp16``, ``bf16``); only the precisions the hardware has. Tensor-core rates
            without 2:4 structured sparsity.
        memory_bandwidth: peak DRAM bandwidth in bytes/s.
        sm_count: number of streaming multiprocessors.
        sources: the vendor document (name and URL) behind each number, keyed
            ``"memory_bandwidth"``, ``"sm_count"``, ``"peak.<precision>"``.
        notes: how a number was derived, where it was (same keys; may be empty).
        intra_node_bandwidth: GPU-to-GPU bandwidth inside one node, bytes/s per GPU and per
            direction (NVLink, or PCIe on a part without it); None when the file has none.
        intra_node_latency: seconds per message between GPUs of one node (None: none given).
        network_bandwidth: inter-node network bandwidth, bytes/s per GPU and per direction
            (the NICs of the vendor's own system divided among its GPUs); None for a part
            sold without one, which then cannot be modelled on more than one node.
        network_latency: seconds per message between nodes (None: none given).
        intra_node_link, network_link: what those links are, e.g. ``"NVLink 4"``,
            ``"InfiniBand NDR 400 Gb/s"`` (None when absent).
        The interconnect figures are read by :mod:`fastgraph.perf.communication`; their
        sources are keyed like the others (``"intra_node_bandwidth"``...).
    """

    name: str
    display_name: str
    peak_flops: Mapping[str, float]
    memory_bandwidth: float
    sm_count: int
    sources: Mapping[str, str]
    notes: Mapping[str, str] = dataclasses.field(default_factory=dict)
    intra_node_bandwidth: float | None = None
    intra_node_latency: float | None = None
    network_bandwidth: float | None = None
    network_latency: float | None = None
    intra_node_link: str | None = None
    network_link: str | None = None

    def peak(self, precision: str) -> float:
        """Dense peak rate in FLOP/s at ``precision``.

        Raises:
            UserError: unknown precision name, or one this hardware has no rate for
                (e.g. ``tf32`` on a V100); the one-line message lists what it has.
        """
        _check_precision(precision)
        if precision not in self.peak_flops:
            raise UserError(
                f"{self.display_name} (profile {self.name!r}) has no {precision} peak rate; "
                f"it has: {', '.join(self.peak_flops)}"
            )
        return self.peak_flops[precision]

    def ridge_point(self, precision: str) -> float:
        """Arithmetic intensity (FLOPs/byte) above which work is compute-bound."""
        return self.peak(precision) / self.memory_bandwidth

    def describes(self, device: str) -> bool:
        """Whether a GPU named ``device`` (``torch.cuda.get_device_name``) is this profile's part.

        Its name must hold the profile's (``"NVIDIA H100 80GB HBM3"`` for ``h100``), and the
        variant must not contradict the product: a PCIe or NVL card is not the SXM part
        (an H100 PCIe has about 3/4 of the SXM5's dense bf16 rate), and a memory size both
        names give must agree (an A100 40GB has 1.56 TB/s, the 80GB 2.04). A CPU never is.
        """
        name = device.lower().replace(" ", "").replace("-", "")
        if name in ("", "cpu") or self.name.lower() not in name:
            return False
        product = self.display_name.lower()
        if "sxm" in product and ("pcie" in name or "nvl" in name):
            return False
        # "A100-SXM4-40GB", "H100 80GB HBM3": the number before "GB", read with its separators
        sizes = [re.findall(r"(?<![\w.])(\d+)\s*gb", text) for text in (device.lower(), product)]
        return not (sizes[0] and sizes[1] and sizes[0][0] != sizes[1][0])


def _hardware_dir():
    return importlib.resources.files("fastgraph.profiles").joinpath("hardware")


def list_profiles() -> list[str]:
    """Names of the hardware profiles shipped with fastgraph, sorted (e.g. ``"a100"``)."""
    return sorted(p.name[: -len(".toml")] for p in _hardware_dir().iterdir()
                  if p.name.endswith(".toml"))


def load_profile(name: str) -> HardwareProfile:
    """Load a hardware profile by name (``"v100"``, ``"a100"``...) or from a ``.toml`` path.

    A path lets users describe their own hardware in the same format as the shipped
    files: ``display_name``, then ``[memory_bandwidth]``, ``[sm_count]`` and
    ``[peak.<precision>]`` tables, each with ``value`` and ``source``; optionally the
    interconnect: ``[intra_node_bandwidth]`` and ``[network_bandwidth]`` (bytes/s per GPU
    and per direction, with a ``link`` name) and ``[intra_node_latency]`` and
    ``[network_latency]`` (seconds per message), a bandwidth and its latency together.

    Raises:
        UserError: unknown name (the one-line message lists the known profiles), a
            missing file, or a file that is not a valid profile.
    """
    if name.endswith(".toml"):
        path = Path(name)
        if not path.is_file():
            raise UserError(f"hardware profile file {name!r} not found")
        text, origin, stem = path.read_text(), str(path), path.stem
    else:
        stem = name.strip().lower()
        known = list_profiles()
        if stem not in known:
            raise UserError(f"unknown hardware profile {name!r}; known profiles: {', '.join(known)}")
        text, origin = _hardware_dir().joinpath(f"{stem}.toml").read_text(), f"{stem}.toml"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"hardware profile {origin}: invalid TOML: {exc}") from None
    return _parse_profile(stem, data, origin)


def _parse_profile(name: str, data: dict, origin: str) -> HardwareProfile:
    sources: dict[str, str] = {}
    notes: dict[str, str] = {}

    def entry(key: str, table, kind) -> float:
        if not isinstance(table, dict) or "value" not in table:
            raise UserError(f"hardware profile {origin}: [{key}] needs a 'value'")
        value, source = table["value"], table.get("source")
        if not isinstance(value, kind) or isinstance(value, bool) or value <= 0:
            raise UserError(f"hardware profile {origin}: [{key}] value must be a positive number")
        if not isinstance(source, str) or not source.strip():
            raise UserError(f"hardware profile {origin}: [{key}] needs a 'source' (document and URL)")
        sources[key] = source
        if "note" in table:
            notes[key] = str(table["note"])
        return value

    display_name = data.get("display_name")
    if not isinstance(display_name, str) or not display_name:
        raise UserError(f"hardware profile {origin}: missing 'display_name'")
    bandwidth = float(entry("memory_bandwidth", data.get("memory_bandwidth"), (int, float)))
    sm_count = entry("sm_count", data.get("sm_count"), int)
    peaks = data.get("peak")
    if not isinstance(peaks, dict) or not peaks:
        raise UserError(f"hardware profile {origin}: needs at least one [peak.<precision>] table")
    peak_flops = {}
    for precision in PRECISIONS:  # canonical order, whatever the file's order
        if precision in peaks:
            peak_flops[precision] = float(entry(f"peak.{precision}", peaks[precision], (int, float)))
    unknown = sorted(set(peaks) - set(PRECISIONS))
    if unknown:
        raise UserError(f"hardware profile {origin}: unknown precision(s) {', '.join(unknown)}; "
                        f"known: {', '.join(PRECISIONS)}")
    links: dict[str, float | str | None] = {}
    for scope in ("intra_node", "network"):
        rate, latency = data.get(f"{scope}_bandwidth"), data.get(f"{scope}_latency")
        if (rate is None) != (latency is None):
            raise UserError(f"hardware profile {origin}: [{scope}_bandwidth] and [{scope}_latency] "
                            "go together (give both or neither)")
        if rate is None:
            links.update({f"{scope}_bandwidth": None, f"{scope}_latency": None, f"{scope}_link": None})
            continue
        links[f"{scope}_bandwidth"] = float(entry(f"{scope}_bandwidth", rate, (int, float)))
        links[f"{scope}_latency"] = float(entry(f"{scope}_latency", latency, (int, float)))
        links[f"{scope}_link"] = str(rate.get("link") or scope.replace("_", "-"))
    if links["network_bandwidth"] is not None and links["intra_node_bandwidth"] is None:
        raise UserError(f"hardware profile {origin}: a [network_bandwidth] needs an [intra_node_bandwidth]")
    return HardwareProfile(name, display_name, MappingProxyType(peak_flops), bandwidth, sm_count,
                           MappingProxyType(sources), MappingProxyType(notes), **links)


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")


def _as_profile(profile: HardwareProfile | str) -> HardwareProfile:
    return profile if isinstance(profile, HardwareProfile) else load_profile(profile)


# --------------------------------------------------------------------------------------
# Counting FLOPs and bytes
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlopCount:
    """FLOPs per image of one model, as counted by ``FlopCounterMode``.

    Attributes:
        forward: FLOPs of one forward pass, per image.
        train: FLOPs of forward + backward, per image (about 3x forward: the backward of
            a convolution or matmul computes the input gradient and the weight gradient,
            each costing as much as the forward; the first layer skips the input gradient).
        batch_size: images in the example the counts were divided by.
    """

    forward: float
    train: float
    batch_size: int


def _batch_size(example: torch.Tensor) -> int:
    if not isinstance(example, torch.Tensor) or example.dim() == 0 or example.shape[0] == 0:
        raise ValueError("example must be a batched tensor, shape (N, ...) with N >= 1")
    return int(example.shape[0])


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation,
                         transposed, _output_padding, groups, output_mask, out_shape=None, **_) -> int:
    """FLOPs of ``aten.convolution_backward`` from its argument shapes (a ``FlopCounterMode`` formula).

    The input gradient is a transposed convolution of the output gradient with the
    weight, and the weight gradient a convolution of the input with the output gradient,
    each costing what the forward costs, 2 * N * C_out * (C_in / groups) * kernel * output
    pixels. torch 2.13's own formula counts the weight gradient through the batch/channel
    transposed shapes, in which the division by ``groups`` is lost: a depthwise conv's
    weight gradient came out ``groups`` times too large (MobileNetV2's training FLOPs 14x
    its forward instead of about 3x; pytorch/pytorch#183405 proposes the same division).
    This is torch's decomposition with that division restored.
    """
    def t(shape):  # swap batch and channels: the weight gradient as a convolution
        return [shape[1], shape[0], *shape[2:]]

    flops = 0
    if output_mask[0]:
        flops += conv_flop_count(grad_out_shape, w_shape, out_shape[0], not transposed)
    if output_mask[1]:
        data, kernel = (grad_out_shape, x_shape) if transposed else (x_shape, grad_out_shape)
        flops += conv_flop_count(t(data), t(kernel), t(out_shape[1]), transposed=False) // groups
    return flops


# FLOP formulas that replace torch's in every count here.
_FLOP_FORMULAS = MappingProxyType({torch.ops.aten.convolution_backward: _conv_backward_flops})


def count_flops(module: torch.nn.Module, example: torch.Tensor) -> FlopCount:
    """Forward and training FLOPs per image of ``module`` on ``example``.

    Args:
        module: any ``nn.Module`` (a ``GraphModule`` included); it is deep-copied, so its
            parameters, BN running statistics and train/eval flag are untouched.
        example: input batch, e.g. float (N, C, H, W) on the module's device. Its
            values do not matter, only shapes. A single image (N = 1) is counted as two
            copies of it (see below).

    Returns:
        :class:`FlopCount`: forward FLOPs (eval mode, no autograd) and forward+backward
        FLOPs (train mode, backward from every output tensor that requires a gradient,
        the model returning a tensor or a tuple, list or dict of them), both divided by
        the number of images run (``batch_size``).

    The training count runs the module in train mode, the function that is trained (a
    training-time rewrite may differ between modes), rather than in eval mode. BatchNorm
    in train mode raises on one value per channel, which an ImageNet-style ResNet reaches
    at a single image (its last stage runs on 1x1 maps at 32x32), so a one-image example
    is run as two copies of it: FLOPs scale linearly with the batch, and dividing by two
    gives the same per-image count.

    ``FlopCounterMode`` counts nothing under ``torch.inference_mode`` in some PyTorch
    versions and autograd cannot run there, so the count always runs with inference mode
    switched off, on a normal-tensor copy of ``example``.
    """
    n = _batch_size(example)
    if n == 1:
        example, n = example.expand(2, *example.shape[1:]), 2
    with torch.inference_mode(False):
        x = example.detach().clone()  # an inference tensor cannot enter autograd
        model = copy.deepcopy(module).eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
        forward = counter.get_total_flops()
        model = copy.deepcopy(module).train()
        with FlopCounterMode(display=False, custom_mapping=dict(_FLOP_FORMULAS)) as counter:
            outputs = [t for t in tree_leaves(model(x))
                       if isinstance(t, torch.Tensor) and t.requires_grad]
            if outputs:
                torch.autograd.backward(outputs, [torch.ones_like(t) for t in outputs])
        train = counter.get_total_flops()
    return FlopCount(forward=forward / n, train=train / n, batch_size=n)


@dataclass(frozen=True)
class NodeCost:
    """Forward cost of one graph node, per image.

    Attributes:
        name, op, target: the node's name, its fx op (``call_module``, ``call_function``,
            ``call_method``, ``placeholder``, ``get_attr``, ``output``) and its target
            (module path, function or method name).
        flops: forward FLOPs per image.
        activation_bytes: bytes per image of the tensor inputs read plus the output
            written (inputs that are parameters excluded).
        parameter_bytes: bytes of parameters and floating-point buffers read per forward
            call (independent of batch size).
        batch_size: images one forward call processes; parameter reads are amortised
            over it.
    """

    name: str
    op: str
    target: str
    flops: float
    activation_bytes: float
    parameter_bytes: float
    batch_size: int

    @property
    def bytes(self) -> float:
        """Bytes moved per image: activations plus the parameter read amortised over the batch."""
        return self.activation_bytes + self.parameter_bytes / self.batch_size

    @property
    def arithmetic_intensity(self) -> float:
        """FLOPs per byte moved; 0.0 for a node that moves nothing."""
        return self.flops / self.bytes if self.bytes else 0.0


def _target_name(target) -> str:
    """Readable target: module path, method name, or ``torch.flatten`` / ``operator.add``."""
    if isinstance(target, str):
        return target
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", None)
    if name is None:
        return str(target)
    module = {"_operator": "operator", "builtins": ""}.get(module, module)  # operator.add, getattr
    return f"{module}.{name}" if module else name


class _CostProp(ShapeProp):
    """ShapeProp that also runs each node under its own FlopCounterMode and sizes its traffic."""

    def __init__(self, gm: torch.fx.GraphModule, element_bytes: int | None):
        super().__init__(gm)
        self.element_bytes = element_bytes
        self.records: list[tuple[torch.fx.Node, float, float, float]] = []

    def _nbytes(self, value) -> float:
        total = 0
        for t in tree_leaves(value):
            if isinstance(t, torch.Tensor):
                size = self.element_bytes if self.element_bytes and t.is_floating_point() \
                    else t.element_size()
                total += t.numel() * size
        return float(total)

    def run_node(self, n: torch.fx.Node):
        if n.op in ("placeholder", "output", "get_attr"):
            result = super().run_node(n)
            self.records.append((n, 0.0, 0.0, 0.0))
            return result
        inputs = [(src, self.env[src]) for src in n.all_input_nodes]
        input_tensors = [t for _, v in inputs for t in tree_leaves(v) if isinstance(t, torch.Tensor)]
        with FlopCounterMode(display=False) as counter:
            result = super().run_node(n)
        outputs = [t for t in tree_leaves(result) if isinstance(t, torch.Tensor)]
        if not outputs or _is_view(outputs, input_tensors):
            # size queries produce no tensor; views alias an input: neither moves memory
            self.records.append((n, float(counter.get_total_flops()), 0.0, 0.0))
            return result
        activations = sum(self._nbytes(v) for src, v in inputs if src.op != "get_attr")
        parameters = sum(self._nbytes(v) for src, v in inputs if src.op == "get_attr")
        if n.op == "call_module":
            module = self.fetch_attr(n.target)
            parameters += sum(self._nbytes(p) for p in module.parameters())
            parameters += sum(self._nbytes(b) for b in module.buffers() if b.is_floating_point())
        activations += self._nbytes(outputs)
        self.records.append((n, float(counter.get_total_flops()), activations, parameters))
        return result


def _is_view(outputs: list[torch.Tensor], inputs: list[torch.Tensor]) -> bool:
    """True when every output is a new tensor aliasing an input's storage (reshape, slice).

    An in-place op (``relu_``) returns the input object itself: it reads and writes.
    """
    storages = {t.untyped_storage().data_ptr(): t for t in inputs}
    for out in outputs:
        source = storages.get(out.untyped_storage().data_ptr())
        if source is None or any(out is t for t in inputs):
            return False
    return True


def node_costs(gm: torch.fx.GraphModule, example: torch.Tensor, *,
               batch_size: int | None = None, precision: str | None = None) -> list[NodeCost]:
    """Forward FLOPs and bytes moved per image for every node of ``gm``, in graph order.

    Runs a deep copy of ``gm`` in eval mode, node by node, with
    ``torch.fx.passes.shape_prop.ShapeProp`` (the copy's nodes get ``tensor_meta``) and
    one ``FlopCounterMode`` per node, so FLOPs attribute to nodes and their sum equals
    :func:`count_flops` ``.forward``.

    Bytes follow eager execution: a node reads each tensor input once and writes its
    output once; ``get_attr`` inputs and a called module's parameters and floating-point
    buffers count as parameter reads. Nodes whose output is a view of an input (flatten,
    reshape, slicing) and nodes that produce no tensor (``size``) move 0 bytes;
    placeholders, ``get_attr`` and the output node cost nothing themselves (their tensors
    are counted where they are read).

    Args:
        gm: the traced model.
        example: input batch, e.g. float (N, 3, 32, 32); values do not matter. A small N
            is enough: per-image activation bytes do not depend on it.
        batch_size: images one forward call processes when parameter reads are
            amortised (``NodeCost.bytes``); default N.
        precision: count floating-point tensors at this precision's element size
            (``fp16`` -> 2 bytes); default the tensors' own dtypes.

    Raises:
        ModelError: the graph fails on ``example`` (one line naming the cause).
        UserError: unknown precision.
    """
    if not isinstance(gm, torch.fx.GraphModule):
        raise TypeError(f"node_costs needs a torch.fx.GraphModule, got {type(gm).__name__}")
    n = _batch_size(example)
    if precision is not None:
        _check_precision(precision)
    amortise_over = n if batch_size is None else int(batch_size)
    if amortise_over < 1:
        raise ValueError("batch_size must be >= 1")
    check_runs(gm, example)  # fail here, in one line, rather than inside ShapeProp's traceback print
    with torch.inference_mode(False), torch.no_grad():
        model = copy.deepcopy(gm).eval()
        prop = _CostProp(model, ELEMENT_BYTES[precision] if precision else None)
        prop.propagate(example.detach().clone())
    return [NodeCost(node.name, node.op, _target_name(node.target), flops / n, act / n, params,
                     amortise_over)
            for node, flops, act, params in prop.records]


def step_bytes(gm: torch.fx.GraphModule, example: torch.Tensor, precision: str = "fp32", *,
               batch_size: int = 512, optimizer_states: int = 1) -> float:
    """Bytes moved by one training step, per image, at ``precision``'s element size.

    The model (an estimate of eager PyTorch, not a measurement):
    - forward: each node reads its inputs and writes its output once
      (:func:`node_costs`: activations A per image, parameter reads P_f per step);
    - backward: about twice the forward activation traffic (read the saved activations
      and the output gradient, write the input gradient), 2A per image, and the
      parameters read again, P_f;
    - every trainable parameter's gradient written once, and the optimizer step reads
      parameter, gradient and ``optimizer_states`` state tensors and writes parameter and
      states (SGD with momentum: 1 state; Adam: 2): P_t * (1 + 3 + 2 * states) bytes,
      where P_t is the trainable parameter bytes;
    - parameter traffic is per step, amortised over ``batch_size`` images;
    - every floating-point tensor (activations, parameters, gradients, optimizer state)
      is held at ``precision``'s element size (fp32/tf32: 4 bytes, fp16/bf16: 2).
    So bytes/image = 3A + (2 P_f + P_t (4 + 2 * states)) / batch_size.

    Args:
        gm: the traced model; example: input batch (N, ...), values do not matter.
        precision: ``fp32``, ``tf32``, ``fp16`` or ``bf16``.
        batch_size: images per training step. optimizer_states: state tensors per parameter.

    Raises:
        UserError: unknown precision. ModelError: the graph fails on ``example``.
    """
    _check_precision(precision)
    if batch_size < 1 or optimizer_states < 0:
        raise ValueError("batch_size must be >= 1 and optimizer_states >= 0")
    costs = node_costs(gm, example, batch_size=batch_size, precision=precision)
    activations = sum(c.activation_bytes for c in costs)
    forward_params = sum(c.parameter_bytes for c in costs)
    trainable = sum(p.numel() for p in gm.parameters() if p.requires_grad) * ELEMENT_BYTES[precision]
    per_step = 2 * forward_params + trainable * (4 + 2 * optimizer_states)
    return 3 * activations + per_step / batch_size


# --------------------------------------------------------------------------------------
# Roofline
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RooflineResult:
    """Lower bound on the time of some work on one profile at one precision.

    Attributes:
        flops: FLOPs of the work; bytes: bytes it moves.
        compute_seconds: flops / peak FLOP/s. memory_seconds: bytes / bandwidth.
        seconds: max of the two, the roofline time.
        bound: ``"compute"`` or ``"memory"``, whichever term is larger.
        arithmetic_intensity: flops / bytes (FLOPs/byte; inf when bytes is 0).
        ridge_point: peak / bandwidth (FLOPs/byte).
        profile, precision: what the bound was computed for.
    """

    flops: float
    bytes: float
    compute_seconds: float
    memory_seconds: float
    seconds: float
    bound: str
    arithmetic_intensity: float
    ridge_point: float
    profile: str
    precision: str

    def as_dict(self) -> dict:
        """Plain dict for JSON reports."""
        return dataclasses.asdict(self)


def roofline(flops: float, bytes: float, profile: HardwareProfile | str,
             precision: str) -> RooflineResult:
    """Roofline time of work doing ``flops`` FLOPs and moving ``bytes`` bytes.

    Args:
        flops: FLOPs (>= 0). bytes: bytes moved (>= 0).
        profile: a :class:`HardwareProfile` or a profile name.
        precision: whose peak rate applies (``fp32``, ``tf32``, ``fp16``, ``bf16``).

    Raises:
        UserError: unknown profile or precision, or a precision the profile lacks.
        ValueError: negative flops or bytes.
    """
    if flops < 0 or bytes < 0:
        raise ValueError("flops and bytes must be >= 0")
    hw = _as_profile(profile)
    peak = hw.peak(precision)
    compute = flops / peak
    memory = bytes / hw.memory_bandwidth
    return RooflineResult(
        flops=float(flops), bytes=float(bytes), compute_seconds=compute, memory_seconds=memory,
        seconds=max(compute, memory), bound="compute" if compute >= memory else "memory",
        arithmetic_intensity=flops / bytes if bytes else float("inf"),
        ridge_point=peak / hw.memory_bandwidth, profile=hw.name, precision=precision,
    )


def training_roofline(gm: torch.fx.GraphModule, example: torch.Tensor,
                      profile: HardwareProfile | str, precision: str, epochs: float,
                      images_per_epoch: int = 50_000, batch_size: int = 512) -> RooflineResult:
    """Roofline time of training ``gm`` for ``epochs`` epochs (CIFAR-10: 50,000 images each).

    FLOPs are :func:`count_flops` ``.train`` per image and bytes :func:`step_bytes` per
    image, both times ``epochs * images_per_epoch``. Evaluation, data loading and
    warm-up are not included.

    Raises:
        UserError: unknown profile or precision. ModelError: the graph fails on ``example``.
    """
    hw = _as_profile(profile)
    hw.peak(precision)  # fail on the precision before counting anything
    images = epochs * images_per_epoch
    flops = count_flops(gm, example).train * images
    moved = step_bytes(gm, example, precision, batch_size=batch_size) * images
    return roofline(flops, moved, hw, precision)


def inference_roofline(gm: torch.fx.GraphModule, example: torch.Tensor,
                       profile: HardwareProfile | str, precision: str, images: int = 10_000,
                       batch_size: int = 512) -> RooflineResult:
    """Roofline time of one forward pass of ``gm`` over ``images`` images (CIFAR-10 test set).

    FLOPs and bytes are the sums of :func:`node_costs` per image (parameters read once per
    batch of ``batch_size``), times ``images``. A graph with test-time augmentation folded
    in counts its extra passes itself.

    Raises:
        UserError: unknown profile or precision. ModelError: the graph fails on ``example``.
    """
    hw = _as_profile(profile)
    hw.peak(precision)
    costs = node_costs(gm, example, batch_size=batch_size, precision=precision)
    flops = sum(c.flops for c in costs) * images
    moved = sum(c.bytes for c in costs) * images
    return roofline(flops, moved, hw, precision)


def estimate(gm: torch.fx.GraphModule, example: torch.Tensor, profile: HardwareProfile | str,
             precision: str, *, mode: str = "train", epochs: float = 10,
             images_per_epoch: int = 50_000, images: int = 10_000,
             batch_size: int = 512) -> dict:
    """The roofline of a training run (``mode="train"``) or of inference (``"infer"``) as a dict.

    One row of the ``fastgraph optimize`` roofline table and its JSON: ``mode``,
    ``profile``, ``precision``, ``images`` (processed in the run: ``epochs *
    images_per_epoch`` in training, ``images`` in inference), ``batch_size``,
    ``step_flops_per_image`` (FLOPs, forward+backward in training, forward in
    inference), ``step_bytes_per_image`` (bytes), and the :class:`RooflineResult` fields
    of the whole run with ``seconds`` named ``roofline_seconds``.

    In training the example runs in train mode: its batch must suit the graph there (a
    ghost batch norm needs a multiple of its ghost batch size).

    Raises:
        UserError: unknown mode, profile or precision. ModelError: the graph fails.
    """
    if mode == "train":
        seen = epochs * images_per_epoch
        result = training_roofline(gm, example, profile, precision, epochs, images_per_epoch,
                                   batch_size)
    elif mode == "infer":
        seen = images
        result = inference_roofline(gm, example, profile, precision, images, batch_size)
    else:
        raise UserError(f"mode must be 'train' or 'infer', not {mode!r}")
    row = result.as_dict()
    row["roofline_seconds"] = row.pop("seconds")
    return {"mode": mode, "images": seen, "batch_size": batch_size,
            "step_flops_per_image": result.flops / seen, "step_bytes_per_image": result.bytes / seen,
            **row}


def efficiency(measured_seconds: float, roofline_seconds: float) -> float:
    """Fraction of roofline speed reached: ``roofline_seconds / measured_seconds``.

    1.0 means the run took exactly the roofline time; 0.25 means it took 4x as long.
    Above 1.0 the run beat the byte model's assumptions (e.g. fused kernels kept
    activations on chip).

    Raises:
        ValueError: a non-positive measured time or negative roofline time.
    """
    if measured_seconds <= 0 or roofline_seconds < 0:
        raise ValueError("measured_seconds must be > 0 and roofline_seconds >= 0")
    return roofline_seconds / measured_seconds


def mfu(flops: float, measured_seconds: float, profile: HardwareProfile | str,
        precision: str) -> float:
    """Model FLOPs utilisation: achieved FLOP/s (``flops / measured_seconds``) / peak FLOP/s.

    ``flops`` are the model's counted FLOPs (e.g. ``count_flops(...).train * images``),
    not the hardware's executed ones, as in PaLM (Chowdhery et al. 2022, appendix B).

    Raises:
        UserError: unknown profile or precision. ValueError: non-positive time.
    """
    if measured_seconds <= 0:
        raise ValueError("measured_seconds must be > 0")
    return flops / measured_seconds / _as_profile(profile).peak(precision)


DEFAULT_PROFILE = "h100"  # the hardware profile every command's roofline uses unless told


def per_image_costs(example: torch.Tensor, batch_size: int = 512):
    """A cost model for :func:`fastgraph.core.pass_manager.run_passes`: ``gm -> (forward
    FLOPs per image, forward bytes per image)`` from :func:`node_costs` on ``example``
    ((1, C, H, W) float32), parameter reads spread over ``batch_size`` images."""

    def costs(gm) -> tuple[float, float]:
        nodes = node_costs(gm, example, batch_size=batch_size)
        return sum(c.flops for c in nodes), sum(c.bytes for c in nodes)

    return costs
