"""Trace a model file, rewrite it with graph passes, verify the exact ones on real CIFAR-10, and report.

The report holds, per pass: applied or refused, rewrites, exactness, the measured float64
difference, FLOPs and bytes per image before and after; then the roofline of a training
run (or of inference over the test set) on a hardware profile before and after, with the
step time measured on this device.

Inputs are CIFAR-10 images, resized to ``--input-shape`` when it asks for other 3-channel
sizes; for another channel count random normal data stands in, and the report and its
JSON say so, since then nothing was checked on real images.

:func:`optimize` is the job, for Python (``fastgraph.optimize``) and for the
``fastgraph optimize`` command, which parses its options, prints the report and writes it.
"""

from __future__ import annotations

import copy
import io
import os
import pickle
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fastgraph.compiler.report import OptimizeReport
from fastgraph.core.errors import UserError
from fastgraph.perf.roofline import DEFAULT_PROFILE, HardwareProfile
from fastgraph.training.evaluation import check_trainable, training_loss

# The passes `optimize` runs when --passes is not given: the exact ones for the mode,
# whose results are verified; training-time passes change the function and are named
# explicitly (or applied by `fastgraph train` through a recipe).
DEFAULT_PASSES = {
    "train": ["pool_before_activation"],
    "infer": ["pool_before_activation", "fold_bn"],
}
DATA_PASS_IMAGES = 5000  # training images given to passes that need data (whitening's patch covariance)
CIFAR_SHAPE = (3, 32, 32)
SYNTHETIC_INPUT = "synthetic input: verification on random normal data"


def parse_input_shape(text: str) -> tuple[int, int, int]:
    """``--input-shape`` text ``"C,H,W"`` as (channels, height, width), in pixels.

    Raises:
        UserError: not three comma-separated positive integers (one line quoting ``text``).
    """
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise UserError(f"--input-shape must be C,H,W positive integers, got {text!r}")
    return shape


