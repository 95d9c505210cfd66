"""The optimize report: :class:`OptimizeReport` for Python, the dict it writes as JSON for
machines, and the tables people read (passes, roofline, where the module went).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from fastgraph.core.console import fitting_table, seconds, si
from fastgraph.core.outputs import report_header
from fastgraph.perf.record import report_text


def _arrow(before, after, fmt) -> str:
    if before == after:
        return fmt(before)
    return f"{fmt(before)} → {fmt(after)}"


def pass_table(passes: list[dict], mode: str) -> Table:
    """One row per pass: status, rewrites, exactness, verified difference, FLOPs and bytes per image.

    "rel diff" is the largest difference of any output, buffer or gradient relative to
    that tensor's own scale; its tolerance goes in the title when every checked pass
    shares one (the usual case), else in a column of its own.
    """
    styles = {"applied": "green", "refused": "red", "no-op": "dim"}
    tolerances = {p["tolerance"] for p in passes if p["max_output_diff"] is not None}
    one_tol = len(tolerances) <= 1
    rows = []
    for p in passes:
        diff = tol = "-"
        if p["max_output_diff"] is not None:
            diff = f"{max(p['max_output_diff'], p['max_grad_diff'] or 0.0):.2g}"
            tol = f"{p['tolerance']:.1g}"
        # Styled text rather than markup, whose tags would count in the column's minimum width.
        rows.append([p["name"], p["exactness"], Text(p["status"], style=styles.get(p["status"], "")),
                     str(p["rewrites"]), diff, *([] if one_tol else [tol]),
                     _arrow(p["flops_before"], p["flops_after"], si),
                     _arrow(p["bytes_before"], p["bytes_after"], lambda v: si(v, "B"))])
    columns = {"pass": "left", "kind": "left", "status": "left", "rewrites": "right", "rel diff": "right",
               **({} if one_tol else {"tol": "right"}), "FLOPs": "right", "bytes": "right"}
    checked = f", tolerance {next(iter(tolerances)):.1g}" if one_tol and tolerances else ""
    title = (f"Passes ({mode} mode), checked in float64 on real CIFAR-10 (training-time ones in their "
             f"identity configuration); differences relative to each tensor's scale{checked}; "
             "forward FLOPs and bytes per image, bytes at the model's own dtypes")
    return fitting_table(title, columns, rows)


def _roof_step(row: dict, images_per_step: int) -> float:
    """Seconds of one step of ``images_per_step`` images on the roofline: the run's roofline
    time (``row["images"]`` images, parameter reads amortised over batches of
    ``row["batch_size"]``) per image, times the images of the step.

    ``images_per_step`` is the measured step's batch, which the roofline's own batch (512
    unless one was given) need not equal: the column stands beside the measured step.
    """
    return row["roofline_seconds"] * images_per_step / row["images"]


def _time(value: float) -> str:
    """Seconds as :func:`seconds` writes them, in µs below a millisecond (a step on a roofline)."""
    return f"{value * 1e6:.3g} µs" if value < 1e-3 else seconds(value)


def roofline_table(result: dict) -> Table:
    """Roofline of the run on the profile, per step, beside the step measured on this device,
    before and after; the whole run's roofline time goes in the title."""
    rows = result["roofline"]
    per_step = all("images" in r and "batch_size" in r for r in rows)  # older reports lack them
    if result["mode"] == "train":
        step, run = "training step", f"training, {result['epochs']} epochs"
    else:
        step, run = "inference batch", "inference, test set"
    if per_step:
        runs = ", ".join(f"{seconds(r['roofline_seconds'])} {r['graph']}" for r in rows)
        amortised = {r["batch_size"] for r in rows} - {result["batch_size"]}
        reads = (f"; parameter reads amortised over {', '.join(map(str, sorted(amortised)))} images"
                 if amortised else "")
        what = (f"roof step: one {step} of {result['batch_size']} images on the roofline "
                f"(the whole run, {run}, {rows[0]['images']:,.0f} images: {runs}{reads})")
    else:
        what = f"roof time: the whole run ({run}) on the roofline, not one step"
    title = (f"Roofline on {result['profile']} at {result['precision']}; step measured on "
             f"{result['device']}, batch {result['batch_size']}; FLOPs and bytes per image, "
             f"bytes at {result['precision']}; {what}")
    columns = {"graph": "left", "FLOPs": "right", "bytes": "right", "FLOP/B": "right",
               "roof step" if per_step else "roof time": "right", "bound": "left", "step": "right",
               "img/s": "right", "FLOP/s": "right"}
    cells = [[r["graph"], si(r["step_flops_per_image"]), si(r["step_bytes_per_image"], "B"),
              f"{r['arithmetic_intensity']:.3g}",
              _time(_roof_step(r, result["batch_size"])) if per_step else seconds(r["roofline_seconds"]),
              r["bound"],
              seconds(r["measured_step_seconds"]), f"{r['measured_images_per_second']:.4g}",
              si(r["measured_flops_per_second"])] for r in rows]
    return fitting_table(title, columns, cells)


