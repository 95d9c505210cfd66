"""Trace a model into the ``torch.fx.GraphModule`` that flows through fastgraph.

``torch.fx.symbolic_trace`` runs ``forward`` on proxies; data-dependent Python control
flow (``if x.sum() > 0``), tensor-valued loop bounds or calls into untraceable code fail
there. When it fails, the error names the submodule and the source line in the user's
file that could not be traced, and says why, in one line.

Tracing can also succeed and still change the function: an ``if self.training:`` branch
is frozen at the mode traced in, a ``torch.no_grad()`` block and a custom
``autograd.Function`` become ordinary ops, a ``train()`` override is bypassed. The trace
is made in the mode of use, and :func:`check_trace` compares it with the user's eager
module in float64 and refuses, naming the construct and its line, what it cannot keep.
fastgraph keeps ``symbolic_trace`` as its front-end rather than ``torch.export``: its
passes match the module calls ``symbolic_trace`` keeps (``nn.BatchNorm2d``, ``nn.ReLU``
with their parameters and names), which a functionalised ATen graph dissolves; the
eager-model check gives the same guarantee for what it cannot keep.
"""

from __future__ import annotations

import ast
import copy
import inspect
import sys
import textwrap
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn

from fastgraph.core.errors import ModelError

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


def trace(model: nn.Module, source: str | Path | None = None, mode: str | None = None) -> fx.GraphModule:
    """Symbolically trace ``model`` into a ``GraphModule``.

    Args:
        model: the user's module; it is not modified.
        source: the model file, used to point errors at a line in it.
        mode: "train" or "infer": trace a copy put in that mode by the model's own
            ``train()``, so ``self.training`` branches take the mode of use; None traces
            the model in the mode it is in.

    Returns:
        ``fx.GraphModule`` with ``gm.meta["fastgraph.source"]`` set to the source path.

    Raises:
        ModelError: one line naming the source line and submodule that could not be
            traced, and why (e.g. data-dependent control flow).
    """
    source_path = Path(source).expanduser().resolve() if source is not None else None
    if mode is not None:
        try:
            model = copy.deepcopy(model).train(mode == "train")
        except RuntimeError as exc:  # torch.nn.utils.weight_norm's weight is computed: no deepcopy
            file = f"{source_path}" if source_path else type(model).__name__
            raise ModelError(f"cannot copy the model of {file}: {str(exc).split('.')[0]} (the old "
                             "torch.nn.utils.weight_norm makes such a weight; use "
                             "torch.nn.utils.parametrizations.weight_norm)") from None
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


# ------------------------------------------------------------------ the trace against the model


def _source_of(cls: type) -> tuple[ast.AST, str, int] | None:
    """(parsed class body, file, first line) of a user class, or None (built-ins, no source)."""
    if cls.__module__.startswith("torch."):
        return None
    try:
        lines, first = inspect.getsourcelines(cls)
        file = inspect.getsourcefile(cls) or "?"
    except (OSError, TypeError):
        return None
    return ast.parse(textwrap.dedent("".join(lines))), file, first


def _autograd_functions(model: nn.Module) -> set[str]:
    """Names of ``torch.autograd.Function`` subclasses visible from the model's modules."""
    names = set()
    for m in model.modules():
        namespace = sys.modules.get(type(m).__module__)
        for name, value in vars(namespace).items() if namespace else ():
            if isinstance(value, type) and issubclass(value, torch.autograd.Function):
                names.add(name)
    return names


