"""The roofline of a model, node by node, as a record: :func:`roofline` (``fastgraph.roofline``),
the :class:`Roofline` it returns, its table and its plot.

``fastgraph.roofline(model)`` traces the model and places every graph node on a hardware
profile's roofline (Williams, Waterman and Patterson, CACM 2009): FLOPs and bytes of one
training step (or one inference batch) from :mod:`fastgraph.perf.nodes`, the arithmetic
intensity, the attainable FLOP/s and the roofline time, and the whole step as one more
point. With a measured profile (``fastgraph profile --json``) each node's measured time
and achieved FLOP/s stand beside the prediction. With ``gpus`` (and ``nodes``) the record
gains the data-parallel prediction of :mod:`fastgraph.perf.communication`: the gradient
all-reduce per step and the scaling efficiency of the step on that many GPUs.
``fastgraph roofline`` prints the tables, draws the plot and writes the record as JSON.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from rich.console import Console, Group
from rich.table import Table
from torch import nn

from fastgraph.core.errors import UserError
from fastgraph.core.figures import check_figure_path
from fastgraph.core.outputs import report_header
from fastgraph.perf.roofline import DEFAULT_PROFILE, HardwareProfile


def report_text(report) -> str:
    """What ``print(report)`` shows: the report's rich rendering (its ``__rich__``) as plain
    text at the terminal's width (80 columns when not a terminal), paths never cut."""
    buffer = io.StringIO()
    Console(file=buffer).print(report, crop=False)
    return buffer.getvalue()


