"""``torch.compile(model, backend="fastgraph")``: fastgraph's exact passes on the graph Dynamo
captures, checked in float64 as ``fastgraph optimize`` checks them, then Inductor.

Registered through the ``torch_dynamo_backends`` entry point (``pyproject.toml``)::

    compiled = torch.compile(model, backend="fastgraph")
    compiled = torch.compile(model, backend="fastgraph",
                             options={"mode": "infer", "passes": ["fold_bn"], "backend": "inductor"})

Options: ``mode`` ("train" or "infer": which passes may run; default "train" when the graph
holds a training-mode batch norm, else "infer"), ``passes`` (names or a comma-separated
string; default the exact passes ``fastgraph optimize`` runs for the mode),
``backend`` (the inner backend the rewritten graph goes to, default "inductor"; "eager" or
"aot_eager" for quick runs). torch.compile's own ``mode`` ("max-autotune"...), which it
accepts only without ``options``, is passed on to Inductor as its config. What the backend
did with every graph is in :data:`stats` (``stats.rewrites``, ``stats.refused``: counters
per pass; ``stats.graphs``: one :class:`GraphOutcome` per graph).

What Dynamo hands a backend here (torch 2.13, printed from a custom backend on
``examples/resnet9.py``):

- Modules are inlined (``inline_inbuilt_nn_modules`` is always on): no ``call_module``
  node. Every parameter and buffer is a placeholder, marked by Dynamo as a static input
  (``tensor_dict["_dynamo_static_input_type"]``); the image batch is another placeholder.
- Conv is ``torch.conv2d(x, weight, None, stride, padding, dilation, groups)``; ReLU is
  ``F.relu(x, inplace=True)``; pools are ``F.max_pool2d`` / ``F.adaptive_max_pool2d``.
- BatchNorm is ``F.batch_norm(x, running_mean, running_var, weight, bias, training,
  momentum, eps)``: ``training=False`` in eval mode; ``training=True`` in train mode, with
  a separate ``num_batches_tracked.add_(1)`` node. Under dynamic shapes ``momentum`` and
  ``eps`` are 0-d tensor inputs read with ``.item()``, and sizes are SymInt inputs.
- The example inputs are the real tensors of the call (the model's own parameters and
  buffers, the user's batch); SymInt inputs carry their real value as a hint. The fake
  tensors are in each node's ``meta["example_value"]``.

Which passes make sense on that graph (the passes match both forms through
``fastgraph.passes._fx``'s ``conv2d_call`` / ``batch_norm_call`` and the activation and
pool predicates):

- ``pool_before_activation`` (train and infer) is a pure reordering of two function calls
  whose arguments are all in the graph: valid as it is on the functional graph.
- ``fold_bn`` (infer): the conv weight and the BN statistics are graph inputs whose values
  Dynamo does not guard on (an optimizer step or ``load_state_dict`` changes them without
  a recompile), so a fold computed once at compile time could go stale. The fold is
  computed in the graph from those inputs on every call, in float64 and cast once: exact
  for any values, gradients included, and cheap (a few elementwise ops over the conv
  weight, against a convolution over the batch; Inductor fuses them).
- ``fuse_bn_activation`` and ``nvtx_ranges`` rewrite module calls, of which the graph has
  none; Inductor fuses BN and activation by itself, and ranges are skipped while compiling.
- Training-time passes (``pool_before_bn``, ghost BN, whitening...) change the function;
  a compiled model must compute what the eager model computes (Dynamo runs parts eagerly
  at graph breaks), so they are refused here: train with them through ``fastgraph train``.

The check, as ``fastgraph optimize`` does it: the graph is lint-checked after every pass,
every node the pass did not declare rewritten must survive, and
:func:`fastgraph.core.verification.verify` compares, in float64, the captured graph run
eagerly with the rewritten one: the outputs on the batch and on a stress batch, the
buffers, and, whenever gradients can flow through the graph (grad mode on and an input
that requires grad: Dynamo guards on both, so the graph never runs otherwise), the
gradients of the batch and of every parameter and the outputs after one SGD step,
whatever the mode (an eval-mode model may be differentiated too). A pass that differs
beyond tolerance, fails to run or drops a node is refused: the graph before it goes on.

For the check the graph becomes a module of one input, the batch: every other input is
held by the module (inputs that require grad as parameters, the rest as buffers) or read
from the batch's shape (a dynamic size). It runs at compile time on real values, since
Dynamo's example inputs are real here (a lazy check at the first call would have to
compile inside it); fake ones, from other capture paths, are replaced by seeded random
tensors of the same shapes and dtypes, and the outcome says so. A batch of more than
:data:`VERIFY_IMAGES` images is checked on that many of them, spread over it, when the
captured graph runs on the smaller batch (one that fixed the batch size in a reshape
does not). Eval-mode batch norms are checked with random statistics and affine
parameters in place of the model's own, as ``optimize`` checks on a calibrated twin: a
fresh BN's mean 0 and variance 1 make a fold that forgets them look right. Neither
changes the model or the compiled graph, which reads the model's own tensors.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from fastgraph import passes as registry
from fastgraph.compiler.optimize import DEFAULT_PASSES
from fastgraph.core.errors import UserError
from fastgraph.core.pass_manager import PassOutcome, PassReport, lost_nodes
from fastgraph.core.verification import (
    SEED,
    VERIFY_IMAGES,
    ModelFailed,
    observe,
    spread_indices,
    stress_batch,
    verify,
)
from fastgraph.passes._fx import batch_norm_call

log = logging.getLogger(__name__)

OPTIONS = ("mode", "passes", "backend")
DEFAULT_BACKEND = "inductor"


@dataclass
class GraphOutcome:
    """What the backend did with one graph Dynamo handed it.

    ``report`` holds one outcome per pass (applied, refused or no-op, its rewrites and the
    measured float64 difference); ``note`` says why no pass ran, when none did, and on
    what inputs the checks ran otherwise.
    """

    mode: str
    backend: str
    report: PassReport
    note: str = ""


@dataclass
class BackendStats:
    """Every graph the backend compiled since the last :meth:`reset`, in order."""

    graphs: list[GraphOutcome] = field(default_factory=list)

    @property
    def rewrites(self) -> Counter:
        """Rewrites applied per pass name, over all graphs."""
        counts = Counter()
        for graph in self.graphs:
            for outcome in graph.report.outcomes:
                if outcome.status == "applied":
                    counts[outcome.name] += outcome.rewrites
        return counts

    @property
    def refused(self) -> Counter:
        """Graphs on which each pass was refused, per pass name."""
        return Counter(o.name for g in self.graphs for o in g.report.outcomes if o.status == "refused")

    def reset(self) -> None:
        """Forget every graph recorded so far."""
        self.graphs.clear()


stats = BackendStats()


def fastgraph_backend(gm: fx.GraphModule, example_inputs: list, *, mode: str | None = None,
                      options: dict | None = None):
    """The Dynamo backend: rewrite ``gm`` with checked exact passes, then compile it with the inner backend.

    Args:
        gm: the graph Dynamo captured (parameters and buffers as placeholders).
        example_inputs: one value per placeholder, as Dynamo gives them (tensors, SymInts).
        mode: torch.compile's ``mode`` ("max-autotune", "reduce-overhead"...), passed on to
            Inductor as its config; not the train/infer mode, which is an option.
        options: torch.compile's ``options``: ``mode``, ``passes``, ``backend`` (see the
            module docstring).

    Returns:
        The inner backend's compiled callable, taking the same inputs as ``gm``.

    Raises:
        UserError: an unknown option, mode, pass or inner backend; ``passes`` neither a
            list of names nor a string; a pass that is not exact or not for the mode; a
            torch.compile mode for an inner backend other than Inductor. Dynamo reports it
            wrapped in its ``BackendCompilerFailed``.
    """
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise UserError(f"fastgraph backend: unknown option {', '.join(map(repr, unknown))}; "
                        f"known: {', '.join(OPTIONS)}")
    graph_mode = _default_mode(gm) if options.get("mode") is None else options["mode"]
    inner = _inner_backend(options.get("backend", DEFAULT_BACKEND), mode)
    rewritten, outcome = rewrite_graph(gm, example_inputs, mode=graph_mode, passes=options.get("passes"))
    outcome.backend = inner.name
    stats.graphs.append(outcome)
    return inner(rewritten, example_inputs)


def rewrite_graph(gm: fx.GraphModule, example_inputs: list, *, mode: str,
                  passes: list[str] | str | None = None) -> tuple[fx.GraphModule, GraphOutcome]:
    """Apply the exact ``passes`` to a Dynamo graph, each checked in float64 against ``gm``.

    Args:
        gm: the captured graph; never modified.
        example_inputs: one value per placeholder (real or fake tensors, SymInts); the
            checks run on them (see the module docstring), with gradients when grad mode
            is on and one of them requires grad.
        mode: "train" or "infer": which passes may run (those registered for it).
        passes: pass names, a comma-separated string, or None for the mode's defaults
            (``fastgraph.compiler.optimize.DEFAULT_PASSES``).

    Returns:
        (the rewritten graph, or ``gm`` itself when nothing was applied; a
        :class:`GraphOutcome` whose ``backend`` is left empty).

    Raises:
        UserError: unknown mode or pass, ``passes`` neither a list of names nor a string,
            a pass not registered for ``mode``, or a training-time pass.
    """
    infos = _exact_passes(passes, mode)
    report = PassReport(mode)
    outcome = GraphOutcome(mode, "", report)
    if not infos:
        outcome.note = "no passes asked for"
        return gm, outcome
    binding = _Binding.of(gm, example_inputs)
    if isinstance(binding, str):
        outcome.note = f"passes not run: {binding}"
        report.outcomes += [PassOutcome(i.name, i.exactness, "no-op", message=outcome.note) for i in infos]
        return gm, outcome
    check_mode = _check_mode(example_inputs)
    outcome.note = binding.describe() + (", gradients included" if check_mode == "train" else "")
    current = gm
    reference = None
    for info in infos:
        step = PassOutcome(info.name, info.exactness, "no-op")
        report.outcomes.append(step)
        after, refusal = _apply(info, current, step)
        if after is None:
            continue
        if refusal is None:
            if reference is None:
                reference, refusal = _observe_captured(binding, gm, check_mode)
            if refusal is None:
                refusal = _check(binding, gm, after, check_mode, reference, step)
        if refusal is not None:
            step.status, step.message = "refused", f"{refusal}; kept the graph before it"
            log.warning("fastgraph backend: pass %s refused: %s", info.name, refusal)
            continue
        step.status = "applied"
        current = after
    if current is not gm:
        _keep_dynamo_metadata(gm, current)
    return current, outcome


def _default_mode(gm: fx.GraphModule) -> str:
    """"train" when ``gm`` holds a batch norm in training mode (the model was in train mode),
    else "infer"."""
    training = any((bn := batch_norm_call(gm, n)) is not None and bn.training for n in gm.graph.nodes)
    return "train" if training else "infer"


def _check_mode(example_inputs: list) -> str:
    """The check :func:`verify` runs: "train" (outputs, buffers, gradients, a step) when
    gradients can flow through the graph (grad mode on, an input requiring grad), else
    "infer" (outputs and buffers)."""
    grads = any(isinstance(v, torch.Tensor) and v.requires_grad for v in example_inputs)
    return "train" if torch.is_grad_enabled() and grads else "infer"


def _exact_passes(passes, mode: str) -> list[registry.PassInfo]:
    """The registered passes named by ``passes`` (None: the mode's defaults), checked to be
    exact and registered for ``mode``."""
    if mode not in registry.MODES:
        raise UserError(f"fastgraph backend: mode must be one of {', '.join(registry.MODES)}, not {mode!r}")
    if passes is None:
        names = DEFAULT_PASSES[mode]
    elif isinstance(passes, str):
        names = [n.strip() for n in passes.split(",") if n.strip()]
    elif isinstance(passes, (list, tuple)) and all(isinstance(n, str) for n in passes):
        names = list(passes)
    else:
        raise UserError(f"fastgraph backend: option 'passes' is a list of pass names or a comma-separated "
                        f"string, got {passes!r}")
    infos = []
    for name in names:
        try:
            info = registry.get(name)
        except KeyError as exc:
            raise UserError(f"fastgraph backend: {exc.args[0]}") from None
        if not info.exact:
            raise UserError(f"fastgraph backend: pass {name} is training-time (it changes the function); "
                            "the backend applies exact passes only: train with it through fastgraph train")
        if mode not in info.modes:
            raise UserError(f"fastgraph backend: pass {name} applies in {'/'.join(info.modes)} mode, "
                            f"not {mode}")
        infos.append(info)
    return infos


class _Inner:
    """The backend the rewritten graph is compiled with, by name."""

    def __init__(self, name: str, compile_mode: str | None):
        from torch._dynamo.backends.registry import lookup_backend
        from torch._dynamo.exc import InvalidBackend

        if name == "fastgraph":
            raise UserError("fastgraph backend: the inner backend cannot be fastgraph itself")
        try:
            self.fn = lookup_backend(name)
        except InvalidBackend:
            # every tag: the default list leaves out "eager" and "aot_eager", the quick ones on a CPU
            known = [b for b in torch._dynamo.list_backends(exclude_tags=()) if b != "fastgraph"]
            raise UserError(f"fastgraph backend: unknown inner backend {name!r}; "
                            f"known: {', '.join(known)}") from None
        self.name = name
        self.kwargs = {}
        if compile_mode not in (None, "default"):
            if name != "inductor":
                raise UserError(f"fastgraph backend: torch.compile mode {compile_mode!r} is Inductor's; "
                                f"the inner backend is {name}")
            from torch._inductor import list_mode_options

            self.kwargs["config_patches"] = list_mode_options(compile_mode)

    def __call__(self, gm: fx.GraphModule, example_inputs: list):
        return self.fn(gm, example_inputs, **self.kwargs)


def _inner_backend(name: str, compile_mode: str | None) -> _Inner:
    if not isinstance(name, str):
        raise UserError(f"fastgraph backend: option 'backend' names a backend, got {name!r}")
    return _Inner(name, compile_mode)


def _apply(info, gm: fx.GraphModule, step: PassOutcome) -> tuple[fx.GraphModule | None, str | None]:
    """Run one pass on ``gm``: (its result, or None when it rewrote nothing; why it is refused
    before any numerical check, or None)."""
    try:
        after = info.fn(gm)
        after.graph.lint()
    except Exception as exc:  # noqa: BLE001 - a pass failing on a graph: refused, the compile goes on
        lines = str(exc).strip().splitlines()
        return gm, f"fails on this graph: {type(exc).__name__}: {lines[0] if lines else ''}"
    step.rewrites = registry.rewrite_count(gm, after)
    if step.rewrites == 0:
        step.message = "nothing to rewrite"
        return None, None
    lost = lost_nodes(gm, after, registry.declared_rewritten(gm, after))
    if lost:
        return after, f"dropped nodes it did not declare rewritten: {', '.join(lost)}"
    return after, None


def _observe_captured(binding: _Binding, gm: fx.GraphModule, mode: str):
    """(the float64 observation of the captured graph, None) or (None, why it cannot be checked)."""
    try:
        return observe(binding.module(gm), mode, binding.batches()), None
    except ModelFailed as exc:
        return None, f"the captured graph fails in the float64 check: {exc}"


def _check(binding: _Binding, gm: fx.GraphModule, after: fx.GraphModule, mode: str, reference,
           step: PassOutcome) -> str | None:
    """Verify ``after`` against the captured ``gm``; fill ``step``; why it is refused, or None."""
    check = verify(binding.module(gm), binding.module(after), mode, binding.batch, reference)
    step.max_output_diff, step.max_grad_diff, step.tolerance = (
        check.max_output_diff, check.max_grad_diff, check.tolerance)
    return None if check.ok else f"differs: {check.worst}"


def _keep_dynamo_metadata(captured: fx.GraphModule, rewritten: fx.GraphModule) -> None:
    """Carry over what AOTAutograd reads from a Dynamo graph and a pass's deep copy loses:
    the parameter sources and each placeholder's source (deduplicated guards, the static
    inputs CUDA graphs keep in place), as Dynamo's DDP optimizer does for its sub-graphs."""
    if hasattr(captured, "_param_name_to_source"):
        rewritten._param_name_to_source = captured._param_name_to_source
    sources = {n.name: n._dynamo_source for n in captured.graph.find_nodes(op="placeholder")
               if hasattr(n, "_dynamo_source")}
    for node in rewritten.graph.find_nodes(op="placeholder"):
        if node.name in sources:
            node._dynamo_source = sources[node.name]


