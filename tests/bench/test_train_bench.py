"""The non-GPU parts of bench/train_cifar10.py: it refuses without CUDA, writes our data in
airbench's format, reads airbench94's printed result, and computes the time ratios."""

from __future__ import annotations

import pytest
import torch

from support import load_script

bench = load_script("bench/train_cifar10.py", "bench_train_cifar10")

# The header and final row airbench 0.1.8's print_training_details prints for one run
# (utils.py: "|  %s  " per column, values right-justified to the header, 4 decimals).
AIRBENCH_OUTPUT = """\
------------------------------------------------------------------------------------------------------
|  run     |  epoch  |  train_loss  |  train_acc  |  val_acc  |  tta_val_acc  |  total_time_seconds  |
------------------------------------------------------------------------------------------------------
|       0  |      9  |      1.0123  |     0.9000  |   0.9351  |               |              3.1000  |
|          |   eval  |      1.0123  |     0.9000  |   0.9351  |       0.9412  |              3.8312  |
------------------------------------------------------------------------------------------------------
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_refuses_without_cuda_in_one_line(capsys):
    assert bench.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a CUDA GPU" in err[0]


def test_reads_airbench_result_row():
    assert bench.parse_airbench_table(AIRBENCH_OUTPUT) == (0.9412, 3.8312)
    with pytest.raises(bench.BenchError, match="no 'eval' row"):
        bench.parse_airbench_table(AIRBENCH_OUTPUT.replace("eval", "   9"))


def test_exports_airbench_format(tmp_path, cifar10):
    class Small:  # the first images only: the format is what is checked
        train_images, train_labels = cifar10.train_images[:20], cifar10.train_labels[:20]
        test_images, test_labels = cifar10.test_images[:10], cifar10.test_labels[:10]
        classes = cifar10.classes

    record = bench.export_for_airbench(Small, tmp_path, seed=5)
    assert record["train_order_seed"] == 5
    order = bench.airbench_train_order(20, 5)  # the training set is written shuffled
    train = torch.load(tmp_path / "cifar10" / "train.pt", weights_only=True)
    assert train["images"].shape == (20, 32, 32, 3) and train["images"].dtype == torch.uint8
    assert torch.equal(train["images"].permute(0, 3, 1, 2), Small.train_images[order])  # NHWC, same pixels
    assert torch.equal(train["labels"], Small.train_labels[order])
    assert train["classes"] == list(cifar10.classes)
    assert torch.load(tmp_path / "cifar10" / "test.pt", weights_only=True)["images"].shape == (10, 32, 32, 3)


def test_ratio_is_time_to_airbench_accuracy_over_airbench_time():
    def method(acc, secs, reached_at=None):
        target = {"reached": reached_at is not None, "seconds": reached_at}
        return {"model": "m", "summary": {"tta_acc": bench._stats(acc), "seconds": bench._stats(secs),
                                          "target": target}}

    methods = bench.summarize({"airbench94": method([0.94, 0.94], [4.0, 4.0]),
                               "fast": method([0.945], [3.5], reached_at=3.0),
                               "resnet20_seed_baseline": method([0.91], [500.0])})
    assert methods["airbench94"]["ratio"] == 1.0
    assert methods["fast"]["ratio"] == pytest.approx(0.75)
    assert methods["resnet20_seed_baseline"]["ratio"] is None
    table = bench.markdown_table(methods, {"device": "GPU", "torch": "2", "commit": "abc", "date": "d",
                                           "timing_method": "CUDA events", "data": "x", "airbench": "0.1.8"})
    assert "| fast | m | 1 | 94.50 ± 0.00 |" in table and "not reached" in table
    stem = bench.result_stem("NVIDIA H100 80GB HBM3", "2026-01-02")
    assert stem == "train_cifar10-nvidia-h100-80gb-hbm3-2026-01-02"


def test_bad_assignment_is_a_one_line_error():
    with pytest.raises(bench.BenchError, match="RECIPE=VALUE"):
        bench.parse_assignments(["resnet56=3"], int, "--runs-for")
