"""Compiled training on the CPU: the warm-up compiles what the timed phases run (bf16
batches from the run's own augmenter, a full and the last, smaller test batch), leaves the
run's state as it was, a compile inside a counted phase is an error, and a parameter
group with ``train_epochs`` stops changing from that epoch on without a recompile.

The backend is ``aot_eager``: it goes through Dynamo's guards and AOTAutograd as Inductor
does, so the same input mismatches recompile, but compiles a narrow ResNet-9 in seconds
(Inductor takes over a minute on a 2-core CPU)."""

from __future__ import annotations

import tomllib

import pytest
import torch

from fastgraph.core.timing import CompiledInCountedPhase, Timer
from fastgraph.training.loop import Reporter, Trainer, TrainOptions, train
from fastgraph.training.recipes import validate
from support import EXAMPLE_FILES, write_model, write_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def _options(tmp_path, data_path, epochs=1, **kw) -> TrainOptions:
    """A narrow ResNet-9 with the shortened Page recipe of the other training tests, less
    the data-dependent whitening (not what is checked here), with eval batches of 128 so
    that 300 test images end in a smaller batch of 44; bf16, compiled with aot_eager."""
    data = tomllib.loads(write_recipe(tmp_path, epochs=epochs, batch_size=64, lr=0.2).read_text())
    data["passes"] = [p for p in data["passes"] if p["name"] != "whitening"]
    data["eval"]["batch_size"] = 128
    model = write_model(tmp_path, widths=(8, 16, 32, 64))
    kw = {"subset": 512, "test_subset": 300, "precision": "bf16", "compile": True,
          "compile_backend": "aot_eager", "data": data_path, **kw}
    return TrainOptions(model_path=str(model), recipe=validate("compile-check", data), **kw)


def test_compiled_bf16_run_compiles_only_in_the_warm_up(tmp_path, data_path):
    result = train(_options(tmp_path, data_path))
    run = result.to_dict()["runs"][0]  # as the JSON record holds it
    phases, compiles = run["phases"]["phases"], run["compiles"]
    assert compiles["warm-up"] >= 1 and not phases["warm-up"]["counted"]
    for name in ("passes", "train", "tta eval"):
        assert phases[name]["counted"] and compiles[name] == 0, (name, compiles)
    assert result.settings["compile_backend"] == "aot_eager" and result.settings["precision"] == "bf16"


def test_compile_inside_the_timed_phase_is_an_error(tmp_path, data_path, monkeypatch):
    # The old warm-up's fault: fp32 input while the run trains on bf16 batches.
    real = Trainer._warm_up_batches

    def fp32_batches(self, augmenter, steps=3):
        return [(x.float(), y) for x, y in real(self, augmenter, steps)]

    monkeypatch.setattr(Trainer, "_warm_up_batches", fp32_batches)
    with pytest.raises(CompiledInCountedPhase, match=r"run 1 epoch 1: .* inside counted phase 'train'"):
        train(_options(tmp_path, data_path))


def test_warm_up_leaves_the_run_as_it_was(tmp_path, data_path, monkeypatch):
    trainer = Trainer(_options(tmp_path, data_path))
    trainer._load_data(Timer("cpu"))
    warmed = trainer._start_run(0, [], None)
    rng_after_warm = torch.get_rng_state()
    assert warmed.timer.compiles()["warm-up"] >= 1
    x, _ = next(iter(warmed.augmenter.epoch(0, steps=1)))
    assert x.dtype == torch.bfloat16  # the CPU trains on batches of the autocast dtype too
    monkeypatch.setattr(Trainer, "_warm_up", lambda self, r: None)
    cold = trainer._start_run(0, [], None)  # the same seed, nothing run before
    assert torch.equal(torch.get_rng_state(), rng_after_warm)
    assert torch.equal(warmed.aug_state["generator"], cold.aug_state["generator"])
    a, b = warmed.module.state_dict(), cold.module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(p.grad is None for p in warmed.module.parameters())


def test_group_with_train_epochs_is_frozen_from_that_epoch_on(tmp_path, data_path, monkeypatch):
    # airbench's whitening bias: trained for its first N epochs, then left as it is. The
    # group is built by hand around the last layer's weight, weight decay on, so that
    # only lr 0 can keep it bit-identical; compiled, so that a recompile would raise.
    import fastgraph.training.loop as train_module

    held = {}

    def build(gm, recipe, hyper):
        params = [p for p in gm.parameters() if p.requires_grad]
        held["p"] = frozen = params[-1]
        rest = params[:-1]
        return [torch.optim.SGD(
            [{"params": rest, "lr": hyper.lr, "peak_lr": hyper.lr, "train_epochs": None},
             {"params": [frozen], "lr": hyper.lr, "peak_lr": hyper.lr, "train_epochs": 1}],
            lr=hyper.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)]

    class Snapshots(Reporter):
        def __init__(self):
            self.values = []

        def run_start(self, *args):
            self.values.append(held["p"].detach().clone())

        def epoch_end(self, run, record):
            self.values.append(held["p"].detach().clone())

    monkeypatch.setattr(train_module, "build_optimizers", build)
    snapshots = Snapshots()
    result = train(_options(tmp_path, data_path, epochs=3), snapshots)
    start, after_0, after_1, after_2 = snapshots.values
    assert (after_0 - start).abs().max() > 0  # epoch 0 (< train_epochs): it trains
    assert torch.equal(after_1, after_0) and torch.equal(after_2, after_0)  # epochs 1 and 2: frozen
    assert result.runs[0].compiles["train"] == 0  # lr 0 changes no guard: nothing recompiled


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_example_models_train_on_bf16_batches_under_cpu_autocast(name):
    # With --precision bf16 the CPU trains on bf16 batches (as CUDA does): every example
    # must take them under autocast, forward and backward, with finite gradients.
    import torch.nn.functional as F

    from support import build_example

    model = build_example(name).train()
    x = torch.randn(8, 3, 32, 32).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = F.cross_entropy(out.float(), torch.arange(8) % 10, label_smoothing=0.2)
    loss.backward()
    assert out.shape == (8, 1000 if name == "resnet50.py" else 10) and torch.isfinite(loss)  # ImageNet's
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_unknown_compile_backend_is_a_one_line_error(tmp_path):
    from fastgraph.core.errors import UserError

    with pytest.raises(UserError, match=r"compile backend must be one of .*inductor.*, got 'nope'"):
        Trainer(_options(tmp_path, None, compile_backend="nope"))
