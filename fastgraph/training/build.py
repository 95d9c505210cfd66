"""The module a run trains: the user's model built (from its file, or from a factory
function), traced in train mode, rewritten by the recipe's passes, and compiled.

Timing (see ``fastgraph.training.loop``): building, loading and tracing the model are not
counted; nor are the pass manager's float64 checks of the recipe's passes (exact passes;
training-time passes in their identity configurations), which depend on the graph and
not on the run's seed, so they run once per training. The passes themselves are counted:
they hold the whitening initialisation from data. With compile, the first run's compiled
module serves the later runs (their fresh weights are loaded into it), so compilation
happens once.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import traceback
import weakref
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn

from fastgraph.core.errors import ModelError, UserError
from fastgraph.core.timing import Timer
from fastgraph.training.batches import DeviceData, pass_images
from fastgraph.training.evaluation import check_trainable
from fastgraph.training.options import TrainOptions
from fastgraph.training.streaming import StreamedData


def _factory_name(factory) -> str:
    """``module.qualname`` of a model factory (a function, a class, or a callable object's class)."""
    named = factory if hasattr(factory, "__qualname__") else type(factory)
    return f"{getattr(named, '__module__', None) or '?'}.{named.__qualname__}"


def model_name(opts: TrainOptions) -> str:
    """What the settings record as "model": the model file's resolved path, or the
    qualified name (``module.qualname``) of the ``opts.model`` factory."""
    if opts.model is not None:
        return _factory_name(opts.model)
    return str(Path(opts.model_path).expanduser().resolve())


def check_model_source(opts: TrainOptions) -> None:
    """Raise ``UserError`` unless exactly one of ``opts.model_path`` and ``opts.model``
    (a callable; no ``entry`` with it) says what to train."""
    if (opts.model_path is None) == (opts.model is None):
        given = "both" if opts.model is not None else "neither"
        raise UserError("give the model to train as a file (model_path) or as a function that builds "
                        f"it (model), exactly one of them; got {given}")
    if opts.model is not None:
        if not callable(opts.model):
            raise UserError("model must be a function returning an nn.Module, got "
                            f"{type(opts.model).__name__}")
        if opts.entry is not None:
            raise UserError("entry names the entry point of a model file; with a model function "
                            "there is no file: drop entry")


# Every module a model factory returned, while it is alive (weak: a module the trainer has
# dropped cannot come back, and its id may be reused).
_RETURNED: weakref.WeakSet = weakref.WeakSet()


def user_model(opts: TrainOptions, num_classes: int | None = None) -> nn.Module:
    """A freshly built ``nn.Module``: the model file's (see ``fastgraph.core.loading``)
    or what ``opts.model()`` returns, initialised from torch's current random state; an
    entry or factory with a ``num_classes`` parameter gets ``num_classes`` (the data's).

    Raises:
        ModelError: the file cannot be loaded or built, the factory raises (its exception
            and the line of its file, in one line) or returns something other than an
            ``nn.Module``.
        UserError: the factory returns a module it returned before: every run, and the
            check before them, needs its own module initialised from its own seed.
    """
    if opts.model is None:
        from fastgraph.core.loading import load_model

        return load_model(opts.model_path, opts.entry, num_classes)
    from fastgraph.core.loading import takes_num_classes

    label = f"{_factory_name(opts.model)}()"
    given = {"num_classes": num_classes} if num_classes and takes_num_classes(opts.model) else {}
    try:
        model = opts.model(**given)
    except UserError:
        raise
    except Exception as exc:  # the user's own code failed: one line, where it failed
        raise ModelError(f"the model function {label} raised{_line_in(exc, opts.model)}: "
                         f"{type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"{label} returned {type(model).__name__}, not an nn.Module")
    if model in _RETURNED:
        raise UserError(f"the model function {label} returned a module it returned before: "
                        "build a new one on every call (each run starts from its own seed)")
    _RETURNED.add(model)
    return model


def _line_in(exc: BaseException, factory) -> str:
    """' (FILE line N)': the deepest frame of ``exc``'s traceback in ``factory``'s source
    file, or '' when none is (a builtin, or a factory defined interactively)."""
    named = factory if inspect.isroutine(factory) or inspect.isclass(factory) else type(factory)
    try:
        source = inspect.getsourcefile(named)
    except TypeError:
        return ""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == source]
    return f" ({os.path.basename(source)} line {frames[-1].lineno})" if frames else ""


def check_model(opts: TrainOptions) -> str:
    """Build and trace the model once, so that a wrong model file or factory is the error
    reported before the data is looked for (it may be absent, or take seconds to decode).

    Returns:
        SHA-1 (hex) of the traced graph as printed: its modules with their settings (kernel
        sizes, strides, CELU's alpha...) and its code, not the weights. A checkpoint records
        it, so a resume after the model file was edited is refused; comments and
        formatting do not change it.

    Raises:
        ModelError: see :func:`user_model` and :func:`fastgraph.core.tracing.trace`; the
            model has no trainable parameters (nothing to train).
    """
    from fastgraph.core.tracing import trace
    model = user_model(opts)
    check_trainable(model, model_name(opts), "fastgraph train has nothing to learn")
    return hashlib.sha1(str(trace(model, opts.model_path)).encode()).hexdigest()


class ModelBuilder:
    """Builds each run's training module; holds what runs share: the compiled module and
    whether the passes were checked.

    Args:
        opts: the training's options (model source, entry, stochastic depth, fused kernels,
            compile backend).
        device: where the module lives.
        channels_last: convert the module to the channels-last memory format.
        compile: ``torch.compile`` the module, with ``opts.compile_backend`` and
            ``compile_mode`` ("default" is torch.compile's own).

    Raises:
        UserError: see :func:`check_model_source`.
    """

    def __init__(self, opts: TrainOptions, device: torch.device, *, channels_last: bool, compile: bool,
                 compile_mode: str = "default"):
        check_model_source(opts)
        self.opts, self.recipe, self.device = opts, opts.recipe, device
        self.channels_last, self.compile, self.compile_mode = channels_last, compile, compile_mode
        self._compiled: tuple[fx.GraphModule, nn.Module] | None = None
        self._passes_checked = False

    def build(self, timer: Timer, data: DeviceData | StreamedData) -> tuple[fx.GraphModule, dict]:
        """Build, trace and rewrite the model from torch's current random state (the run's
        seed): (train-mode GraphModule on the device, the pass report), timed in ``timer``'s
        phases "model build", "pass checks" (the first build only) and "passes".

        Raises:
            ModelError: the model cannot be built or traced, runs on no CIFAR-10 batch,
                or its trace computes something else than the model.
            UserError: a recipe pass refuses the graph.
        """
        from fastgraph.core.pass_manager import verification_batch
        from fastgraph.core.tracing import check_runs, check_trace, trace
        from fastgraph.training.trained import training_graph

        with timer.phase("model build", counted=False):
            model = user_model(self.opts, len(data.classes) or None).to(self.device)
            gm = trace(model, source=self.opts.model_path, mode="train")
            images, labels = pass_images(data, (p.options for p in self.recipe.passes))
            check_runs(gm, images[:2])
        if not self._passes_checked:
            # With the random state put back, so the counted build below is the same.
            with timer.phase("pass checks", counted=False), torch.random.fork_rng(
                    devices=[self.device] if self.device.type == "cuda" else []):
                # the user's eager model is the reference of every check
                check_trace(model, gm, "train", verification_batch(images, labels))
                training_graph(gm, self.recipe.to_dict(), images=images, labels=labels,
                               stochastic_depth=self.opts.stochastic_depth,
                               fused_kernels=self.opts.fused_kernels)
            self._passes_checked = True
        with timer.phase("passes"):  # counted: holds the whitening initialisation from data
            gm, report = training_graph(gm, self.recipe.to_dict(), images=images, labels=labels,
                                        stochastic_depth=self.opts.stochastic_depth, checks=False,
                                        fused_kernels=self.opts.fused_kernels)
        if self.channels_last:
            gm = gm.to(memory_format=torch.channels_last)
        gm.train()
        return gm, report

    def training_module(self, gm: fx.GraphModule) -> tuple[fx.GraphModule, nn.Module]:
        """(module whose parameters train, module to call): ``gm`` itself, or with compile
        ``gm`` and its ``torch.compile`` wrapper; a later run with the same state keys
        gets the first run's compiled pair with ``gm``'s weights, ``requires_grad`` flags
        and meta loaded into it."""
        if not self.compile:
            return gm, gm
        if self._compiled is not None:
            module, compiled = self._compiled
            if module.state_dict().keys() == gm.state_dict().keys():
                module.load_state_dict(gm.state_dict())
                for p, q in zip(module.parameters(), gm.parameters(), strict=True):
                    p.requires_grad_(q.requires_grad)
                module.meta.update(gm.meta)
                return module, compiled
        compiled = self.compiled(gm)
        self._compiled = (gm, compiled)
        return gm, compiled

    def compiled(self, module: nn.Module) -> nn.Module:
        """``torch.compile(module)`` with the training's backend and mode."""
        mode = {} if self.compile_mode == "default" else {"mode": self.compile_mode}
        return torch.compile(module, backend=self.opts.compile_backend, **mode)
