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

import copy

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves

from fastgraph.core.errors import UserError

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


def step_fn(gm: fx.GraphModule, mode: str, x: torch.Tensor, y: torch.Tensor, device: torch.device,
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