def _is_state(node: fx.Node, value) -> bool:
    """Whether a placeholder holds a module's parameter or buffer (Dynamo marks them static)."""
    return isinstance(value, nn.Parameter) or "_dynamo_static_input_type" in node.meta.get("tensor_dict", {})


def _hint(value):
    """The real value of a SymInt/SymFloat/SymBool example input (None if Dynamo kept none)."""
    return value.node.hint if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)) else value


def _real(value, generator: torch.Generator):
    """A real tensor standing in for a fake one: seeded standard normal values for floating
    dtypes, zeros otherwise, of the same shape (sizes at their hints), dtype and device."""
    if not (isinstance(value, torch.Tensor) and is_fake(value)):
        return value
    shape = [_hint(s) for s in value.shape]
    with torch._subclasses.fake_tensor.unset_fake_temporarily():
        if value.dtype.is_floating_point:
            real = torch.randn(shape, generator=generator).to(value.device, value.dtype)
        else:
            real = torch.zeros(shape, dtype=value.dtype, device=value.device)
    return real.requires_grad_(value.requires_grad) if real.is_floating_point() else real


# Names a held input may not take: the attributes of a module and of :class:`_Bound`.
_RESERVED = frozenset(dir(nn.Module())) | {"captured", "slots"}


class _Bound(nn.Module):
    """A captured graph as a module of one input, the batch, for :func:`verify`: every other
    input is held by the module (a parameter when it requires grad, else a buffer, under the
    placeholder's name) or computed from the batch's shape (a SymInt size of it)."""

    def __init__(self, gm: fx.GraphModule, binding: _Binding):
        super().__init__()
        self.captured = gm
        self.slots = binding.slots
        for name, tensor in binding.tensors.items():
            if isinstance(tensor, nn.Parameter):
                self.register_parameter(name, tensor)
            else:
                self.register_buffer(name, tensor)

    def forward(self, x: torch.Tensor):
        args = []
        for kind, payload in self.slots:
            if kind == "batch":
                args.append(x)
            elif kind == "tensor":
                args.append(getattr(self, payload))
            elif kind == "size":
                args.append(x.shape[payload])
            else:
                args.append(payload)
        # forward, not __call__: a GraphModule's __call__ prints the traceback of any error
        # to stderr before raising it, and a failing run here is an outcome the check
        # handles (a graph that fixed the batch size, a refused pass), not the user's error.
        # Reading .code generates a lazy graph module's forward (Dynamo's graphs, and their
        # deep copies, are lazy), whose first call would go through __call__.
        self.captured.code  # noqa: B018
        return self.captured.forward(*args)


