"""fastgraph: compile a ResNet as a torch.fx graph and make it train and infer fast.

The one object that flows through fastgraph is a ``torch.fx.GraphModule``: passes
(``fastgraph.passes``), training, export, profiling and the roofline all take one.

The Python API, on which the ``fastgraph`` command line is built (each function's
docstring gives its arguments, units and errors; bad input raises
``fastgraph.core.errors.UserError``):

- :func:`optimize` ``(model, *, mode, passes, ...) -> (GraphModule, OptimizeReport)``:
  trace, rewrite with verified passes, roofline and measured steps (``fastgraph optimize``).
- :func:`train` ``(model, recipe, data, runs, **options) -> TrainResult``: train on
  CIFAR-10 with a recipe (``fastgraph train``).
- :func:`export` ``(model, path, *, tta, format, ...) -> ExportReport``: ONNX or
  TensorRT engine with TTA in the graph, verified on the test set (``fastgraph export``).
- :func:`roofline` ``(model, *, profile, precision, mode, batch_size, measured, gpus, nodes)
  -> Roofline``: every graph node on a GPU's roofline, and with ``gpus`` the data-parallel
  gradient all-reduce and scaling efficiency (``fastgraph roofline``).
- :func:`profile` ``(model, *, recipe, steps, ...) -> ProfileReport``: measured time per
  graph node under torch.profiler (``fastgraph profile``).
- :func:`advise` ``(model, *, mode, profile, precision, ...) -> Advice``: which tricks
  apply to the model, where, and their predicted gain (``fastgraph advise``).

``torch.compile(model, backend="fastgraph")`` (registered through the
``torch_dynamo_backends`` entry point, ``fastgraph.compiler.backend``) applies the exact
passes to the graph Dynamo captures, verified, then hands it to Inductor.

``model`` is an ``nn.Module`` or the path of a plain PyTorch model file (loaded with
``fastgraph.core.loading.load_model``; ``entry=`` names its entry point). Reports are
dataclasses: ``.to_dict()`` is the JSON the command writes with ``--json``, and
``print(report)`` or ``rich.print(report)`` shows the tables the command prints.

``import fastgraph`` stays light: each function's module is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from fastgraph.core.version import __version__

# public name -> (module, attribute): imported when first looked up (PEP 562)
_API = {
    "optimize": ("fastgraph.compiler.optimize", "optimize"),
    "train": ("fastgraph.api", "train"),
    "export": ("fastgraph.deploy.pipeline", "export"),
    "roofline": ("fastgraph.perf.record", "roofline"),
    "profile": ("fastgraph.perf.profile", "profile"),
    "advise": ("fastgraph.compiler.advise", "advise"),
}

__all__ = ["__version__", "optimize", "train", "export", "roofline", "profile", "advise"]

if TYPE_CHECKING:
    from fastgraph.api import train
    from fastgraph.compiler.advise import advise
    from fastgraph.compiler.optimize import optimize
    from fastgraph.deploy.pipeline import export
    from fastgraph.perf.profile import profile
    from fastgraph.perf.record import roofline


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'fastgraph' has no attribute {name!r}")
    module, attribute = _API[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
