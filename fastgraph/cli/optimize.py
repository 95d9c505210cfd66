"""``fastgraph optimize``: its options, and the run that prints the report and writes the files."""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from fastgraph.compiler.optimize import (
    CIFAR_SHAPE,
    DATA_PASS_IMAGES,
    DEFAULT_PASSES,
    SYNTHETIC_INPUT,
    measure_alternating,
    parse_input_shape,
    readable_code,
    resized,
    step_fn,
    synthetic_batch,
)
from fastgraph.core.devices import device_name, resolve_device
from fastgraph.core.errors import UserError
from fastgraph.core.outputs import check_outputs, output_file, write_json
from fastgraph.core.timing import compare_step_times
from fastgraph.perf.roofline import DEFAULT_PROFILE, per_image_costs


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


def run(args: argparse.Namespace) -> int:
    """Run ``fastgraph optimize``; returns the exit code (a ``UserError`` is one line, exit 2)."""
    from fastgraph import passes as registry
    from fastgraph.compiler import report as report_view
    from fastgraph.core.loading import load_model
    from fastgraph.core.pass_manager import VERIFY_IMAGES, run_passes, verification_batch
    from fastgraph.core.tracing import check_runs, check_trace, trace
    from fastgraph.data import load_cifar10, normalize, spread_indices
    from fastgraph.perf import roofline
    from fastgraph.training.trained import spread_training_images

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
        x, y = resized(normalize(data.test_images[index]), shape[1:]), data.test_labels[index]
        source = "real CIFAR-10 test images" + ("" if shape == CIFAR_SHAPE else
                                                 f", resized bilinearly to {shape[1]}x{shape[2]}")
    else:
        if needs_data:  # whitening's patch statistics of noise would whiten nothing
            raise UserError(f"pass {needs_data[0]} needs real images, and --input-shape "
                            f"{args.input_shape} has {shape[0]} channels, not CIFAR-10's 3")
        data = None
        x, y = synthetic_batch(max(batch_size, VERIFY_IMAGES), shape)
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
        options = {name: {"images": resized(images, shape[1:])} for name in needs_data}

    # The user's eager model is the reference: a trace that lost part of it (a no_grad
    # block, a train() override...) is refused here, naming the construct, before any pass.
    check_trace(model, gm, args.mode, verification_batch(x, y))
    optimized, pass_report = run_passes(gm, names, mode=args.mode, batch=verification_batch(x, y),
                                        options=options, costs=per_image_costs(example, batch_size))

    rows = []
    graphs = {"before": gm, "after": optimized}
    measured = measure_alternating(
        {label: step_fn(module, args.mode, x[:batch_size], y[:batch_size], device, args.precision)
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
            code.write_text(readable_code(optimized, pass_report.applied, args.model))
        result["emitted_code"] = str(code.resolve())
    if args.json:
        write_json(args.json, result)
    # Said before the tables: checks on synthetic data say nothing about real images.
    print(f"Input {'x'.join(map(str, shape))}: {source}")
    report_view.print_optimize_report(result)
    return 0