def untraceable_constructs(model: nn.Module) -> list[str]:
    """Constructs in the model's own classes that ``torch.fx.symbolic_trace`` cannot keep,
    each as ``"<what> at <file>:<line> (<Class>)"``, in source order.

    What tracing loses: an ``if self.training:`` branch (frozen at the mode traced in), a
    ``torch.no_grad()``/``enable_grad``/``set_grad_enabled``/``inference_mode`` block (its
    ops are recorded as ordinary ones), a custom ``torch.autograd.Function`` (traced
    through: its backward rule is lost), a ``train()`` override (a GraphModule's ``train``
    is nn.Module's), and ``.data`` (reads and writes outside autograd).
    """
    found, seen_classes = [], set()
    functions = _autograd_functions(model)
    grad_modes = {"no_grad", "enable_grad", "set_grad_enabled", "inference_mode"}
    for m in model.modules():
        cls = type(m)
        if cls in seen_classes:
            continue
        seen_classes.add(cls)
        parsed = _source_of(cls)
        if parsed is None:
            continue
        tree, file, first = parsed

        def at(node, file=file, first=first, name=cls.__name__):
            return (file, first + node.lineno - 1), f"{file}:{first + node.lineno - 1} ({name})"

        def add(what, node):
            where, text = at(node)
            found.append((where, f"{what} at {text}"))

        methods = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
        for n in methods:
            if n.name == "train":
                add("a train() override", n)
        # What runs at construction (initialisation under no_grad, .data copies) is not traced.
        traced = [n for n in methods
                  if n.name != "train" and not n.name.lstrip("_").startswith(("init", "reset"))]
        for node in (inner for method in traced for inner in ast.walk(method)):
            what = None
            if isinstance(node, ast.Attribute) and node.attr == "training" and _is_name(node.value, "self"):
                what = "a self.training branch"
            elif isinstance(node, ast.Attribute) and node.attr == "data":
                what = "a .data access"
            elif isinstance(node, ast.withitem) and _called(node.context_expr) in grad_modes:
                what = f"a torch.{_called(node.context_expr)}() block"
                node = node.context_expr
            elif (isinstance(node, ast.Call) and _called(node) == "apply"
                  and isinstance(node.func.value, ast.Name) and node.func.value.id in functions):
                what = f"a custom autograd.Function {node.func.value.id}.apply"
            if what is not None:
                add(what, node)
    return list(dict.fromkeys(text for _, text in sorted(found, key=lambda f: f[0])))


def _is_name(node: ast.AST, name: str) -> bool:
    return isinstance(node, ast.Name) and node.id == name


def _called(node: ast.AST) -> str | None:
    """The name a call calls: ``torch.no_grad()`` -> "no_grad", ``no_grad()`` -> "no_grad"."""
    func = getattr(node, "func", None)
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None


def check_trace(model: nn.Module, gm: fx.GraphModule, mode: str, batch) -> None:
    """Refuse a trace that does not compute what the user's model computes in ``mode``.

    The user's eager module (a copy, put in ``mode`` by its own ``train()``, overrides
    included) and a copy of the trace are compared in float64 by
    :func:`fastgraph.core.verification.verify`: outputs on a real and a stress batch, and in
    train mode the gradients of the input and every parameter (one present in one and
    absent in the other is a mismatch), buffers and the outputs after one SGD step. Every
    later check compares against the trace, so this one makes the user's model the
    reference of them all.

    Args:
        model: the user's module (not modified).
        gm: its trace (not modified).
        mode: "train" or "infer", the mode the graph will be used in.
        batch: (x float (N, C, H, W), labels int64 (N,) or None).

    Raises:
        ModelError: one line: the measured difference and the constructs found in the
            model's classes that tracing cannot keep, with their file and line.
    """
    from fastgraph.core.verification import verify

    eager = copy.deepcopy(model).train(mode == "train")
    traced = copy.deepcopy(gm).train(mode == "train")
    check = verify(eager, traced, mode, batch)
    if check.ok:
        return
    constructs = untraceable_constructs(model)
    what = ("; ".join(constructs[:3]) + (f" and {len(constructs) - 3} more" if len(constructs) > 3 else "")
            if constructs else "no construct fastgraph knows of explains it")
    raise ModelError(f"the traced graph does not compute what the model computes in {mode} mode "
                     f"({check.worst}): {what}; torch.fx cannot keep it, so fastgraph will not rewrite "
                     "this model as it is")


def traced_model(path: str | Path, entry: str | None = None):
    """The model file at ``path`` loaded, built and traced: the ``fx.GraphModule``.

    Commands call it before they look for data, which may be absent or slow to decode,
    so that a wrong model file is the error reported (a ResNet loads and traces in well
    under a second).

    Raises:
        ModelError: see :func:`fastgraph.core.loading.load_model` and :func:`fastgraph.core.tracing.trace`.
    """
    from fastgraph.core.loading import load_model
    from fastgraph.core.tracing import trace

    return trace(load_model(path, entry), path)
