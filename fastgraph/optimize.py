"""Trace a model file, rewrite it with graph passes, verify the exact ones on real CIFAR-10, and report.

The report holds, per pass: applied or refused, rewrites, exactness, the measured float64
difference, FLOPs and bytes per image before and after; then the roofline of a training
run (or of inference over the test set) on a hardware profile before and after, with the
step time measured on this device.

Inputs are CIFAR-10 images, resized to ``--input-shape`` when it asks for other 3-channel
sizes; for another channel count random normal data stands in, and the report and its
JSON say so, since then nothing was checked on real images.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves

from fastgraph.cli_common import (
    DEFAULT_PROFILE,
    check_outputs,
    device_name,
    output_file,
    resolve_device,
    write_json,
)
from fastgraph.errors import UserError
from fastgraph.timing import compare_step_times

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


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``fastgraph optimize`` options to its subparser."""
    p.add_argument("model", help="plain PyTorch model file (.py)")
    p.add_argument("--entry", help="function or class in the file that builds the model, or a module-level "
                   "nn.Module instance")
    p.add_argument("--input-shape", default="3,32,32", metavar="C,H,W",
                   help="one input image: channels, height, width (default 3,32,32). With 3 channels the "
                   "real CIFAR-10 images are resized to HxW; with any other count random normal data "
                   "stands in, and the report says so")
    p.add_argument("--mode", choices=("train", "infer"), default="train",
                   help="optimise the training step (default) or inference")
    defaults = "; ".join(f"{mode}: {','.join(names)}" for mode, names in DEFAULT_PASSES.items())
    p.add_argument("--passes", help=f"comma-separated pass names, in order (default: the exact passes "
                   f"for the mode, {defaults})")
    p.add_argument("--profile", default=DEFAULT_PROFILE,
                   help=f"hardware profile for the roofline (default {DEFAULT_PROFILE})")
    p.add_argument("--precision", default="bf16", help="fp32, tf32, fp16 or bf16 (default bf16)")
    p.add_argument("--epochs", type=int, default=10,
                   help="epochs of 50,000 images in the roofline (default 10)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="batch of the measured step (default 512 on CUDA, 32 on CPU)")
    p.add_argument("--steps", type=int, default=5,
                   help="timed steps of each graph, alternated before/after (default 5)")
    p.add_argument("--device", default=None, help="device for the measured step (default cuda if present)")
    p.add_argument("--data", help="CIFAR-10: python-format dir, ImageFolder dir or archive "
                   "(default $FASTGRAPH_DATA, then ~/.cache/fastgraph/cifar10)")
    p.add_argument("--out", help="where to save the optimised GraphModule (default <model>.optimized.pt)")
    p.add_argument("--emit-code", metavar="FILE.py", help="write the rewritten graph as readable Python")
    p.add_argument("--json", metavar="FILE", help="write the whole report as JSON")


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


def _resized(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Normalised float images (N, 3, 32, 32) resized bilinearly to ``size`` (H, W).

    Antialiased, so that a shrink averages the pixels it drops rather than aliasing them;
    when enlarging, antialiasing changes nothing.
    """
    if tuple(images.shape[-2:]) == size:
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


def _synthetic_batch(n: int, shape: tuple[int, int, int], classes: int = 10):
    """``n`` random normal inputs (n, *shape) float32 and int64 labels in [0, classes),
    from a fixed seed so that two runs verify on the same values."""
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(n, *shape, generator=generator),
            torch.randint(0, classes, (n,), generator=generator))


def training_loss(out, y: torch.Tensor) -> torch.Tensor:
    """A scalar loss of a model output for a timed training step.

    ``out`` is a tensor or a tuple, list or dict of them (nested). Its first floating
    tensor gets cross-entropy against the int64 labels ``y`` (N,) when it is (N, classes)
    logits that the labels fit, else its mean; every further floating tensor adds its
    mean, so the backward reaches every head the model computes, as training would.

    Raises:
        UserError: the output holds no floating-point tensor (nothing to train).
    """
    tensors = [t.float() for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not tensors:
        raise UserError(f"the model returns no floating-point tensor ({type(out).__name__}): "
                        "nothing to train")
    first = tensors[0]
    fits = first.dim() == 2 and first.shape[0] == len(y) and first.shape[1] > int(y.max())
    loss = F.cross_entropy(first, y) if fits else first.mean()
    return loss + sum(t.mean() for t in tensors[1:])


def _step_fn(gm: fx.GraphModule, mode: str, x: torch.Tensor, y: torch.Tensor, device: torch.device,
             precision: str):
    """A zero-argument training step (forward, :func:`training_loss`, backward, SGD) or inference
    forward of a copy of ``gm`` on (x, y) on ``device``; ``gm`` is untouched."""
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


def _measure_alternating(steps: dict, device: torch.device, rounds: int) -> dict:
    """Median seconds per step of each named step function, timed in alternation.

    One warm-up call each (not timed), then ``rounds`` rounds that time one call of every
    function in turn, so a change in machine load between them (a shared CPU, GPU clocks)
    falls on all of them alike rather than on whichever was timed second.
    Returns {name: (every step's seconds, method)}.
    """
    from fastgraph.timing import measure_step_time

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


def _readable_code(gm: fx.GraphModule, passes_applied: list[str], source: str) -> str:
    """The rewritten graph as Python, headed by what each called submodule is."""
    called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    width = max((len(t) for t in called), default=0)
    modules = "\n".join(f"#   {t:<{width}}  {gm.get_submodule(t)!r}".replace("\n", " ") for t in called)
    header = (f"# Generated by fastgraph optimize from {source}\n"
              f"# Passes applied: {', '.join(passes_applied) or 'none'}\n"
              "# Load the module itself with torch.load(path, weights_only=False).\n"
              f"# Submodules called, in graph order:\n{modules}\n\n")
    return header + gm.print_readable(print_output=False)


def run(args: argparse.Namespace) -> int:
    """Run ``fastgraph optimize``; returns the exit code (a ``UserError`` is one line, exit 2)."""
    from fastgraph import passes as registry
    from fastgraph import report as report_view
    from fastgraph import roofline
    from fastgraph.data import load_cifar10, normalize, spread_indices
    from fastgraph.loading import load_model
    from fastgraph.pass_manager import VERIFY_IMAGES, run_passes, verification_batch
    from fastgraph.tracing import check_runs, check_trace, trace
    from fastgraph.trained import spread_training_images

    if args.epochs <= 0 or args.steps <= 0 or (args.batch_size is not None and args.batch_size <= 1):
        raise UserError("--epochs and --steps must be positive and --batch-size at least 2")
    shape = parse_input_shape(args.input_shape)
    profile = roofline.load_profile(args.profile)
    profile.peak(args.precision)  # raises a one-line error for a precision the profile lacks
    device = resolve_device(args.device)
    # Unwritable outputs fail here, before the slow work.
    out = check_outputs({"--out": args.out or Path.cwd() / f"{Path(args.model).stem}.optimized.pt",
                         "--emit-code": args.emit_code, "--json": args.json},
                        inputs={"model file": args.model, "data": args.data})["--out"]

    model = load_model(args.model, args.entry)
    gm = trace(model, args.model, mode=args.mode)  # self.training branches as they will run
    batch_size = args.batch_size or (512 if device.type == "cuda" else 32)
    names = DEFAULT_PASSES[args.mode]
    if args.passes:
        names = [n.strip() for n in args.passes.split(",") if n.strip()]
    needs_data = [name for name in names if name in registry.REGISTRY and registry.get(name).needs_data]
    if shape[0] == CIFAR_SHAPE[0]:
        data = load_cifar10(args.data)
        if batch_size > len(data.test_images):
            raise UserError(f"--batch-size {batch_size} is more than the {len(data.test_images)} test images")
        # Test images of every class: an ImageFolder test split is stored class by class.
        index = spread_indices(max(batch_size, VERIFY_IMAGES), len(data.test_images))
        x, y = _resized(normalize(data.test_images[index]), shape[1:]), data.test_labels[index]
        source = "real CIFAR-10 test images" + ("" if shape == CIFAR_SHAPE else
                                                 f", resized bilinearly to {shape[1]}x{shape[2]}")
    else:
        if needs_data:  # whitening's patch statistics of noise would whiten nothing
            raise UserError(f"pass {needs_data[0]} needs real images, and --input-shape "
                            f"{args.input_shape} has {shape[0]} channels, not CIFAR-10's 3")
        data = None
        x, y = _synthetic_batch(max(batch_size, VERIFY_IMAGES), shape)
        source = SYNTHETIC_INPUT
    # Two images, not one: in train mode BatchNorm raises on one value per channel, which
    # ImageNet-style ResNets reach on their 1x1 maps; every count is divided by the batch.
    example = x[:2]
    check_runs(gm, example)  # a model sized for other images fails here, in one line
    if args.mode == "infer":
        gm.eval()  # inference passes such as fold_bn act on eval-mode BatchNorm
        model.eval()
    # Passes that need data (whitening) get training images of every class.
    options = {}
    if needs_data:
        # As many patches as DATA_PASS_IMAGES images hold at 32x32 (fewer images when
        # larger), and at least ten images per class.
        count = max(DATA_PASS_IMAGES * CIFAR_SHAPE[1] * CIFAR_SHAPE[2] // (shape[1] * shape[2]), 100)
        images, _ = spread_training_images(data, min(count, DATA_PASS_IMAGES))
        options = {name: {"images": _resized(images, shape[1:])} for name in needs_data}

    # The user's eager model is the reference: a trace that lost part of it (a no_grad
    # block, a train() override...) is refused here, naming the construct, before any pass.
    check_trace(model, gm, args.mode, verification_batch(x, y))
    optimized, pass_report = run_passes(gm, names, mode=args.mode, batch=verification_batch(x, y),
                                        options=options, cost_example=example, cost_batch_size=batch_size)

    rows = []
    graphs = {"before": gm, "after": optimized}
    measured = _measure_alternating(
        {label: _step_fn(module, args.mode, x[:batch_size], y[:batch_size], device, args.precision)
         for label, module in graphs.items()}, device, args.steps)
    for label, module in graphs.items():
        est = roofline.estimate(module, example, profile, args.precision, mode=args.mode,
                                epochs=args.epochs, batch_size=args.batch_size or 512)
        samples, method = measured[label]
        seconds = statistics.median(samples)
        images_per_second = batch_size / seconds
        rows.append({"graph": label, **est, "measured_step_seconds": seconds,
                     "measured_step_samples": samples,
                     "measured_images_per_second": images_per_second,
                     "measured_flops_per_second": est["step_flops_per_image"] * images_per_second,
                     "timing_method": method})

    with output_file(out, "--out"):
        torch.save(optimized, out)
    result = {
        "model": str(Path(args.model).resolve()),
        "device": device_name(device),
        "torch": torch.__version__,
        "batch_size": batch_size,
        "input": {"shape": list(shape), "data": source},
        "verify_images": VERIFY_IMAGES,
        "profile": profile.name,
        "precision": args.precision,
        "epochs": args.epochs,
        **pass_report.to_dict(),
        "roofline": rows,
        # before vs after with their spread: "within noise" when the ranges overlap
        "measured_step": compare_step_times(measured["before"][0], measured["after"][0]),
        "optimized_module": str(out.resolve()),
    }
    if args.emit_code:
        with output_file(args.emit_code, "--emit-code") as code:
            code.write_text(_readable_code(optimized, pass_report.applied, args.model))
        result["emitted_code"] = str(code.resolve())
    if args.json:
        write_json(args.json, result)
    # Said before the tables: checks on synthetic data say nothing about real images.
    print(f"Input {'x'.join(map(str, shape))}: {source}")
    report_view.print_optimize_report(result)
    return 0
