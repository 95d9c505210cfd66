"""Plain helpers shared by tests (import as ``from support import ...``); fixtures live in conftest.py."""

from __future__ import annotations

import importlib.util
import os
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg" / "cifar10-jpeg.tar.xz"
EXAMPLES = REPO / "examples"
EXAMPLE_FILES = sorted(p.name for p in EXAMPLES.glob("*.py"))


def real_data_path() -> Path | None:
    """Where real CIFAR-10 is: $FASTGRAPH_DATA, else the shared JPEG archive, else None."""
    env = os.environ.get("FASTGRAPH_DATA")
    if env:
        return Path(env)
    return SHARED_ARCHIVE if SHARED_ARCHIVE.exists() else None


def stop_at(*, epoch: int | None = None, step: int | None = None):
    """A training ``Reporter`` that raises KeyboardInterrupt, as Ctrl-C would (the trainer then
    writes its checkpoint), after ``step`` steps of the whole training or at the end of
    epoch ``epoch`` (1-based)."""
    from fastgraph.training.loop import Reporter

    class StopAt(Reporter):
        steps = 0

        def step(self, run, step_in_epoch, steps_in_epoch):
            self.steps += 1
            if step is not None and self.steps == step:
                raise KeyboardInterrupt

        def epoch_end(self, run, record):
            if epoch is not None and record.epoch == epoch:
                raise KeyboardInterrupt

    return StopAt()


def build_example(name: str):
    """The ``nn.Module`` that ``examples/<name>`` builds (``build_model()``)."""
    return runpy.run_path(str(EXAMPLES / name))["build_model"]()


def narrow_resnet9_source(widths=(8, 16, 32, 64)) -> str:
    """The text of ``examples/resnet9.py`` (Page's ResNet-9, conv -> BN -> ReLU blocks)
    building the network at channel ``widths`` instead of (64, 128, 256, 512): at an
    eighth of the width a step takes a few ms per image on a CPU."""
    return (EXAMPLES / "resnet9.py").read_text().replace(
        "def build_model():\n    return ResNet9()",
        f"def build_model():\n    return ResNet9(width={tuple(widths)!r})")


def write_model(folder: Path, widths=(16, 32, 64, 128), name: str = "model.py") -> Path:
    """Write :func:`narrow_resnet9_source` at ``widths`` to ``folder/name``; return the path."""
    path = folder / name
    path.write_text(narrow_resnet9_source(widths))
    return path


# Page's bag of tricks, shortened: whitening, pool before BN, CELU, frozen BN scales and,
# optionally, ghost BN and the fused BN+CELU kernel; a one-cycle lr over the few steps a
# CPU test can afford.
RECIPE = """\
name = "cpu-check"
title = "Page-style recipe shortened for CPU tests"
sources = ["tests"]
model = "model.py"

[train]
epochs = {epochs}
batch_size = {batch_size}
label_smoothing = 0.2

[optimizer]
lr = {lr}
momentum = 0.9
nesterov = true
weight_decay = 5e-4

[schedule]
knots = [0.0, 0.25, 1.0]
values = [0.1, 1.0, 0.0]

[ema]
enabled = {ema}
decay = 0.9
every = 2

[augment]
pad = 2
flip = "random"
cutout = {cutout}

[eval]
tta_level = 1
batch_size = 500
model = "{eval_model}"

[[passes]]
name = "whitening"
kernel_size = 3
eps = 1e-2
images = {whitening_images}

[[passes]]
name = "pool_before_bn"

[[passes]]
name = "swap_activation"
to = "celu"
alpha = 0.075

[[passes]]
name = "freeze_bn_scale"
"""


def write_recipe(folder: Path, *, epochs=2, batch_size=128, lr=0.4, ema=False, cutout=0,
                 whitening_images=2000, ghost_batch_size: int | None = 32, fuse=False) -> Path:
    """Write the shortened Page recipe (:data:`RECIPE`) to ``folder/recipe.toml``; return the path.

    ``ema`` also makes the EMA the evaluated model; ``ghost_batch_size`` None leaves ghost
    batch norm out; ``fuse`` adds ``fuse_bn_activation`` last (BN + CELU on the Triton kernel).
    """
    text = RECIPE.format(epochs=epochs, batch_size=batch_size, lr=lr, ema=str(ema).lower(), cutout=cutout,
                         eval_model="ema" if ema else "trained", whitening_images=whitening_images)
    if ghost_batch_size is not None:
        text += f'\n[[passes]]\nname = "ghost_batchnorm"\nghost_batch_size = {ghost_batch_size}\n'
    if fuse:
        text += '\n[[passes]]\nname = "fuse_bn_activation"\n'
    path = folder / "recipe.toml"
    path.write_text(text)
    return path


def cli_error(capsys, *argv) -> str:
    """Run the CLI (``capsys`` is pytest's fixture); assert exit 2 and exactly one line on
    stderr; return that line."""
    from fastgraph.cli.main import main

    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fastgraph: error: ")
    return lines[0]


# Model files of the shapes fastgraph must refuse or handle: a small conv net whose forward
# returns RETURN, with ``logits`` (N, num_classes), ``features`` (N, 8) and ``aux`` (N, 4) in
# scope (``outputs_model("(logits, features)")``), and a net without trainable parameters.
_OUTPUTS_MODEL = """\
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)
        self.aux = nn.Linear(8, 4)

    def forward(self, x):
        features = self.pool(torch.relu(self.conv(x))).flatten(1)
        logits, aux = self.fc(features), self.aux(features)
        return RETURN


def model():
    return Net()
"""

NO_PARAMETERS_MODEL = """\
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.flat = nn.Flatten()
        self.register_buffer("w", torch.randn(3 * 32 * 32, 10) * 0.01)

    def forward(self, x):
        return self.flat(x) @ self.w


def model():
    return Net()
"""


def outputs_model(returned: str) -> str:
    """The source of a model file whose forward returns ``returned`` (see above)."""
    return _OUTPUTS_MODEL.replace("RETURN", returned)


def load_script(relative: str, name: str):
    """The repository file ``relative`` (a bench script, not a package module) imported as
    module ``name``, registered in ``sys.modules`` (dataclasses look their module up there)."""
    spec = importlib.util.spec_from_file_location(name, REPO / relative)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
