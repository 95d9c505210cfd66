"""Data-parallel communication: the gradient all-reduce of a training step, and what it costs.

In data-parallel training (PyTorch DDP over NCCL) every GPU runs the whole model on its
own share of the batch, and after the backward pass the gradients are summed over all
GPUs with an all-reduce. This module bounds the time of that all-reduce from the
interconnect figures of a hardware profile (``profiles/hardware/*.toml``: bandwidths in
bytes/s per GPU and per direction, latencies in seconds per message) and holds it
against the compute of the step.

The cost model is the latency-bandwidth ("alpha-beta") model of collective operations
(Thakur, Rabenseifner and Gropp, "Optimization of collective communication operations
in MPICH", IJHPCA 2005), with the ring algorithms NCCL runs (NCCL documentation,
"Collective operations": AllReduce, ReduceScatter, AllGather,
https://docs.nvidia.com/deeplearning/nccl/user-guide/docs/usage/collectives.html).
For S bytes on n GPUs, link bandwidth B (bytes/s, one direction) and latency alpha
(seconds per message):

- ring reduce-scatter or all-gather: (n - 1) / n * S / B + (n - 1) * alpha;
- ring all-reduce, a reduce-scatter then an all-gather:
  2 (n - 1) / n * S / B + 2 (n - 1) * alpha (Patarasuk and Yuan, "Bandwidth optimal
  all-reduce algorithms for clusters of workstations", JPDC 2009). The factor
  2 (n - 1) / n is the one NCCL's tests use to turn an all-reduce time into "bus
  bandwidth", which they compare with the hardware's unidirectional link bandwidth
  (nccl-tests, doc/PERFORMANCE.md, https://github.com/NVIDIA/nccl-tests).
- on M > 1 nodes of g = N / M GPUs, hierarchical: a ring reduce-scatter inside each node
  over the intra-node link (each GPU is left with S / g bytes summed over its node), a
  ring all-reduce of those S / g bytes among the M GPUs of the same local rank, one per
  node, over the network (each GPU has its own share of the node's network cards), then
  a ring all-gather inside each node: the three phases of Goyal et al., "Accurate, large
  minibatch SGD: training ImageNet in 1 hour" (2017, section 4), and the hierarchical
  all-reduce of Jia et al., "Highly scalable deep learning training system with
  mixed-precision" (2018). On one node it is the flat ring over the intra-node link.
- the network stage takes the faster of the ring and NCCL's double binary tree (NCCL 2.4
  and later choose between them per call): a reduction up two complementary binary
  trees, each carrying half the data, then a broadcast down them, pipelined, so every
  rank sends and receives at full bandwidth (Sanders, Speck and Träff, "Two-tree
  algorithms for full bandwidth broadcast, reduction and scan", Parallel Computing
  2009; Jeaugey, "Massively scale your deep learning training with NCCL 2.4", NVIDIA
  2019, https://developer.nvidia.com/blog/massively-scale-deep-learning-training-nccl-2-4/):
  2 S / B + 2 ceil(log2 n) * alpha. The ring's latency grows with n, the tree's with
  log2 n: on hundreds of nodes the ring's latency term alone outlasts a ResNet-50 step
  (at 448 nodes, 2 x 447 x 10 us = 8.9 ms), the tree's is 0.18 ms.

What the model leaves out: NVLink SHARP and InfiniBand SHARP (in-switch reduction),
which can beat both; the tree inside a node; protocol overheads; contention with the step's
own memory traffic; and the buckets DDP splits the gradients into (25 MiB by default),
each of which pays the latency term again. The time is a lower bound of the same kind as
the roofline's.

Scaling efficiency compares a step on N GPUs, each at the per-GPU batch of the
single-GPU step, with that single-GPU step: compute / (compute + comm) when nothing
overlaps, compute / max(compute, comm) when the all-reduce hides entirely behind the
backward pass (DDP starts a bucket's all-reduce as soon as its gradients are ready).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch

from fastgraph.core.errors import UserError
from fastgraph.perf.roofline import ELEMENT_BYTES, HardwareProfile, _check_precision

DTYPE_PRECISIONS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def gradient_bytes(parameters: torch.nn.Module | Iterable[torch.nn.Parameter],
                   precision: str | torch.dtype = "fp32") -> int:
    """Bytes of the gradients one all-reduce sums: trainable parameters x element size.

    Args:
        parameters: a module (its ``parameters()``) or the parameters themselves; those
            with ``requires_grad`` False (frozen whitening filters, frozen BN scales) have
            no gradient and count nothing. A parameter shared by two modules counts once.
        precision: the gradient dtype, as a precision name (``fp32``/``tf32``: 4 bytes,
            ``fp16``/``bf16``: 2) or a ``torch.dtype``.

    Returns:
        bytes (int).

    Raises:
        UserError: unknown precision name or dtype.
    """
    if isinstance(precision, torch.dtype):
        if precision not in DTYPE_PRECISIONS:
            raise UserError(f"no gradient all-reduce model for dtype {precision}; "
                            f"known: {', '.join(map(str, DTYPE_PRECISIONS))}")
        precision = DTYPE_PRECISIONS[precision]
    _check_precision(precision)
    params = parameters.parameters() if isinstance(parameters, torch.nn.Module) else parameters
    unique = {id(p): p for p in params if p.requires_grad}
    return sum(p.numel() for p in unique.values()) * ELEMENT_BYTES[precision]


def _check_link(nbytes: float, ranks: int, bandwidth: float, latency: float) -> None:
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise ValueError(f"ranks must be an integer >= 1, got {ranks!r}")
    if nbytes < 0 or not bandwidth > 0 or latency < 0:
        raise ValueError("nbytes and latency must be >= 0 and bandwidth > 0")


def ring_reduce_scatter_seconds(nbytes: float, ranks: int, bandwidth: float, latency: float) -> float:
    """Seconds of a ring reduce-scatter (or all-gather) of ``nbytes`` over ``ranks`` GPUs.

    (ranks - 1) / ranks * nbytes / bandwidth + (ranks - 1) * latency: ranks - 1 steps,
    each sending and receiving nbytes / ranks on every link at once. 0 for one rank.

    Args:
        nbytes: bytes of the whole buffer on each GPU. bandwidth: bytes/s per GPU, one
            direction. latency: seconds per message (per step).

    Raises:
        ValueError: ranks < 1, negative bytes or latency, bandwidth <= 0.
    """
    _check_link(nbytes, ranks, bandwidth, latency)
    return (ranks - 1) / ranks * nbytes / bandwidth + (ranks - 1) * latency


def tree_allreduce_seconds(nbytes: float, ranks: int, bandwidth: float, latency: float) -> float:
    """Seconds of a double-binary-tree all-reduce of ``nbytes`` over ``ranks`` GPUs (NCCL's
    tree; Sanders, Speck and Träff 2009): 2 nbytes / bandwidth + 2 ceil(log2 ranks) latency,
    a pipelined reduce and broadcast through trees of depth ceil(log2 ranks), each tree
    carrying half the bytes. 0 for one rank.

    Args and raises: as :func:`ring_reduce_scatter_seconds`.
    """
    _check_link(nbytes, ranks, bandwidth, latency)
    if ranks == 1:
        return 0.0
    return 2 * nbytes / bandwidth + 2 * math.ceil(math.log2(ranks)) * latency


def ring_allreduce_seconds(nbytes: float, ranks: int, bandwidth: float, latency: float) -> float:
    """Seconds of a ring all-reduce of ``nbytes`` over ``ranks`` GPUs (Patarasuk and Yuan 2009).

    2 (ranks - 1) / ranks * nbytes / bandwidth + 2 (ranks - 1) * latency: a ring
    reduce-scatter followed by a ring all-gather. 0 for one rank.

    Args and raises: as :func:`ring_reduce_scatter_seconds`.
    """
    return 2 * ring_reduce_scatter_seconds(nbytes, ranks, bandwidth, latency)


@dataclass(frozen=True)
class AllReduce:
    """Time of one gradient all-reduce on ``gpus`` GPUs over ``nodes`` nodes.

    Attributes:
        algorithm: ``"none"`` (one GPU), ``"ring"`` (one node) or ``"hierarchical"``.
        gpus, nodes, gpus_per_node: the system.
        nbytes: bytes all-reduced (the gradients of one step).
        intra_node_seconds: seconds on the intra-node link: the whole flat ring on one
            node; the reduce-scatter plus the all-gather on several (0 with one GPU per node).
        inter_node_seconds: seconds of the network all-reduce of nbytes / gpus_per_node
            (0 on one node).
        seconds: the total, seconds per step.
        network_algorithm: ``"ring"`` or ``"tree"``, the faster for the network stage
            (``""`` on one node).
    """

    algorithm: str
    gpus: int
    nodes: int
    gpus_per_node: int
    nbytes: float
    intra_node_seconds: float
    inter_node_seconds: float
    seconds: float
    network_algorithm: str = ""

    def as_dict(self) -> dict:
        """Plain dict for JSON reports."""
        return asdict(self)


# The most GPUs one node's intra-node link joins: the vendor systems whose interconnect
# figures the shipped profiles carry hold 8 (DGX-1, DGX A100, DGX H100 and H200, each 8 GPUs
# on NVLink; a PCIe server of 8 cards). More GPUs than that sit on several nodes and
# reduce over the network, so a larger system must say how many nodes it has.
MAX_GPUS_PER_NODE = 8


def check_system(profile: HardwareProfile, gpus: int, nodes: int = 1) -> int:
    """Check that ``gpus`` GPUs on ``nodes`` nodes can be modelled on ``profile``; return
    the GPUs per node.

    Raises:
        UserError (one line): gpus or nodes not an integer >= 1, gpus not divisible by
            nodes, more than :data:`MAX_GPUS_PER_NODE` GPUs per node, more than one GPU on
            a profile without an intra-node figure, more than one node on a profile without
            a network figure.
    """
    for name, value in (("gpus", gpus), ("nodes", nodes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{name} must be an integer >= 1, got {value!r}")
    if gpus % nodes:
        raise UserError(f"gpus ({gpus}) must be a multiple of nodes ({nodes}): every node holds "
                        "as many GPUs")
    if gpus // nodes > MAX_GPUS_PER_NODE:
        least = -(-gpus // MAX_GPUS_PER_NODE)
        where = (f": spread them over at least {least} nodes (--nodes {least})"
                 if profile.network_bandwidth is not None else
                 ", and it has no network figure to join several nodes")
        raise UserError(f"{gpus} GPUs on {nodes} node{'s' * (nodes > 1)}: a node of the {profile.name} "
                        f"profile holds at most {MAX_GPUS_PER_NODE} GPUs{where}")
    if gpus > 1 and profile.intra_node_bandwidth is None:
        raise UserError(f"hardware profile {profile.name!r} has no intra-node bandwidth: "
                        "cannot model more than one GPU")
    if nodes > 1 and profile.network_bandwidth is None:
        raise UserError(f"hardware profile {profile.name!r} ({profile.display_name}) has no network "
                        "figure: cannot model more than one node (give a profile .toml with "
                        "[network_bandwidth] and [network_latency])")
    return gpus // nodes


def allreduce(nbytes: float, profile: HardwareProfile, gpus: int, nodes: int = 1) -> AllReduce:
    """Time of an all-reduce of ``nbytes`` bytes on ``gpus`` GPUs spread over ``nodes`` nodes.

    One node: the flat ring over the intra-node link. Several nodes, g = gpus / nodes:
    intra-node ring reduce-scatter of nbytes, network all-reduce of nbytes / g among
    ``nodes`` GPUs (the faster of the ring and the double binary tree), intra-node ring
    all-gather of nbytes (see the module docstring for the formulas and their sources).
    Bandwidths and latencies are the profile's.

    Raises:
        UserError: see :func:`check_system`. ValueError: negative nbytes.
    """
    per_node = check_system(profile, gpus, nodes)
    if nbytes < 0:
        raise ValueError("nbytes must be >= 0")
    if gpus == 1:
        return AllReduce("none", 1, 1, 1, float(nbytes), 0.0, 0.0, 0.0)
    if nodes == 1:
        intra = ring_allreduce_seconds(nbytes, gpus, profile.intra_node_bandwidth, profile.intra_node_latency)
        return AllReduce("ring", gpus, 1, gpus, float(nbytes), intra, 0.0, intra)
    intra = 2 * ring_reduce_scatter_seconds(nbytes, per_node, profile.intra_node_bandwidth,
                                            profile.intra_node_latency) if per_node > 1 else 0.0
    link = (nbytes / per_node, nodes, profile.network_bandwidth, profile.network_latency)
    ring, tree = ring_allreduce_seconds(*link), tree_allreduce_seconds(*link)
    inter, network = (ring, "ring") if ring <= tree else (tree, "tree")
    return AllReduce("hierarchical", gpus, nodes, per_node, float(nbytes), intra, inter, intra + inter,
                     network)


@dataclass(frozen=True)
class Scaling:
    """A data-parallel step against the single-GPU step at the same per-GPU batch.

    Attributes:
        compute_seconds: the single-GPU step (seconds), e.g. its roofline time.
        communication_seconds: the all-reduce per step (seconds).
        no_overlap_seconds: compute + comm, the step when the all-reduce waits for the
            backward to end.
        full_overlap_seconds: max(compute, comm), the step when it hides entirely behind
            the backward (DDP's bucketed all-reduce at best).
        no_overlap_efficiency, full_overlap_efficiency: compute / each step time; 0 <
            no-overlap <= full-overlap <= 1 (1.0 when comm is 0).
    """

    compute_seconds: float
    communication_seconds: float
    no_overlap_seconds: float
    full_overlap_seconds: float
    no_overlap_efficiency: float
    full_overlap_efficiency: float


def scaling(compute_seconds: float, communication_seconds: float) -> Scaling:
    """The two bounds of a data-parallel step and its scaling efficiency (see :class:`Scaling`).

    Raises:
        ValueError: compute_seconds <= 0 or communication_seconds < 0 (or not finite).
    """
    if not (compute_seconds > 0 and math.isfinite(compute_seconds)):
        raise ValueError(f"compute_seconds must be > 0, got {compute_seconds!r}")
    if not (communication_seconds >= 0 and math.isfinite(communication_seconds)):
        raise ValueError(f"communication_seconds must be >= 0, got {communication_seconds!r}")
    serial = compute_seconds + communication_seconds
    overlapped = max(compute_seconds, communication_seconds)
    return Scaling(compute_seconds, communication_seconds, serial, overlapped,
                   compute_seconds / serial, compute_seconds / overlapped)


def communication_record(parameters: torch.nn.Module | Iterable[torch.nn.Parameter],
                         profile: HardwareProfile, *, gpus: int, nodes: int = 1, batch_size: int,
                         compute_seconds: float, gradient_precision: str = "fp32") -> dict:
    """The data-parallel prediction as a JSON-ready dict (the ``communication`` entry of
    ``fastgraph roofline --gpus N --json``).

    Args:
        parameters: the model (or its parameters): the trainable ones are all-reduced.
        profile: the hardware profile; its interconnect figures are used.
        gpus, nodes: the system (gpus a multiple of nodes).
        batch_size: images per GPU per step (the global batch is gpus x batch_size).
        compute_seconds: the single-GPU step at ``batch_size`` (seconds, > 0).
        gradient_precision: dtype of the gradients all-reduced (fp32, tf32, fp16, bf16).

    Returns:
        dict: ``gpus``, ``nodes``, ``gpus_per_node``, ``algorithm``, ``network_algorithm``
        (``"ring"`` or ``"tree"`` across nodes, None on one), ``gradient_precision``,
        ``parameters`` (trainable, count), ``gradient_bytes`` (bytes), the links
        (``intra_node_link``, ``intra_node_bandwidth`` bytes/s, ``intra_node_latency`` s,
        and the ``network_*`` ones, None when unused), ``allreduce_seconds``,
        ``intra_node_seconds``, ``inter_node_seconds``, ``compute_seconds``,
        ``step_seconds_no_overlap``, ``step_seconds_full_overlap``,
        ``scaling_efficiency_no_overlap``, ``scaling_efficiency_full_overlap``,
        ``batch_size_per_gpu``, ``global_batch_size``, ``images_per_second_one_gpu`` and
        ``images_per_second_no_overlap`` / ``_full_overlap`` (the whole system).

    Raises:
        UserError: see :func:`check_system`; unknown gradient precision.
        ValueError: batch_size < 1, compute_seconds <= 0.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    params = list(parameters.parameters() if isinstance(parameters, torch.nn.Module) else parameters)
    nbytes = gradient_bytes(params, gradient_precision)
    reduce = allreduce(nbytes, profile, gpus, nodes)
    bound = scaling(compute_seconds, reduce.seconds)
    network = nodes > 1
    return {
        "gpus": gpus, "nodes": nodes, "gpus_per_node": reduce.gpus_per_node,
        "algorithm": reduce.algorithm, "network_algorithm": reduce.network_algorithm or None,
        "gradient_precision": gradient_precision,
        "parameters": nbytes // ELEMENT_BYTES[gradient_precision], "gradient_bytes": nbytes,
        "intra_node_link": profile.intra_node_link if gpus > nodes else None,
        "intra_node_bandwidth": profile.intra_node_bandwidth if gpus > nodes else None,
        "intra_node_latency": profile.intra_node_latency if gpus > nodes else None,
        "network_link": profile.network_link if network else None,
        "network_bandwidth": profile.network_bandwidth if network else None,
        "network_latency": profile.network_latency if network else None,
        "allreduce_seconds": reduce.seconds, "intra_node_seconds": reduce.intra_node_seconds,
        "inter_node_seconds": reduce.inter_node_seconds,
        "compute_seconds": compute_seconds,
        "step_seconds_no_overlap": bound.no_overlap_seconds,
        "step_seconds_full_overlap": bound.full_overlap_seconds,
        "scaling_efficiency_no_overlap": bound.no_overlap_efficiency,
        "scaling_efficiency_full_overlap": bound.full_overlap_efficiency,
        "batch_size_per_gpu": batch_size, "global_batch_size": gpus * batch_size,
        "images_per_second_one_gpu": batch_size / compute_seconds,
        "images_per_second_no_overlap": gpus * batch_size / bound.no_overlap_seconds,
        "images_per_second_full_overlap": gpus * batch_size / bound.full_overlap_seconds,
    }
