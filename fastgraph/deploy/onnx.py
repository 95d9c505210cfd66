"""ONNX export of an inference graph and ONNX Runtime sessions to run it.

The exporter is ``torch.onnx.export``: first the torch.export-based one (``dynamo=True``,
written by onnxscript), and, when it fails on a graph, the TorchScript-based one
(``dynamo=False``); the result says which was used and why the first failed. The batch
axis is dynamic unless a fixed batch is asked for. ``onnx.checker.check_model`` (with
shape inference) must accept the file. Optional packages (``onnx``, ``onnxruntime``,
``onnxscript``: extra ``export``) are imported inside the functions.

The dynamo exporter writes opset 18 and converts the model to the asked opset with
onnxscript's version converter: up (19 to the newest the installed onnx knows) works;
down to 17 fails on some operators (a Pad, a ReduceMean), and then the TorchScript
exporter, which writes opset 17 itself, is used. The file's opset is always the one asked.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fastgraph.core.errors import ModelError, UserError

INPUT_NAME, OUTPUT_NAME = "images", "logits"
MIN_OPSET = 17
EXPORT_EXAMPLE_BATCH = 4  # torch.export specialises a dynamic dimension seen at size 0 or 1


def require_package(package: str):
    """The imported ``package`` (onnx, onnxscript, onnxruntime); ``UserError`` naming the extra if missing."""
    try:
        return __import__(package)
    except ImportError:
        raise UserError(f"--format onnx needs the {package} package: "
                        "pip install 'fastgraph[export]'") from None


def check_opset(opset: int) -> None:
    """``UserError`` unless ``opset`` is between 17 and the newest the installed onnx knows."""
    onnx = require_package("onnx")
    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise UserError(f"--opset must be between {MIN_OPSET} and {newest} (the newest the installed "
                        f"onnx {onnx.__version__} knows), got {opset!r}")


class _Records(logging.Handler):
    """Keeps the log records of a logger instead of printing them (onnxscript's version
    converter logs a warning, with a traceback, when it cannot convert a model)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def reason(self) -> str:
        """The last error the records carry, one line, without the C++ assertion's location."""
        for record in reversed(self.records):
            if record.exc_info and record.exc_info[1] is not None:
                text = str(record.exc_info[1]).strip().splitlines()[0]
                return re.sub(r"^.*Assertion `.*` failed: ", "", text)[:200]
        return self.records[-1].getMessage().splitlines()[0][:200] if self.records else "no reason given"


class _OpsetNotWritten(Exception):
    """The dynamo exporter wrote a file of another opset than the one asked."""