def unbroken(text: str) -> Text:
    """A line never wrapped nor folded (print it with ``crop=False``): a path, or an error
    message quoted to be searched for, stays whole so it can be copied."""
    return Text(text, no_wrap=True, overflow="ignore")


def optimize_view(result: dict) -> Group:
    """The optimize report of a JSON-ready ``result`` (:meth:`OptimizeReport.to_dict`, or
    a ``--json`` file read back) as one rich renderable: the input line, the pass table,
    each pass's message, the roofline table, the measured speed-up and where the files went.

    Print it with ``console.print(view, crop=False)`` so that paths are never cut.
    """
    parts = []
    if result.get("input"):  # said before the tables: checks on synthetic data say nothing about real images
        shape = "x".join(map(str, result["input"]["shape"]))
        parts.append(Text(f"Input {shape}: {result['input']['data']}"))
    parts.append(pass_table(result["passes"], result["mode"]))
    parts += [unbroken(f"  {p['name']}: {p['message']}") for p in result["passes"]
              if p["message"] and p["status"] != "no-op"]
    parts.append(roofline_table(result))
    if len(result["roofline"]) == 2:
        before, after = result["roofline"]
        timing = result.get("measured_step")
        if timing is None:  # a report written before step times carried their spread
            timing = {"text": f"{before['measured_step_seconds'] / after['measured_step_seconds']:.3f}x"}
        parts.append(Text(f"Measured step: {timing['text']} ({result['roofline'][0]['timing_method']})"))
    written = [("Optimised module", result.get("optimized_module")),
               ("Generated code", result.get("emitted_code"))]
    parts += [unbroken(f"{what} written to {path}") for what, path in written if path]
    return Group(*parts)


def print_optimize_report(result: dict, console: Console | None = None) -> None:
    """Print :func:`optimize_view` of ``result`` (a ``--json`` record or :meth:`OptimizeReport.to_dict`).

    ``console`` defaults to stdout at the terminal's width (80 columns when not a terminal).
    """
    (console or Console()).print(optimize_view(result), crop=False)


@dataclass
class OptimizeReport:
    """What :func:`fastgraph.optimize` did, as ``fastgraph optimize --json`` writes it.

    Attributes:
        model: the model file's absolute path, or ``"<Class> (nn.Module)"`` for a module.
        device: where the steps were measured (``"cpu"`` or the GPU's name). torch: its version.
        batch_size: images per measured step.
        input: ``{"shape": [C, H, W], "data": what the checks ran on}``.
        verify_images: real images each exact pass was checked on (float64).
        profile, precision: the hardware profile and precision of the roofline.
        epochs: training epochs of 50,000 images in the training roofline.
        mode: ``"train"`` or ``"infer"``.
        passes: one dict per pass, in order (``fastgraph.core.pass_manager.PassOutcome``):
            ``name``, ``status`` (applied, refused, no-op), ``rewrites``, ``exactness``,
            ``max_output_diff``/``max_grad_diff`` (relative to each tensor's scale) and
            ``tolerance``, ``flops_before/after`` (forward FLOPs per image),
            ``bytes_before/after`` (bytes per image), ``message``.
        roofline: two rows, ``graph`` "before" and "after": the roofline of the run
            (``fastgraph.perf.roofline.estimate``: FLOPs and bytes per image, seconds) and
            the step measured on ``device`` (``measured_step_seconds`` median, every
            sample in ``measured_step_samples``, images/s, FLOP/s, ``timing_method``).
        measured_step: before against after with their spread
            (``fastgraph.core.timing.compare_step_times``: speedup, verdict "n too small to
            tell", "within noise", "faster" or "slower").
        optimized_module, emitted_code: absolute paths written (None when not asked for).
        header: schema, fastgraph and torch versions, commit, date
            (``fastgraph.core.outputs.report_header``), taken when the report was made.
    """

    model: str
    device: str
    torch: str
    batch_size: int
    input: dict
    verify_images: int
    profile: str
    precision: str
    epochs: float
    mode: str
    passes: list[dict]
    roofline: list[dict]
    measured_step: dict
    optimized_module: str | None = None
    emitted_code: str | None = None
    header: dict = field(default_factory=report_header, repr=False)

    @property
    def applied(self) -> list[str]:
        """Names of the passes applied, in order."""
        return [p["name"] for p in self.passes if p["status"] == "applied"]

    def to_dict(self) -> dict:
        """Exactly the JSON ``fastgraph optimize --json`` writes: the header, then every field
        (``emitted_code`` only when code was written)."""
        body = {k: v for k, v in asdict(self).items() if k != "header"}
        if body["emitted_code"] is None:
            del body["emitted_code"]
        return {**self.header, **body}

    def __rich__(self) -> Group:
        """The tables ``fastgraph optimize`` prints (see :func:`optimize_view`)."""
        return optimize_view(self.to_dict())

    __str__ = report_text