def read_measured(path: str | os.PathLike) -> dict:
    """The ``fastgraph profile --json`` record at ``path``.

    Raises:
        UserError: missing file, invalid JSON, or not a ``fastgraph profile`` record.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"--measured file not found: {file}")
    try:
        record = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"--measured {file}: not valid JSON ({exc})") from None
    return check_measured(record, f"--measured {file}")


def _number(value, low: float) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return number and math.isfinite(value) and value >= low


def check_measured(record: object, where: str = "--measured") -> dict:
    """``record`` when it has the fields of a ``fastgraph profile --json`` record that the
    roofline reads: ``batch_size`` (int >= 1), ``rows`` (dicts with a ``node`` name and
    ``seconds`` >= 0 or null) and an optional ``step_seconds`` (> 0).

    Raises:
        UserError: one line naming ``where`` and the first field that is missing or wrong.
    """
    if not isinstance(record, dict) or not isinstance(record.get("rows"), list) or "batch_size" not in record:
        raise UserError(f"{where} is not the --json output of `fastgraph profile`")
    size = record["batch_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise UserError(f"{where}: batch_size must be a whole number of images >= 1, got {size!r}")
    for i, row in enumerate(record["rows"]):
        if not isinstance(row, dict) or not isinstance(row.get("node"), str):
            raise UserError(f"{where}: rows[{i}] has no node name")
        if row.get("seconds") is not None and not _number(row["seconds"], 0):
            raise UserError(f"{where}: rows[{i}] ({row['node']}): seconds must be a number >= 0, "
                            f"got {row['seconds']!r}")
    step = record.get("step_seconds")
    if step is not None and not (_number(step, 0) and step > 0):
        raise UserError(f"{where}: step_seconds must be a number > 0, got {step!r}")
    return record


def measured_on_profile(profile: HardwareProfile, measured: dict) -> bool:
    """Whether a ``fastgraph profile`` record was measured on ``profile``'s GPU: its own
    ``measured_on_profile`` when it was taken against the same profile, else whether the
    profile describes the device (:meth:`HardwareProfile.describes`); a CPU never."""
    if measured.get("profile") == profile.name and "measured_on_profile" in measured:
        return bool(measured["measured_on_profile"])
    return profile.describes(str(measured.get("device", "")))


def roofline_record(gm, profile: HardwareProfile, precision: str, mode: str, batch_size: int,
                    measured: dict | None = None, input_shape: tuple[int, int, int] = (3, 32, 32)) -> dict:
    """The roofline of ``gm`` as a JSON-ready dict: profile, one entry per node, the step,
    for batches of ``batch_size`` images of ``input_shape`` (C, H, W pixels).

    With ``measured`` (a profile record), nodes gain ``measured_seconds`` (per step),
    ``achieved_flops_per_second`` and ``fraction_of_attainable``, matched by label
    (module path); the step gains the measured step time. ``fraction_of_attainable`` is
    None unless the record was measured on ``profile``'s GPU (:func:`measured_on_profile`):
    a share of another device's roof says nothing.

    Raises:
        UserError: see :func:`fastgraph.perf.nodes.node_points`; a measured record
            that matches no node of the graph.
    """
    from fastgraph.perf.nodes import node_points, step_point

    points = node_points(gm, profile, precision, mode=mode, batch_size=batch_size,
                         example=torch.randn(2, *input_shape))
    nodes = [p.as_dict() for p in points]
    step = step_point(points, profile, precision)
    if measured is not None:
        rows = {r["node"]: r for r in measured["rows"]}
        on_profile = measured_on_profile(profile, measured)
        matched = 0
        for n in nodes:
            row = rows.get(n["label"])
            if row is None or not row.get("seconds"):
                continue
            matched += 1
            n["measured_seconds"] = row["seconds"]
            n["achieved_flops_per_second"] = n["flops"] / row["seconds"]
            n["fraction_of_attainable"] = (n["achieved_flops_per_second"] / n["attainable_flops_per_second"]
                                           if on_profile and n["attainable_flops_per_second"] else None)
        if not matched:
            raise UserError("--measured: no row matches a node of this graph (profiled from another model?)")
        step_seconds = measured.get("step_seconds")
        if step_seconds:
            step["measured_seconds"] = step_seconds
            step["achieved_flops_per_second"] = step["flops"] / step_seconds
    return {"profile": profile.name, "display_name": profile.display_name, "precision": precision,
            "mode": mode, "batch_size": batch_size, "input_shape": list(input_shape),
            "peak_flops_per_second": profile.peak(precision),
            "memory_bandwidth": profile.memory_bandwidth, "ridge_point": profile.ridge_point(precision),
            "nodes": nodes, "step": step}


def roofline_table(record: dict) -> Table:
    """One row per node and one for the step: FLOPs, bytes, intensity, bound, roofline time, measured."""
    from fastgraph.core.console import fitting_table, number, si

    measured = any("measured_seconds" in n for n in record["nodes"])
    shares = any(n.get("fraction_of_attainable") is not None for n in record["nodes"])
    side = "x".join(map(str, record.get("input_shape", [3, 32, 32])[1:]))
    title = (f"Roofline per node: {record['mode']} step of {record['batch_size']} {side} images on "
             f"{record['display_name']} at {record['precision']} "
             f"(ridge {record['ridge_point']:.3g} FLOPs/B); "
             "roof: the node's time on the roofline"
             + ("; meas: measured time, achieved rate" + (" and its share of the roof's" if shares else "")
                if measured else ""))
    # Short headers and units in them, so that 11 columns fit 80 with the node names whole.
    cols = ["node", "FLOPs", "bytes", "FLOP/B", "bound", "roof µs", "% step"]
    cols += (["meas µs", "TFLOP/s"] + ["% roof"] * shares) if measured else ["attainable TFLOP/s"]
    rows = []
    total = record["step"]["roofline_seconds"] or 1.0
    for n in record["nodes"] + [dict(record["step"], label="step (sum)", bound="-")]:
        row = [n["label"], si(n["flops"]), si(n["bytes"], "B"), f"{n['arithmetic_intensity']:.3g}",
               n["bound"], number(n["roofline_seconds"] * 1e6), f"{100 * n['roofline_seconds'] / total:.1f}"]
        if measured:
            frac = n.get("fraction_of_attainable")
            seconds, achieved = n.get("measured_seconds"), n.get("achieved_flops_per_second")
            row += [number(seconds * 1e6 if seconds is not None else None),
                    number(achieved / 1e12 if achieved is not None else None)]
            row += [f"{100 * frac:.1f}" if frac is not None else "-"] * shares
        else:
            row.append(number(n["attainable_flops_per_second"] / 1e12))
        rows.append(row)
    return fitting_table(title, {c: "left" if c in ("node", "bound") else "right" for c in cols}, rows,
                         compact=True)


def communication_table(comm: dict, display_name: str) -> Table:
    """The data-parallel prediction (``Roofline.communication``) as a two-column table."""
    from fastgraph.core.console import fitting_table, seconds, si

    def share(x: float) -> str:
        return f"{100 * x:.1f}%"

    links = []
    if comm["intra_node_link"]:
        links.append(f"{comm['intra_node_link']}: {seconds(comm['intra_node_seconds'])}")
    if comm["network_link"]:
        how = f", {comm['network_algorithm']}" if comm.get("network_algorithm") else ""
        links.append(f"{comm['network_link']}: {seconds(comm['inter_node_seconds'])}{how}")
    reduce = f"{seconds(comm['allreduce_seconds'])} per step, {comm['algorithm']}"
    reduce += f" ({'; '.join(links)})" if links else ""
    rows = [
        ["system", f"{comm['gpus']} GPU{'s' * (comm['gpus'] > 1)}: {comm['nodes']} "
                   f"node{'s' * (comm['nodes'] > 1)} of {comm['gpus_per_node']}"],
        ["batch", f"{comm['batch_size_per_gpu']} per GPU, {comm['global_batch_size']} in all"],
        ["gradients", f"{si(comm['gradient_bytes'], 'B')}: {si(comm['parameters'])} parameters "
                      f"at {comm['gradient_precision']}"],
        ["all-reduce", reduce],
        ["compute step", f"{seconds(comm['compute_seconds'])} (1 GPU, roofline), "
                         f"{si(comm['images_per_second_one_gpu'])} images/s"],
        ["no overlap", f"step {seconds(comm['step_seconds_no_overlap'])}, scaling "
                       f"{share(comm['scaling_efficiency_no_overlap'])}, "
                       f"{si(comm['images_per_second_no_overlap'])} images/s in all"],
        ["full overlap", f"step {seconds(comm['step_seconds_full_overlap'])}, scaling "
                         f"{share(comm['scaling_efficiency_full_overlap'])}, "
                         f"{si(comm['images_per_second_full_overlap'])} images/s in all"],
    ]
    title = (f"Data-parallel training on {comm['gpus']} x {display_name} (prediction: ring "
             "all-reduce, hierarchical across nodes with the faster of ring and tree between "
             "them; scaling against one GPU at the same batch)")
    return fitting_table(title, {"what": "left", "prediction": "left"}, rows)


@dataclass
class Roofline:
    """Every node of a model's graph on a hardware profile's roofline, and the whole step.

    Attributes:
        profile, display_name: the hardware profile's name and product.
        precision: whose peak applies and the element size of tensors (fp32/tf32: 4 bytes,
            fp16/bf16: 2).
        mode: ``"train"`` (forward, backward and SGD update) or ``"infer"`` (forward).
        batch_size: images per step.
        peak_flops_per_second: FLOP/s. memory_bandwidth: bytes/s. ridge_point: FLOPs/byte.
        nodes: per node that computes or moves data, in graph order
            (:class:`fastgraph.perf.nodes.NodePoint` fields: ``name``, ``label`` (module
            path), ``flops`` and ``bytes`` per step, ``arithmetic_intensity``,
            ``attainable_flops_per_second``, ``roofline_seconds``, ``bound``; measured:
            ``measured_seconds``, ``achieved_flops_per_second``, ``fraction_of_attainable``).
        step: the whole step as one point (sums of the nodes; see
            :func:`fastgraph.perf.nodes.step_point`).
        model: the model file's absolute path, or ``"<Class> (nn.Module)"``.
        communication: with ``gpus``, the data-parallel prediction of
            :func:`fastgraph.perf.communication.communication_record` (gradient bytes,
            all-reduce seconds per step, the single-GPU compute step, both scaling bounds,
            images/s of the whole system); None without (and then not in :meth:`to_dict`).
        plot_path: the plot written by :meth:`plot` (None before; ``plot`` in :meth:`to_dict`).
        hardware: the :class:`~fastgraph.perf.roofline.HardwareProfile` itself, and
        measured_device: the device the measured profile ran on, and
        measured_on_profile: whether that is the profile's GPU (:func:`measured_on_profile`;
            ``fraction_of_attainable`` is None otherwise) (none of these in :meth:`to_dict`).
        header: schema, versions, commit and date (``fastgraph.core.outputs.report_header``).
    """

    profile: str
    display_name: str
    precision: str
    mode: str
    batch_size: int
    input_shape: list[int]
    peak_flops_per_second: float
    memory_bandwidth: float
    ridge_point: float
    nodes: list[dict]
    step: dict
    model: str
    communication: dict | None = None
    plot_path: str | None = None
    hardware: HardwareProfile | None = field(default=None, repr=False)
    measured_device: str | None = field(default=None, repr=False)
    measured_on_profile: bool | None = field(default=None, repr=False)
    header: dict = field(default_factory=report_header, repr=False)

    def to_dict(self) -> dict:
        """Exactly the JSON ``fastgraph roofline --json`` writes (``plot`` is the plot's path, once drawn)."""
        skip = ("plot_path", "hardware", "measured_device", "measured_on_profile", "header")
        skip += ("communication",) if self.communication is None else ()
        body = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name not in skip}
        plot = {"plot": self.plot_path} if self.plot_path else {}
        return {**self.header, "device": "none", **body, **plot}

    def plot(self, path: str | os.PathLike = "roofline.png", title: str | None = None) -> Path:
        """Draw the roofline plot (matplotlib, 11 x 7 inches at 110 dpi) to ``path``; return it.

        Every node with counted FLOPs is a point at its intensity, the step a star;
        measured nodes are the labelled points when the record holds them.

        Raises:
            UserError: a suffix matplotlib cannot write (``.png``, ``.pdf``, ``.svg``...),
                or the file cannot be written.
        """
        from fastgraph.perf.plot import plot_roofline
        from fastgraph.perf.roofline import load_profile

        hardware = self.hardware or load_profile(self.profile)
        check_figure_path(path, "the roofline plot")
        measured = [n for n in self.nodes if "achieved_flops_per_second" in n] or None
        if title is None:
            side = "x".join(map(str, self.input_shape[1:]))
            title = (f"{Path(self.model).name}: {self.mode} step of {self.batch_size} {side} images on "
                     f"{self.display_name}, {self.precision}"
                     + (f" (measured: {self.measured_device})" if measured else ""))
        written = plot_roofline(path, profile=hardware, precision=self.precision,
                                points=self.nodes, step=self.step, title=title, measured=measured)
        self.plot_path = str(written.resolve())
        return written

    def __rich__(self) -> Table | Group:
        """The table ``fastgraph roofline`` prints, and the data-parallel one with ``gpus``."""
        parts = [roofline_table(self.to_dict())]
        if self.measured_device is not None and not self.measured_on_profile:
            parts.append(f"Measured on {self.measured_device}, not on {self.display_name}: no share "
                         "of its roof is given.")
        if self.communication is not None:
            parts += ["", communication_table(self.communication, self.display_name)]
        return parts[0] if len(parts) == 1 else Group(*parts)

    __str__ = report_text


