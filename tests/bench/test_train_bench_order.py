"""bench/train_cifar10.py races airbench94 on fair terms: its training set is written in a
seeded shuffled order (airbench whitens from the file's first 5,000 images; our copy is
sorted by class), the seed is recorded, and the compiled variant reuses one network
compiled in place, as airbench94_compiled.py does. On the CPU, with a stand-in for the
airbench package where a GPU would be needed."""

from __future__ import annotations

import io
import os
import sys
import types
from pathlib import Path

import torch
from torch import nn

from support import load_script

bench = load_script("bench/train_cifar10.py", "bench_train_order")


def _fingerprints(images: torch.Tensor, labels: torch.Tensor) -> list[tuple[float, int]]:
    """(a float64 projection of each image's pixels, its label), sorted: equal lists mean the
    same image/label pairs in some order (a collision of two projections is vanishingly rare)."""
    weights = torch.rand(images[0].numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    keys = images.reshape(len(images), -1).to(torch.float64) @ weights
    return sorted(zip(keys.tolist(), labels.tolist(), strict=True))


def _written(folder: Path) -> dict:
    return torch.load(folder / "cifar10" / "train.pt", weights_only=True)


def test_airbench_training_set_is_a_seeded_shuffle_of_the_same_pairs(tmp_path, cifar10):
    assert torch.all(cifar10.train_labels[:5000] == cifar10.train_labels[0])  # our copy: class-sorted
    a, b, c = (bench.export_for_airbench(cifar10, tmp_path / name, seed=seed)
               for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    assert (a["train_order_seed"], c["train_order_seed"]) == (0, 1)
    first, again, other = (_written(tmp_path / name) for name in "abc")
    assert torch.equal(first["images"], again["images"]) and torch.equal(first["labels"], again["labels"])
    assert not torch.equal(first["labels"], other["labels"])  # another seed, another order
    counts = torch.bincount(first["labels"][:5000], minlength=10)
    assert counts.min() > 400, counts  # what airbench whitens from holds every class, about evenly
    pixels = first["images"].permute(0, 3, 1, 2)  # back from airbench's NHWC
    assert _fingerprints(pixels, first["labels"]) == _fingerprints(cifar10.train_images, cifar10.train_labels)
    test = torch.load(tmp_path / "a" / "cifar10" / "test.pt", weights_only=True)
    assert torch.equal(test["labels"], cifar10.test_labels)  # the test set as it is


class _Data:  # ten classes, sorted by class as an ImageFolder copy is
    train_images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    train_labels = torch.arange(10).repeat_interleave(4)
    test_images, test_labels = train_images[:10], train_labels[:10]
    classes = [str(i) for i in range(10)]


def _fake_airbench(calls: list) -> types.ModuleType:
    """The parts of airbench 0.1.8 that run_airbench uses; train94 prints its result table."""
    from test_train_bench import AIRBENCH_OUTPUT

    lib = types.SimpleNamespace(Conv=nn.Conv2d, BatchNorm=nn.BatchNorm2d)

    def make_net94():
        return nn.Sequential(nn.Conv2d(3, 4, 2), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))

    def train94(run=0, verbose=True, make_net=make_net94):
        labels = torch.load(Path("cifar10") / "train.pt", weights_only=True)["labels"]  # in airbench's folder
        calls.append(("train94", run, make_net(), labels))
        print(AIRBENCH_OUTPUT)

    def warmup94():
        calls.append(("warmup94", os.getcwd()))

    return types.SimpleNamespace(__version__="0.1.8", lib_airbench94=lib, make_net94=make_net94,
                                 train94=train94, warmup94=warmup94)


def test_airbench_record_names_its_order_seed_and_how_it_ran(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "airbench", _fake_airbench(calls))
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # its progress lines
    eager = bench.run_airbench(_Data, 2, tmp_path / "eager", seed=3)
    assert eager["train_order_seed"] == 3 and eager["compiled"] is False
    assert eager["reference"] == "airbench94"
    assert [c[0] for c in calls] == ["warmup94", "train94", "train94"]
    assert torch.equal(calls[1][3], _Data.train_labels[bench.airbench_train_order(40, 3)])
    assert [r["compiles"] for r in eager["runs"]] == [0, 0]

    calls.clear()
    compiled = bench.run_airbench(_Data, 2, tmp_path / "compiled", compiled=True, seed=3)
    assert compiled["compiled"] is True and compiled["compile_mode"] == "max-autotune"
    assert compiled["reference"] == "airbench94_compiled" and compiled["train_order_seed"] == 3
    # a whole warm-up run, then the runs, all on the one network compiled in place
    assert [c[:2] for c in calls] == [("train94", 0), ("train94", 0), ("train94", 1)]
    nets = [c[2] for c in calls]
    assert nets[0] is nets[1] is nets[2] and isinstance(nets[0], nn.Sequential)
    assert nets[0]._compiled_call_impl is not None  # nn.Module.compile: train94 still indexes it


def test_compiled_airbench_network_is_reinitialised_every_run(monkeypatch):
    fake = _fake_airbench([])
    make_net = bench.compiled_make_net94(fake)
    net = make_net()
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(7.0)  # as if trained
        net[1].running_mean.fill_(7.0)
    assert make_net() is net
    assert (net[0].weight != 7.0).all() and (net[3].weight != 7.0).all()  # conv, linear: fresh draws
    assert torch.equal(net[1].weight, torch.ones(4)) and torch.equal(net[1].running_mean, torch.zeros(4))


def test_table_and_json_say_which_airbench_each_row_is_held_against():
    def method(acc, secs, compiled, reached_at=None, reference=None):
        m = {"model": "m", "compiled": compiled, "compile_mode": "max-autotune" if compiled else None,
             "summary": {"tta_acc": bench._stats(acc), "seconds": bench._stats(secs),
                         "target": {"reached": reached_at is not None, "seconds": reached_at}}}
        return m if reference is None else {**m, "reference": reference}

    methods = bench.summarize({
        "airbench94": method([0.94], [4.0], False, reference="airbench94"),
        "airbench94_compiled": method([0.9402], [3.0], True, reference="airbench94_compiled"),
        "page2019": method([0.941], [9.0], False, reached_at=8.0, reference="airbench94"),
        "fast": method([0.945], [3.5], True, reached_at=1.5, reference="airbench94_compiled")})
    assert methods["fast"]["ratio"] == 0.5 and methods["fast"]["target"] == 0.9402
    assert methods["page2019"]["ratio"] == 2.0 and methods["page2019"]["target"] == 0.94
    table = bench.markdown_table(methods, {"device": "GPU", "torch": "2", "commit": "abc", "date": "d",
                                           "timing_method": "CUDA events", "data": "x", "airbench": "0.1.8",
                                           "airbench_train_order_seed": 0})
    assert "| airbench94_compiled |" in table and "| compiled (max-autotune) |" in table
    assert "| page2019 | m | 1 | 94.10 ± 0.00 | 94.10–94.10 | 9.000 | 94.00 | 8.000 | 2.00 | eager |" in table
    assert "shuffled with seed 0" in table
