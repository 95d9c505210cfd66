"""Per-node roofline points of a graph, for a training step or an inference batch.

Built on :func:`fastgraph.perf.roofline.node_costs` (forward FLOPs from ``FlopCounterMode``,
bytes under eager execution, per image). One step of ``batch_size`` images:

- inference: the node's forward FLOPs and bytes (parameters read once per batch);
- training: FLOPs = forward x (1 + g_in + g_w), where g_in = 1 when one of the node's
  activation inputs requires a gradient (the input gradient costs as much as the forward
  for a convolution or a matrix multiply) and g_w = 1 when its weights do: the node's
  module has trainable parameters, or a trainable parameter is one of its inputs
  (``F.conv2d(x, self.weight)`` traces to a ``get_attr`` input), or a second activation
  input requires a gradient (``a @ b``); the weight gradient likewise costs the forward.
  The first conv, which reads the images, thus costs 2x its forward, the others 3x, the
  usual 6N-per-token rule in its per-layer form (Kaplan et al. 2020, section 2.1).
  ``torch.profiler``'s ``with_flops`` counts only the forward (DESIGN.md, known traps),
  hence this model.
  Bytes follow :func:`fastgraph.perf.roofline.step_bytes` node by node: a node on the
  gradient path moves 3x its forward activation bytes and reads its parameters twice;
  trainable parameters add the gradient write and an SGD-with-momentum update
  (read parameter, gradient and momentum, write parameter and momentum), once per
  parameter, at the first node that uses it.

A node's attainable rate is ``min(peak, bandwidth x intensity)`` and its roofline time
``max(FLOPs / peak, bytes / bandwidth)`` (Williams, Waterman and Patterson 2009).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.fx as fx

from fastgraph.perf.roofline import ELEMENT_BYTES, HardwareProfile, node_costs

OPTIMIZER_STATES = 1  # SGD with momentum: one state tensor per parameter


@dataclass(frozen=True)
class NodePoint:
    """One graph node on the roofline, for one step of ``batch_size`` images.

    name: the fx node name; label: the module path for a module call (``layer1.0.0``),
    else the node name; op, target: the fx op and target. flops: FLOPs per step.
    bytes: bytes moved per step. arithmetic_intensity: FLOPs/byte (0 for a node
    without counted FLOPs). attainable_flops_per_second: the roofline's bound at that
    intensity (FLOP/s). roofline_seconds: max(FLOPs / peak, bytes / bandwidth), seconds.
    bound: "compute" or "memory".
    """

    name: str
    label: str
    op: str
    target: str
    flops: float
    bytes: float
    arithmetic_intensity: float
    attainable_flops_per_second: float
    roofline_seconds: float
    bound: str

    def as_dict(self) -> dict:
        """JSON-ready fields of the point (FLOPs, bytes, intensity, attainable FLOP/s, seconds, bound)."""
        return asdict(self)


def _trainable_parameter(gm: fx.GraphModule, node: fx.Node) -> torch.nn.Parameter | None:
    """The trainable parameter a ``get_attr`` node reads, else None (a buffer, a constant, a frozen one)."""
    if node.op != "get_attr":
        return None
    try:
        parameter = gm.get_parameter(node.target)
    except AttributeError:  # a buffer or constant: no gradient
        return None
    return parameter if parameter.requires_grad else None


def _gradient_flags(gm: fx.GraphModule) -> dict[str, tuple[bool, bool, bool]]:
    """Per node name: (an activation input requires grad, its weights require grad, output requires grad).

    Weights are a called module's parameters or trainable parameters read through
    ``get_attr`` inputs; a second activation input that requires grad (``a @ b``) has a
    gradient of the same cost, and counts as the weight side.
    """
    flags: dict[str, tuple[bool, bool, bool]] = {}
    requires: dict[str, bool] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            requires[node.name] = _trainable_parameter(gm, node) is not None
            flags[node.name] = (False, requires[node.name], requires[node.name])
            continue
        activations = [src for src in node.all_input_nodes if src.op != "get_attr"]
        needing = sum(requires.get(src.name, False) for src in activations)
        inputs_grad = needing > 0
        trainable = needing > 1 or any(_trainable_parameter(gm, src) is not None
                                       for src in node.all_input_nodes)
        if node.op == "call_module":
            trainable = trainable or any(p.requires_grad for p in gm.get_submodule(node.target).parameters())
        requires[node.name] = inputs_grad or trainable
        flags[node.name] = (inputs_grad, trainable, requires[node.name])
    return flags


def _trainable_bytes(gm: fx.GraphModule, node: fx.Node, element_bytes: int, seen: set[int]) -> float:
    """Bytes of the trainable parameters ``node`` uses (its module's, its ``get_attr``
    inputs') that no earlier node used; ``seen`` (parameter ids) is updated."""
    parameters = []
    if node.op == "call_module":
        parameters += [p for p in gm.get_submodule(node.target).parameters() if p.requires_grad]
    read = (_trainable_parameter(gm, src) for src in node.all_input_nodes)
    parameters += [p for p in read if p is not None]
    fresh = {id(p): p for p in parameters if id(p) not in seen}
    seen.update(fresh)
    return float(sum(p.numel() for p in fresh.values()) * element_bytes)


def node_points(gm: fx.GraphModule, profile: HardwareProfile, precision: str, *, mode: str = "train",
                batch_size: int = 512, example: torch.Tensor | None = None) -> list[NodePoint]:
    """Roofline points of every node of ``gm`` that computes or moves something, in graph order.

    Args:
        gm: the traced graph (not modified).
        profile: the hardware profile; precision: whose peak applies and the element size
            of floating-point tensors (fp32/tf32: 4 bytes, fp16/bf16: 2).
        mode: ``"train"`` (forward + backward + SGD update) or ``"infer"`` (forward).
        batch_size: images per step.
        example: an input batch (N, 3, 32, 32) for shapes (default: 2 random images; the
            values do not matter, only shapes).

    Returns:
        One :class:`NodePoint` per node with FLOPs or bytes > 0 (placeholders, views and
        the output node move nothing and are left out).

    Raises:
        UserError: unknown precision or one the profile lacks; an unknown mode.
        ModelError: the graph fails on the example.
    """
    from fastgraph.core.errors import UserError

    if mode not in ("train", "infer"):
        raise UserError(f"--mode must be train or infer, not {mode!r}")
    peak = profile.peak(precision)
    bandwidth = profile.memory_bandwidth
    example = torch.randn(2, 3, 32, 32) if example is None else example
    costs = node_costs(gm, example, batch_size=batch_size, precision=precision)
    flags = _gradient_flags(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    element = ELEMENT_BYTES[precision]
    updated: set[int] = set()  # parameters whose gradient and update are counted
    points = []
    for cost in costs:
        node = nodes[cost.name]
        forward_flops = cost.flops * batch_size
        activations = cost.activation_bytes * batch_size
        params = cost.parameter_bytes
        if mode == "train":
            inputs_grad, trainable, output_grad = flags[cost.name]
            flops = forward_flops * (1 + int(inputs_grad) + int(trainable))
            on_gradient_path = output_grad
            moved = activations * (3 if on_gradient_path else 1) + params * (2 if on_gradient_path else 1)
            moved += _trainable_bytes(gm, node, element, updated) * (4 + 2 * OPTIMIZER_STATES)
        else:
            flops, moved = forward_flops, activations + params
        if flops <= 0 and moved <= 0:
            continue
        intensity = flops / moved if moved else 0.0
        compute_s, memory_s = flops / peak, moved / bandwidth
        points.append(NodePoint(
            name=cost.name, label=cost.target if node.op == "call_module" else cost.name, op=cost.op,
            target=cost.target, flops=flops, bytes=moved, arithmetic_intensity=intensity,
            attainable_flops_per_second=min(peak, bandwidth * intensity),
            roofline_seconds=max(compute_s, memory_s),
            bound="compute" if compute_s >= memory_s else "memory"))
    return points


def step_point(points: list[NodePoint], profile: HardwareProfile, precision: str) -> dict:
    """The whole step as one point: sums of the nodes' FLOPs, bytes and roofline seconds.

    ``roofline_seconds`` sums the nodes' own bounds (each node is limited by its own
    resource, as in an unfused eager run); ``whole_step_roofline_seconds`` is the bound
    of the totals, max(total FLOPs / peak, total bytes / bandwidth), reached only if the
    nodes overlapped perfectly.
    """
    peak, bandwidth = profile.peak(precision), profile.memory_bandwidth
    flops = sum(p.flops for p in points)
    moved = sum(p.bytes for p in points)
    intensity = flops / moved if moved else 0.0
    return {"label": "step", "flops": flops, "bytes": moved, "arithmetic_intensity": intensity,
            "attainable_flops_per_second": min(peak, bandwidth * intensity),
            "roofline_seconds": sum(p.roofline_seconds for p in points),
            "whole_step_roofline_seconds": max(flops / peak, moved / bandwidth)}