def roofline(model: nn.Module | str | os.PathLike, *, profile: str | HardwareProfile = DEFAULT_PROFILE,
             precision: str = "bf16", mode: str = "train", batch_size: int | None = None,
             measured: dict | str | os.PathLike | None = None, entry: str | None = None,
             gpus: int | None = None, nodes: int | None = None,
             gradient_precision: str | None = None,
             input_shape: tuple[int, int, int] = (3, 32, 32)) -> Roofline:
    """Every graph node of ``model`` on ``profile``'s roofline at ``precision``, and the whole step.

    Counts come from :func:`fastgraph.perf.nodes.node_points` (FLOPs by
    ``FlopCounterMode``, bytes by the eager byte model of
    :func:`fastgraph.perf.roofline.node_costs`), per step of ``batch_size`` images.

    Args:
        model: an ``nn.Module`` (traced; not modified) or a plain PyTorch model file
            (``entry``: its entry point, see :func:`fastgraph.core.loading.load_model`).
        profile: hardware profile name (``v100``, ``a100``, ``h100``...), ``.toml`` path or
            :class:`~fastgraph.perf.roofline.HardwareProfile`.
        precision: fp32, tf32, fp16 or bf16.
        mode: ``"train"`` (forward + backward + SGD update) or ``"infer"`` (forward).
        batch_size: images per step (>= 1); default 512, or the measured profile's.
        measured: a ``fastgraph profile --json`` record (dict or file): nodes gain their
            measured seconds per step and achieved FLOP/s, and their share of the roof when
            measured on ``profile``'s GPU; the step's batch size is the profile's (training
            steps only), and a ``batch_size`` given must equal it.
        gpus, nodes: predict data-parallel training on ``gpus`` GPUs over ``nodes`` nodes
            (default 1; training only), each GPU at ``batch_size`` images per step: the
            record gains ``communication`` (see
            :func:`fastgraph.perf.communication.communication_record`), whose compute step
            is this record's step roofline time (``step["roofline_seconds"]``).
        gradient_precision: dtype of the gradients all-reduced; default ``precision``
            (the roofline's byte model holds every tensor at it). Mixed precision with
            fp32 master weights all-reduces fp32 gradients: pass ``"fp32"``.
        input_shape: one image, (channels, height, width) in pixels: CIFAR-10's (3, 32, 32)
            by default, (3, 224, 224) for an ImageNet ResNet-50. Measured profiles are of
            CIFAR-10 steps, so ``measured`` needs the default.

    Returns:
        :class:`Roofline`; its ``to_dict()`` is the JSON ``fastgraph roofline --json``
        writes, :meth:`Roofline.plot` draws the PNG.

    Raises:
        UserError: unknown profile or precision (or one the profile lacks), a bad mode or
            batch size, a measured record that is not a profile's, is of inference, is of
            another batch size than ``batch_size``, or matches no node; a model file that
            cannot be built or traced (``ModelError``); ``nodes`` without ``gpus``, ``gpus``
            in inference, or a system the profile cannot model
            (:func:`fastgraph.perf.communication.check_system`: gpus or nodes < 1, gpus not
            a multiple of nodes, more GPUs per node than a node holds, several nodes on a
            profile without a network).
    """
    from fastgraph.core.loading import load_model
    from fastgraph.core.tracing import trace
    from fastgraph.perf.roofline import load_profile

    hardware = profile if isinstance(profile, HardwareProfile) else load_profile(profile)
    hardware.peak(precision)
    if mode not in ("train", "infer"):
        raise UserError(f"mode must be 'train' or 'infer', not {mode!r}")
    if measured is not None:
        measured = check_measured(measured) if isinstance(measured, dict) else read_measured(measured)
    if measured is not None:
        if mode != "train":
            raise UserError("--measured comes from training steps (`fastgraph profile`): use --mode train")
        # FLOPs per step must be those of the measured steps
        if batch_size is not None and batch_size != int(measured["batch_size"]):
            raise UserError(f"--batch-size {batch_size} is not the {measured['batch_size']} images per step "
                            "of the --measured profile: drop --batch-size, or profile at that batch size")
        batch_size = int(measured["batch_size"])
    elif batch_size is None:
        batch_size = 512
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
    input_shape = tuple(input_shape)
    if len(input_shape) != 3 or not all(isinstance(v, int) and v >= 1 for v in input_shape):
        raise UserError(f"input_shape must be (C, H, W) positive integers, got {input_shape!r}")
    if measured is not None and input_shape != (3, 32, 32):
        raise UserError("--measured profiles are of CIFAR-10 steps (3x32x32 images): drop --input-shape "
                        f"{','.join(map(str, input_shape))} or --measured")
    if gpus is None and (nodes is not None or gradient_precision is not None):
        raise UserError("nodes and gradient_precision describe data-parallel training: give gpus too")
    if gpus is not None:
        from fastgraph.perf.communication import check_system
        from fastgraph.perf.roofline import _check_precision

        if mode != "train":
            raise UserError("gpus: the gradient all-reduce is part of a training step; use mode 'train'")
        nodes = 1 if nodes is None else nodes
        check_system(hardware, gpus, nodes)
        gradient_precision = precision if gradient_precision is None else gradient_precision
        _check_precision(gradient_precision)
    if isinstance(model, nn.Module):
        gm, label = trace(model), f"{type(model).__name__} (nn.Module)"
    else:
        gm, label = trace(load_model(model, entry), model), str(Path(model).resolve())
    record = roofline_record(gm, hardware, precision, mode, batch_size, measured, input_shape)
    communication = None
    if gpus is not None:
        from fastgraph.perf.communication import communication_record

        communication = communication_record(gm, hardware, gpus=gpus, nodes=nodes, batch_size=batch_size,
                                             compute_seconds=record["step"]["roofline_seconds"],
                                             gradient_precision=gradient_precision)
    return Roofline(**record, model=label, communication=communication, hardware=hardware,
                    measured_device=measured.get("device") if measured else None,
                    measured_on_profile=measured_on_profile(hardware, measured) if measured else None)