def resized(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Normalised float images (N, 3, 32, 32) resized bilinearly to ``size`` (H, W).

    Antialiased, so that a shrink averages the pixels it drops rather than aliasing them;
    when enlarging, antialiasing changes nothing.
    """
    if tuple(images.shape[-2:]) == size:
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


def synthetic_batch(n: int, shape: tuple[int, int, int], classes: int = 10):
    """``n`` random normal inputs (n, *shape) float32 and int64 labels in [0, classes),
    from a fixed seed so that two runs verify on the same values."""
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(n, *shape, generator=generator),
            torch.randint(0, classes, (n,), generator=generator))


NO_TRAINING_STEP = "it has no training step to measure: use --mode infer"


def step_fn(gm: fx.GraphModule, mode: str, x: torch.Tensor, y: torch.Tensor, device: torch.device,
             precision: str):
    """A zero-argument training step (forward, :func:`training_loss`, backward, SGD) or inference
    forward of a copy of ``gm`` on (x, y) on ``device``; ``gm`` is untouched.

    Raises:
        ModelError: ``mode`` "train" and ``gm`` has no trainable parameters
            (:func:`fastgraph.training.evaluation.check_trainable`).
    """
    if mode == "train":
        check_trainable(gm, "the graph", NO_TRAINING_STEP)
    model = copy.deepcopy(gm).to(device).train(mode == "train")
    x, y = x.to(device), y.to(device)
    low = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    use_autocast = device.type == "cuda" and low is not None  # CPU runs fp32: no fast low precision there

    def forward():
        with torch.autocast(device.type, dtype=low, enabled=use_autocast):
            return model(x)

    if mode == "train":
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

        def step():
            opt.zero_grad(set_to_none=True)
            training_loss(forward(), y).backward()
            opt.step()
    else:
        def step():
            with torch.no_grad():
                forward()
    return step


def measure_alternating(steps: dict, device: torch.device, rounds: int) -> dict:
    """Median seconds per step of each named step function, timed in alternation.

    One warm-up call each (not timed), then ``rounds`` rounds that time one call of every
    function in turn, so a change in machine load between them (a shared CPU, GPU clocks)
    falls on all of them alike rather than on whichever was timed second.
    Returns {name: (every step's seconds, method)}.
    """
    from fastgraph.core.timing import measure_step_time

    times = {name: [] for name in steps}
    for fn in steps.values():
        measure_step_time(fn, device, warmup=1, iters=1)
    for _ in range(rounds):
        for name, fn in steps.items():
            one = measure_step_time(fn, device, warmup=0, iters=1)
            times[name].append(one.median_seconds)
    clock = one.method.split(",")[0]
    method = f"{clock}, 1 warm-up excluded, {rounds} steps each, before/after alternated"
    return {name: (t, method) for name, t in times.items()}


def readable_code(gm: fx.GraphModule, passes_applied: list[str], source: str) -> str:
    """The rewritten graph as Python, headed by what each called submodule is."""
    called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    width = max((len(t) for t in called), default=0)
    modules = "\n".join(f"#   {t:<{width}}  {gm.get_submodule(t)!r}".replace("\n", " ") for t in called)
    header = (f"# Generated by fastgraph optimize from {source}\n"
              f"# Passes applied: {', '.join(passes_applied) or 'none'}\n"
              "# Load the module itself with torch.load(path, weights_only=False).\n"
              f"# Submodules called, in graph order:\n{modules}\n\n")
    return header + gm.print_readable(print_output=False)




def _input_shape(shape: str | Sequence[int]) -> tuple[int, int, int]:
    """``input_shape`` as (C, H, W): "C,H,W" text (see :func:`parse_input_shape`) or three positive ints."""
    if isinstance(shape, str):
        return parse_input_shape(shape)
    checked = tuple(shape)
    if len(checked) != 3 or not all(isinstance(v, int) and v >= 1 for v in checked):
        raise UserError(f"input_shape must be (C, H, W), three positive integers, got {shape!r}")
    return checked


def _pass_names(passes: str | Sequence[str] | None, mode: str) -> list[str]:
    """Pass names in order: a list, "a,b,c" text, or None for the mode's :data:`DEFAULT_PASSES`."""
    if passes is None:
        return list(DEFAULT_PASSES[mode])
    if isinstance(passes, str):
        passes = passes.split(",")
    return [n.strip() for n in passes if n.strip()]


def _saved_bytes(module: nn.Module, path) -> bytes:
    """``torch.save`` of ``module`` into memory, so that a module pickle cannot store leaves no
    half-written ``--out`` file.

    Raises:
        UserError: ``module`` holds an object pickle cannot find again by name (a hook,
            lambda or class defined in a model file loaded by path, whose module is not
            importable), an object of a kind pickle refuses (a lock, an open file), or a
            parametrized module (``torch.nn.utils.parametrize``: state_dict only).
    """
    buffer = io.BytesIO()
    try:
        torch.save(module, buffer)
    except (pickle.PicklingError, AttributeError, TypeError, RuntimeError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0].removesuffix(" See:")
        by_name = isinstance(exc, (pickle.PicklingError, AttributeError))
        hint = ("; a model file is loaded by path: define its hooks, lambdas and classes in an "
                "importable module") if by_name else ""
        raise UserError(f"cannot save --out {path}: pickle cannot store the module ({reason}){hint}"
                        ) from None
    return buffer.getvalue()


def optimize(model: nn.Module | str | os.PathLike, *, mode: str = "infer",
             passes: str | Sequence[str] | None = None, data: str | os.PathLike | None = None,
             profile: str | HardwareProfile = DEFAULT_PROFILE, precision: str = "bf16",
             batch_size: int | None = None, input_shape: str | Sequence[int] = CIFAR_SHAPE,
             measure_steps: int = 5, epochs: float = 10, device: str | torch.device | None = None,
             entry: str | None = None, out: str | os.PathLike | None = None,
             emit_code: str | os.PathLike | None = None) -> tuple[fx.GraphModule, OptimizeReport]:
    """Trace ``model``, rewrite it with graph passes, verify each on real CIFAR-10, and report.

    The main job of fastgraph (README, "What ``fastgraph optimize`` tells you"): the model
    is traced in the mode of use and the trace checked against it in float64; each pass
    runs through :func:`fastgraph.core.pass_manager.run_passes`, which keeps an exact
    pass only when outputs, buffers (and in train mode gradients and one SGD step) match
    the module before it within 1e-5 of each tensor's scale; then the roofline of the run
    (:func:`fastgraph.perf.roofline.estimate`) and ``measure_steps`` alternated steps
    before and after, timed on ``device``.

    Args:
        model: an ``nn.Module`` (not modified), or a plain PyTorch model file (``.py``)
            built by :func:`fastgraph.core.loading.load_model` (``entry`` names its
            function, class or instance; default ``model``/``build_model`` or the one model).
        mode: ``"infer"`` (inference graph: ``fold_bn`` applies; the result is in eval
            mode) or ``"train"`` (the training step).
        passes: pass names in order, as a list or "a,b,c"; default the exact passes of the
            mode (:data:`DEFAULT_PASSES`). Training-time passes must be named.
        data: CIFAR-10 (python-format folder, ImageFolder folder or archive); default
            ``$FASTGRAPH_DATA``, then ``~/.cache/fastgraph/cifar10``. Unused for inputs
            of another channel count, where random normal data stands in (the report says so).
        profile, precision: hardware profile (name, ``.toml`` path or
            :class:`~fastgraph.perf.roofline.HardwareProfile`) and precision (fp32, tf32,
            fp16, bf16) of the roofline; the measured step autocasts to fp16/bf16 on CUDA only.
        batch_size: images per measured step, >= 2 (default 512 on CUDA, 32 on CPU); the
            roofline takes it for parameter traffic (default 512).
        input_shape: one image, (C, H, W) or "C,H,W" (default 3x32x32); 3-channel inputs
            are real CIFAR-10 images resized bilinearly (antialiased).
        measure_steps: timed steps of each graph, alternated before/after (>= 1).
        epochs: epochs of 50,000 images in the training roofline (> 0).
        device: where steps are measured: "cpu", "cuda", "cuda:N" (default CUDA if present).
        out: save the rewritten ``GraphModule`` there (``torch.save``; load it with
            ``torch.load(path, weights_only=False)``). emit_code: write its readable Python
            there. Both are checked before any slow work.

    Returns:
        (the rewritten ``torch.fx.GraphModule``, on the CPU, in the mode of use; the
        :class:`~fastgraph.compiler.report.OptimizeReport`, whose ``to_dict()`` is the
        JSON ``fastgraph optimize --json`` writes).

    Raises:
        UserError: a bad option (mode, pass name or a pass for the other mode, profile,
            precision, device, sizes), unwritable ``out``/``emit_code``, missing or corrupt
            data (``DataError``), a model file or model that cannot be built, traced, run
            on the input or whose trace differs from it (``ModelError``, one line naming
            the construct and its source line; in train mode, also a model without
            trainable parameters).
    """
    from fastgraph import passes as registry
    from fastgraph.core.devices import device_name, resolve_device
    from fastgraph.core.loading import load_model
    from fastgraph.core.outputs import check_outputs, output_file
    from fastgraph.core.pass_manager import VERIFY_IMAGES, run_passes, verification_batch
    from fastgraph.core.timing import compare_step_times
    from fastgraph.core.tracing import check_runs, check_trace, trace
    from fastgraph.data import load_cifar10, normalize, spread_indices
    from fastgraph.perf import roofline
    from fastgraph.training.trained import spread_training_images

    if mode not in DEFAULT_PASSES:
        raise UserError(f"mode must be 'train' or 'infer', not {mode!r}")
    if not epochs > 0 or measure_steps < 1 or (batch_size is not None and batch_size < 2):
        raise UserError("epochs and measure_steps must be positive and batch_size at least 2, got "
                        f"epochs={epochs}, measure_steps={measure_steps}, batch_size={batch_size}")
    shape = _input_shape(input_shape)
    hardware = profile if isinstance(profile, HardwareProfile) else roofline.load_profile(profile)
    hardware.peak(precision)  # raises a one-line error for a precision the profile lacks
    device = resolve_device(device)
    source = None if isinstance(model, nn.Module) else model
    outputs = check_outputs({"out": out, "emit_code": emit_code}, inputs={"model file": source, "data": data})

    if source is not None:
        model = load_model(source, entry)
    if mode == "train":
        name = str(source) if source is not None else type(model).__name__
        check_trainable(model, name, NO_TRAINING_STEP)
    gm = trace(model, source, mode=mode)  # self.training branches as they will run
    if "out" in outputs:  # before minutes of checks and timing, not after them
        _saved_bytes(gm, outputs["out"])
    batch_size_given, batch_size = batch_size, batch_size or (512 if device.type == "cuda" else 32)
    names = _pass_names(passes, mode)
    needs_data = [name for name in names if name in registry.REGISTRY and registry.get(name).needs_data]
    if shape[0] == CIFAR_SHAPE[0]:
        cifar = load_cifar10(data)
        if batch_size > len(cifar.test_images):
            raise UserError(f"--batch-size {batch_size} is more than the {len(cifar.test_images)} "
                            "test images")
        # Test images of every class: an ImageFolder test split is stored class by class.
        index = spread_indices(max(batch_size, VERIFY_IMAGES), len(cifar.test_images))
        x, y = resized(normalize(cifar.test_images[index]), shape[1:]), cifar.test_labels[index]
        what = "real CIFAR-10 test images" + ("" if shape == CIFAR_SHAPE else
                                               f", resized bilinearly to {shape[1]}x{shape[2]}")
    else:
        if needs_data:  # whitening's patch statistics of noise would whiten nothing
            raise UserError(f"pass {needs_data[0]} needs real images, and --input-shape "
                            f"{','.join(map(str, shape))} has {shape[0]} channels, not CIFAR-10's 3")
        cifar = None
        x, y = synthetic_batch(max(batch_size, VERIFY_IMAGES), shape)
        what = SYNTHETIC_INPUT
    # Two images, not one: in train mode BatchNorm raises on one value per channel, which
    # ImageNet-style ResNets reach on their 1x1 maps; every count is divided by the batch.
    example = x[:2]
    check_runs(gm, example)  # a model sized for other images fails here, in one line
    if mode == "infer":
        gm.eval()  # inference passes such as fold_bn act on eval-mode BatchNorm
    # Passes that need data (whitening) get training images of every class.
    options = {}
    if needs_data:
        # As many patches as DATA_PASS_IMAGES images hold at 32x32 (fewer images when
        # larger), and at least ten images per class.
        count = max(DATA_PASS_IMAGES * CIFAR_SHAPE[1] * CIFAR_SHAPE[2] // (shape[1] * shape[2]), 100)
        images, _ = spread_training_images(cifar, min(count, DATA_PASS_IMAGES))
        options = {name: {"images": resized(images, shape[1:])} for name in needs_data}

    # The user's eager model is the reference: a trace that lost part of it (a no_grad
    # block, a train() override...) is refused here, naming the construct, before any pass.
    check_trace(model, gm, mode, verification_batch(x, y))
    optimized, pass_report = run_passes(gm, names, mode=mode, batch=verification_batch(x, y),
                                        options=options, costs=roofline.per_image_costs(example, batch_size))

    graphs = {"before": gm, "after": optimized}
    measured = measure_alternating(
        {label: step_fn(module, mode, x[:batch_size], y[:batch_size], device, precision)
         for label, module in graphs.items()}, device, measure_steps)
    rows = []
    for label, module in graphs.items():
        est = roofline.estimate(module, example, hardware, precision, mode=mode, epochs=epochs,
                                batch_size=batch_size_given or 512)
        samples, method = measured[label]
        median = statistics.median(samples)
        images_per_second = batch_size / median
        rows.append({"graph": label, **est, "measured_step_seconds": median,
                     "measured_step_samples": samples,
                     "measured_images_per_second": images_per_second,
                     "measured_flops_per_second": est["step_flops_per_image"] * images_per_second,
                     "timing_method": method})

    report = OptimizeReport(
        model=str(Path(source).resolve()) if source is not None else f"{type(model).__name__} (nn.Module)",
        device=device_name(device), torch=torch.__version__, batch_size=batch_size,
        input={"shape": list(shape), "data": what}, verify_images=VERIFY_IMAGES, profile=hardware.name,
        precision=precision, epochs=epochs, mode=pass_report.mode, passes=pass_report.to_dict()["passes"],
        roofline=rows,
        # before vs after with their spread: "within noise" when the ranges overlap
        measured_step=compare_step_times(measured["before"][0], measured["after"][0]))
    if "out" in outputs:
        saved = _saved_bytes(optimized, outputs["out"])
        with output_file(outputs["out"], "out") as file:
            file.write_bytes(saved)
        report.optimized_module = str(file.resolve())
    if "emit_code" in outputs:
        with output_file(outputs["emit_code"], "emit_code") as file:
            file.write_text(readable_code(optimized, pass_report.applied, str(source or report.model)))
        report.emitted_code = str(file.resolve())
    return optimized, report