def _opset_of(proto) -> int | None:
    return next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def _first_line(exc: BaseException) -> str:
    if isinstance(exc, _OpsetNotWritten):
        return str(exc)
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def export_onnx(module: nn.Module, path: str | Path, *, batch: int | None, opset: int = 18,
                image_shape: tuple[int, int, int] = (3, 32, 32), metadata: dict | None = None) -> dict:
    """Write ``module`` (eval mode, float32 input (N, *image_shape) -> logits (N, classes)) to ``path``.

    Args:
        module: the inference module, on the CPU; its input/output dtypes are kept.
        path: the ``.onnx`` file to write (an existing one is replaced).
        batch: a fixed batch size, or ``None`` for a dynamic batch axis named ``batch``.
        opset: ONNX opset, 17 to the newest the installed onnx knows; the file has exactly it.
        image_shape: (channels, height, width) of one input image; fixed in the file.
        metadata: key -> value stored in the model's ``metadata_props`` (a string as it is,
            anything else as JSON), for runtimes to read the input's shape and classes.

    Returns:
        ``{"exporter", "fallback_reason", "opset", "dynamic_batch", "bytes"}``.

    Raises:
        UserError: an opset out of range (see :func:`check_opset`), onnx/onnxscript missing,
            or a file of another opset than ``opset`` (removed).
        ModelError: both exporters failed (the dynamo one also when it cannot convert the
            model to ``opset``), or ``onnx.checker`` rejects the model.
    """
    check_opset(opset)
    onnx = require_package("onnx")
    require_package("onnxscript")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    example = torch.randn(batch or EXPORT_EXAMPLE_BATCH, *image_shape)
    first_error = None
    exporter = "torch.export (dynamo=True)"
    quiet = io.StringIO()
    # The exporter logs a warning per optional torchvision op it cannot register: not ours to show.
    torch_logger = logging.getLogger("torch.onnx")
    level = torch_logger.level
    torch_logger.setLevel(logging.ERROR)
    # The version converter's failures (a warning with a traceback) become the fallback reason.
    converter_logger, converter_log = logging.getLogger("onnxscript"), _Records()
    propagate = converter_logger.propagate
    converter_logger.addHandler(converter_log)
    converter_logger.propagate = False
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
            warnings.simplefilter("ignore")
            dynamic = None if batch else ({0: torch.export.Dim("batch", min=1)},)
            torch.onnx.export(module, (example,), str(path), dynamo=True, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_shapes=dynamic, verbose=False, external_data=False)
        written = _opset_of(onnx.load(str(path), load_external_data=False))
        if written != opset:
            raise _OpsetNotWritten(f"it wrote opset {written} and could not convert this model to opset "
                                   f"{opset}: {converter_log.reason()}")
    except Exception as exc:  # noqa: BLE001 - any failure sends us to the other exporter
        first_error = _first_line(exc)
        exporter = "TorchScript (dynamo=False)"
        axes = None if batch else {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
                warnings.simplefilter("ignore")
                torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset,
                                  input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                  dynamic_axes=axes)
        except Exception as exc2:  # noqa: BLE001
            raise ModelError(f"ONNX export failed: dynamo exporter: {first_error}; TorchScript exporter: "
                             f"{_first_line(exc2)}") from None
    finally:
        torch_logger.setLevel(level)
        converter_logger.removeHandler(converter_log)
        converter_logger.propagate = propagate
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # noqa: BLE001 - onnx raises its own ValidationError types
        raise ModelError(f"onnx.checker rejects {path}: {_first_line(exc)}") from None
    proto = onnx.load(str(path), load_external_data=False)
    if metadata:
        onnx.helper.set_model_props(proto, {k: v if isinstance(v, str) else json.dumps(v)
                                            for k, v in metadata.items()})
        onnx.save(proto, str(path))
    opset_used = _opset_of(proto)
    if opset_used != opset:  # never silently another opset than the one asked
        path.unlink(missing_ok=True)
        raise UserError(f"ONNX export wrote opset {opset_used}, not the --opset {opset} asked; "
                        "the exporter writes 18 and converts: try --opset 18")
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    return {"exporter": exporter, "fallback_reason": first_error, "opset": int(opset_used),
            "dynamic_batch": bool(dims and dims[0].dim_param), "bytes": path.stat().st_size,
            "operators": sorted({n.op_type for n in proto.graph.node})}


def providers(device: torch.device) -> list[str]:
    """ONNX Runtime execution providers for ``device``: CUDA when onnxruntime-gpu and a GPU
    are both present and ``device`` is CUDA, then the CPU provider (the fallback)."""
    ort = require_package("onnxruntime")
    available = ort.get_available_providers()
    if device.type == "cuda" and torch.cuda.is_available() and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def session(path: str | Path, device: torch.device):
    """An ``onnxruntime.InferenceSession`` of ``path`` on ``device``'s provider (see :func:`providers`)."""
    ort = require_package("onnxruntime")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: no per-node provider-assignment chatter
    return ort.InferenceSession(str(path), sess_options=options, providers=providers(device))


def run_session(sess, images: torch.Tensor, *, batch: int | None, chunk: int = 500) -> torch.Tensor:
    """Logits float32 (N, classes) of ``sess`` on float32 (N, 3, H, W) ``images`` (CPU tensors).

    A fixed-batch model (``batch`` given) runs on chunks of exactly ``batch`` images, the
    last one padded with copies of its first image and the padding's outputs dropped.
    """
    from fastgraph.deploy.batches import run_in_batches

    name = sess.get_inputs()[0].name

    def call(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(sess.run(None, {name: np.ascontiguousarray(x.numpy(), dtype=np.float32)})[0])

    return run_in_batches(call, images, batch=batch, chunk=chunk)