@dataclass
class _Binding:
    """How a captured graph's inputs are given in the check: ``slots`` (one per placeholder:
    ("batch", None), ("tensor", name), ("size", dim of the batch) or ("value", a number)),
    ``tensors`` (copies of the example tensors, by name), and the check ``batch`` (x, None)."""

    slots: list
    tensors: dict
    batch: tuple
    full_batch: int
    synthetic: bool

    @classmethod
    def of(cls, gm: fx.GraphModule, example_inputs: list) -> _Binding | str:
        """The binding of ``gm``'s inputs, or a string saying why the graph cannot be checked."""
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        if len(placeholders) != len(example_inputs):
            return f"{len(placeholders)} graph inputs but {len(example_inputs)} example inputs"
        generator = torch.Generator().manual_seed(SEED)
        synthetic = any(isinstance(v, torch.Tensor) and is_fake(v) for v in example_inputs)
        values = [_real(v, generator) for v in example_inputs]
        batch = next((i for i, (node, v) in enumerate(zip(placeholders, values, strict=True))
                      if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() >= 1
                      and not _is_state(node, v)), None)
        if batch is None:
            return "no batch input (a floating-point tensor that is not a parameter or buffer)"
        dims = _symbolic_dims(placeholders[batch])
        slots, tensors = [], {}
        for i, (node, value) in enumerate(zip(placeholders, values, strict=True)):
            if i == batch:
                slots.append(("batch", None))
            elif isinstance(value, torch.Tensor):
                name = node.name if node.name.isidentifier() and node.name not in _RESERVED else f"input_{i}"
                copied = value.detach().clone()
                tensors[name] = nn.Parameter(copied) if value.requires_grad else copied
                slots.append(("tensor", name))
            elif isinstance(value, torch.SymInt) and _symbol(value) in dims:
                slots.append(("size", dims[_symbol(value)]))
            elif _hint(value) is None:
                return f"input {node.name} is symbolic without a known value"
            else:
                slots.append(("value", _hint(value)))
        x = values[batch].detach()
        binding = cls(slots, tensors, (x, None), len(x), synthetic)
        binding._calibrate(gm, placeholders)
        binding._shrink(gm)
        return binding

    def module(self, gm: fx.GraphModule) -> _Bound:
        """``gm`` with this binding's inputs (tensors shared, not copied: :func:`verify` copies)."""
        return _Bound(gm, self)

    def batches(self) -> list:
        """The check's batches, as :func:`verify` makes them: the batch and its stress batch."""
        return [self.batch, stress_batch(*self.batch)]

    def describe(self) -> str:
        """On what the checks run, in words."""
        used = len(self.batch[0])
        where = f"{used} of the {self.full_batch} images of the batch" if used < self.full_batch else (
            f"the batch of {used}")
        return f"checked on {where}" + (" (synthetic: Dynamo gave fake tensors)" if self.synthetic else "")

    def _calibrate(self, gm: fx.GraphModule, placeholders: list[fx.Node]) -> None:
        """Random running statistics (mean 0.2·N(0,1), variance in [0.5, 1.5)) and affine
        parameters (weight in [0.5, 1.5), bias 0.2·N(0,1)), seeded, for every eval-mode
        batch-norm call of ``gm`` reading them from inputs: fresh statistics (0 and 1) make
        a fold that forgets them right, as ``fastgraph.core.verification.calibrated`` says."""
        names = {node: name for node, (kind, name) in zip(placeholders, self.slots, strict=True)
                 if kind == "tensor"}
        generator = torch.Generator().manual_seed(SEED)
        draws = {"running_mean": lambda s: 0.2 * torch.randn(s, generator=generator),
                 "running_var": lambda s: 0.5 + torch.rand(s, generator=generator),
                 "weight": lambda s: 0.5 + torch.rand(s, generator=generator),
                 "bias": lambda s: 0.2 * torch.randn(s, generator=generator)}
        for node in gm.graph.nodes:
            bn = batch_norm_call(gm, node)
            if bn is None or bn.module is not None or bn.batch_statistics:
                continue
            for field_name, draw in draws.items():
                source = getattr(bn, field_name)
                if source in names:
                    tensor = self.tensors[names[source]]
                    with torch.no_grad():
                        tensor.copy_(draw(tensor.shape))

    def _shrink(self, gm: fx.GraphModule) -> None:
        """Check on :data:`VERIFY_IMAGES` images spread over the batch when it holds more and the
        captured graph runs on them (a graph that fixed the batch size in a reshape does not)."""
        x = self.batch[0]
        if len(x) <= VERIFY_IMAGES:
            return
        small = x[spread_indices(VERIFY_IMAGES, len(x)).to(x.device)]
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                copy.deepcopy(self.module(gm))(small)
        except Exception:  # noqa: BLE001 - the graph needs the full batch: check on it
            return
        self.batch = (small, None)


def _symbol(value: torch.SymInt) -> str:
    return str(value.node.expr)


def _symbolic_dims(batch: fx.Node) -> dict[str, int]:
    """{symbol: dimension} for the batch placeholder's dimensions that are plain symbols
    (``s77`` for a dynamic batch size), from its fake example value."""
    fake = batch.meta.get("example_value")
    if not isinstance(fake, torch.Tensor):
        return {}
    return {_symbol(size): dim for dim, size in enumerate(fake.shape)
            if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol}
