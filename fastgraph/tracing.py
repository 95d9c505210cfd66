"""Trace a model into the ``torch.fx.GraphModule`` that flows through fastgraph.

``torch.fx.symbolic_trace`` runs ``forward`` on proxies; data-dependent Python control
flow (``if x.sum() > 0``), tensor-valued loop bounds or calls into untraceable code fail
there. When it fails, the error names the submodule and the source line in the user's
file that could not be traced, and says why, in one line.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn

from fastgraph.errors import ModelError

SOURCE_KEY = "fastgraph.source"


def _why(exc: Exception) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "control flow" in msg or "__bool__" in msg or "iterate" in msg.lower():
        return f"data-dependent control flow ({msg})"
    return f"{type(exc).__name__}: {msg}"


def _where(exc: Exception, model: nn.Module, source: Path | None) -> str:
    """'line N in Class.forward (module 'a.b')' for the innermost user frame of the failure."""
    names = {id(m): n for n, m in model.named_modules()}
    where = ""
    tb = exc.__traceback__
    while tb is not None:
        frame, code = tb.tb_frame, tb.tb_frame.f_code
        in_user_file = source is not None and Path(code.co_filename).resolve() == source
        this = frame.f_locals.get("self")
        if in_user_file or (source is None and isinstance(this, nn.Module) and id(this) in names):
            owner = f"{type(this).__name__}." if this is not None else ""
            where = f"line {tb.tb_lineno} in {owner}{code.co_name}"
            if isinstance(this, nn.Module) and id(this) in names:
                where += f" (module {names[id(this)] or '<root>'!r})"
        tb = tb.tb_next
    return where


def trace(model: nn.Module, source: str | Path | None = None) -> fx.GraphModule:
    """Symbolically trace ``model`` into a ``GraphModule``.

    Args:
        model: the user's module; it is not modified.
        source: the model file, used to point errors at a line in it.

    Returns:
        ``fx.GraphModule`` with ``gm.meta["fastgraph.source"]`` set to the source path.

    Raises:
        ModelError: one line naming the source line and submodule that could not be
            traced, and why (e.g. data-dependent control flow).
    """
    source_path = Path(source).expanduser().resolve() if source is not None else None
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:
        where = _where(exc, model, source_path)
        file = f"{source_path}" if source_path else type(model).__name__
        raise ModelError(f"cannot trace {file}{': ' + where if where else ''}: {_why(exc)}; "
                         "make the control flow static or keep that module out of the graph") from None
    gm.meta[SOURCE_KEY] = str(source_path) if source_path else None
    return gm


def check_runs(gm: nn.Module, example: torch.Tensor) -> None:
    """Run a copy of ``gm`` in eval mode, without gradients, on ``example`` (float (N, 3, H, W)).

    A model that cannot take the input (a ``Linear`` sized for other images, a channel
    mismatch) fails here in one line, before any pass, timing or export runs it.

    Raises:
        ModelError: the forward raised; the message gives the input shape and the
            exception's first line.
    """
    with torch.inference_mode(False), torch.no_grad():
        try:
            copy.deepcopy(gm).eval()(example.detach())
        except Exception as exc:  # noqa: BLE001 - any failure is the model's, reported as such
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ModelError(f"the model fails on an input of shape {tuple(example.shape)}: "
                             f"{type(exc).__name__}: {first}") from None
