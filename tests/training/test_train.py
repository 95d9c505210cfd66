"""Training on real CIFAR-10 on the CPU: a real learning signal through the whole flow
(load -> trace -> recipe passes -> device-resident augmentation -> SGD -> plain and TTA
evaluation), and the parts it is built from checked against their definitions."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fastgraph.core.errors import UserError
from fastgraph.training.batches import balanced_subset
from fastgraph.training.loop import TrainOptions, train
from fastgraph.training.recipes import load_recipe
from support import real_data_path, write_model, write_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def test_short_training_learns_real_cifar10(tmp_path, cifar10, capsys):
    # ResNet-9 layout at widths 16/32/64/128 with Page's passes, 2 epochs over 2,500 real
    # training images (250 per class), batch 128, evaluated on 1,000 test images.
    # Measured on the shared 2-core CPU, one thread: 37.0% plain / 37.5% flip-TTA accuracy
    # at seed 0 (39.4% / 39.9% at seed 1; chance is 10%), about 20 s. The 30% bar leaves
    # room for seed, thread-count and BLAS noise.
    from fastgraph.cli.main import main

    model, recipe = write_model(tmp_path), write_recipe(tmp_path, epochs=2, batch_size=128)
    out = tmp_path / "result.json"
    code = main(["train", str(model), "--recipe", str(recipe), "--subset", "2500",
                 "--test-subset", "1000", "--no-progress-eval", "--data", str(real_data_path()),
                 "--json", str(out)])
    assert code == 0
    record = json.loads(out.read_text())
    run = record["runs"][0]
    assert run["tta_acc"] >= 0.30 and run["test_acc"] >= 0.30, run
    assert run["epochs"][0]["tta_acc"] is None  # --no-progress-eval: only the last is evaluated
    assert run["epochs"][-1]["train_loss"] < run["epochs"][0]["train_loss"]
    applied = [p["name"] for p in run["passes"]["passes"] if p["status"] == "applied"]
    assert applied == ["whitening", "pool_before_bn", "swap_activation", "freeze_bn_scale", "ghost_batchnorm"]
    phases = run["phases"]["phases"]
    assert phases["passes"]["counted"] and phases["train"]["counted"] and phases["tta eval"]["counted"]
    assert not phases["model build"]["counted"] and not phases["eval"]["counted"]
    assert run["seconds"] == pytest.approx(run["phases"]["counted_seconds"])
    for key in ("torch", "device", "commit", "timing_method", "summary", "hyperparameters"):
        assert key in record
    assert record["summary"]["tta_acc"]["n"] == 1
    table = capsys.readouterr().out
    assert "TTA acc" in table and "counted seconds" in table


def test_balanced_subset_takes_the_first_images_of_each_class(cifar10):
    labels = cifar10.train_labels  # the JPEG layout is sorted by class: the first N are one class
    idx = balanced_subset(labels, 25)
    counts = torch.bincount(labels[idx], minlength=10)
    assert counts.tolist() == [3, 3, 3, 3, 3, 2, 2, 2, 2, 2]
    for c in range(10):  # the first images of each class, in order
        first = torch.nonzero(labels == c).flatten()[: counts[c]]
        assert set(first.tolist()) <= set(idx.tolist())
    assert torch.equal(idx, idx.sort().values)


def test_augmenter_is_seeded_and_restores_its_state(cifar10):
    from fastgraph.data import CIFAR10_MEAN, CIFAR10_STD
    from fastgraph.training.augmentation import DeviceAugmenter

    images, labels = cifar10.train_images[:300], cifar10.train_labels[:300]

    def make(seed):
        return DeviceAugmenter(images, labels, batch_size=64, pad=2, pad_mode="reflect", flip="alternate",
                               cutout=8, mean=CIFAR10_MEAN, std=CIFAR10_STD, seed=seed)

    a, b = make(1), make(1)
    assert a.steps_per_epoch == 4
    first = [x for x, _ in a.epoch(0)]
    assert all(torch.equal(x, y) for x, (y, _) in zip(first, b.epoch(0), strict=True))
    state = a.state_dict()
    second = [(x, y) for x, y in a.epoch(1)]
    c = make(2)
    assert not torch.equal(next(iter(c.epoch(0)))[0], first[0])  # another seed, other batches
    c.load_state_dict(state)
    resumed = list(c.epoch(1, skip=2))  # resuming after 2 batches of epoch 1
    assert len(resumed) == 2
    for (x, y), (rx, ry) in zip(second[2:], resumed, strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    x, y = second[0]
    assert x.dtype == torch.float32 and x.shape == (64, 3, 32, 32) and y.dtype == torch.int64
    assert abs(float(x.mean())) < 0.5  # normalised


def test_weight_average_is_the_ema_of_its_definition():
    from fastgraph.training.optim import WeightAverage

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    ema = WeightAverage(net, decay=0.9, every=2, warmup_power=1.0, lookahead=False)
    expected = {k: v.clone() for k, v in net.state_dict().items() if v.is_floating_point()}
    total = 6
    for step in range(1, total + 1):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        net(torch.randn(5, 4))  # moves the BN running statistics
        ema.maybe_update(net, step, total)
        if step % 2 == 0:
            decay = 0.9 ** 2 * (step / total) ** 1.0
            for k, v in net.state_dict().items():
                if k in expected:
                    expected[k] = decay * expected[k] + (1 - decay) * v
    got = ema.averaged.module.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v)
    look = WeightAverage(net, decay=0.9, every=1, warmup_power=0.0, lookahead=True)
    with torch.no_grad():
        net[0].weight.add_(1.0)
    look.maybe_update(net, 1, 10)
    torch.testing.assert_close(net[0].weight, look.averaged.module[0].weight)  # copied back


def test_conv_muon_steps_conv_filters_like_muon_on_their_matrices():
    from fastgraph.training.optim import ConvMuon

    torch.manual_seed(0)
    layouts = (torch.contiguous_format, torch.channels_last)
    for weight_layout in layouts:
        for grad_layout in layouts:  # cuDNN may hand back a gradient in the other layout
            conv = torch.nn.Conv2d(4, 6, 3).to(memory_format=weight_layout)
            ref = torch.nn.Parameter(conv.weight.detach().reshape(6, -1).clone())
            before = ref.detach().clone()
            grad = torch.randn(6, 4, 3, 3)
            conv.weight.grad = grad.clone().contiguous(memory_format=grad_layout)
            ref.grad = grad.reshape(6, -1).clone()
            ConvMuon([conv.weight], lr=0.1, momentum=0.6, nesterov=True, ns_steps=3, weight_decay=0.0,
                     normalize_weights=False).step()
            torch.optim.Muon([ref], lr=0.1, momentum=0.6, nesterov=True, ns_steps=3, weight_decay=0.0).step()
            # Newton-Schulz runs in bf16: column order changes the rounding, not the result
            torch.testing.assert_close(conv.weight.detach().reshape(6, -1), ref.detach(), rtol=0, atol=1e-3)
            assert (ref.detach() - before).abs().max() > 0.01  # a real step was compared
    conv.weight.grad = torch.randn(6, 4, 3, 3)
    ConvMuon([conv.weight], lr=0.0, momentum=0.6, nesterov=True, ns_steps=3, weight_decay=0.0,
             normalize_weights=True).step()
    assert float(conv.weight.detach().norm()) == pytest.approx(math.sqrt(6), rel=1e-5)


def test_param_groups_follow_the_pass_hints(tmp_path, real_batch):
    from fastgraph.core.loading import load_model
    from fastgraph.core.pass_manager import run_passes
    from fastgraph.core.tracing import trace
    from fastgraph.training.optim import build_optimizers
    from fastgraph.training.recipes import torch_hyperparameters

    recipe = load_recipe("page2019")
    gm = trace(load_model(write_model(tmp_path)))
    gm, _ = run_passes(gm, ["freeze_bn_scale"], mode="train", batch=real_batch, options={})
    (sgd,) = build_optimizers(gm, recipe, torch_hyperparameters(recipe, 512))
    by_param = {id(p): g for g in sgd.param_groups for p in g["params"]}
    named = dict(gm.named_parameters())
    assert id(named["prep.1.weight"]) not in by_param  # frozen BN scale: not optimised
    assert by_param[id(named["prep.1.bias"])]["peak_lr"] == pytest.approx(64.0)
    assert by_param[id(named["prep.1.bias"])]["weight_decay"] == pytest.approx(5e-4 / 64)
    assert by_param[id(named["prep.0.weight"])]["peak_lr"] == pytest.approx(1.0)
    assert sgd.defaults["nesterov"]


def test_bad_options_are_one_line_errors(tmp_path, capsys, cifar10):
    from support import cli_error

    model, recipe = write_model(tmp_path), write_recipe(tmp_path)
    data = str(real_data_path())
    assert "between 1 and 50000" in cli_error(capsys, "train", str(model), "--recipe", str(recipe),
                                              "--subset", "60000", "--data", data)
    assert "fewer than one batch" in cli_error(capsys, "train", str(model), "--recipe", str(recipe),
                                               "--subset", "100", "--data", data)
    assert "--resume needs --checkpoint" in cli_error(capsys, "train", str(model), "--recipe",
                                                      str(recipe), "--resume")
    (tmp_path / "a_file").write_text("")
    assert "cannot write checkpoints" in cli_error(capsys, "train", str(model), "--recipe", str(recipe),
                                                   "--checkpoint", str(tmp_path / "a_file" / "ck"))
    assert "model file not found" in cli_error(capsys, "train", str(tmp_path / "none.py"), "--recipe",
                                               str(recipe), "--subset", "256", "--data", data)
    with pytest.raises(SystemExit) as info:
        from fastgraph.cli.main import main

        main(["train", str(model), "--recipe", str(recipe), "--target", "140"])
    assert info.value.code == 2
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            train(TrainOptions(model_path=str(model), recipe=load_recipe(str(recipe)), device="cuda"))
