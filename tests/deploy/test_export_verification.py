"""`fastgraph export` verification that a wrong engine cannot pass: logits held relative to
their own scale (small logits included), class order and TTA checked through the logits, not
only the accuracy; a model of another class count refused; what the engine expects recorded
in the file; a checkpoint written mid-training said to be one."""

from __future__ import annotations

import json

import pytest
import torch

from fastgraph.cli.main import main
from fastgraph.data import normalize
from support import write_model

onnx = pytest.importorskip("onnx", reason="extra 'export' (onnx) not installed")
ort = pytest.importorskip("onnxruntime", reason="extra 'export' (onnxruntime) not installed")

pytestmark = pytest.mark.usefixtures("one_thread")

# A small CIFAR model whose logits are small (a head scaled by 1e-3), and one with 1,000 classes.
SMALL = """\
import torch.nn.functional as F
from torch import nn


class Small(nn.Module):
    def __init__(self, classes={classes}):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3))) * {scale}


def build_model():
    return Small()
"""


def small_model(folder, *, classes=10, scale=1e-3):
    path = folder / f"small_{classes}.py"
    path.write_text(SMALL.format(classes=classes, scale=scale))
    return path


@pytest.fixture(scope="module")
def small_logits(tmp_path_factory, cifar10):
    """(flip-TTA logits, plain logits, labels) of the small model (1e-3 head) on 512 real test images."""
    from fastgraph.core.loading import load_model
    from fastgraph.core.pass_manager import verification_batch
    from fastgraph.core.tracing import trace
    from fastgraph.deploy.batches import pytorch_logits
    from fastgraph.deploy.pipeline import inference_graph, spread_indices
    from fastgraph.training.trained import spread_training_images

    torch.manual_seed(0)
    gm = trace(load_model(small_model(tmp_path_factory.mktemp("small"))))
    images, labels = spread_training_images(cifar10)
    batch = verification_batch(images, labels)
    index = spread_indices(512, len(cifar10.test_images))
    x, y = normalize(cifar10.test_images[index]), cifar10.test_labels[index]
    logits = {tta: pytorch_logits(inference_graph(gm, tta=tta, batch=batch)[0], x, torch.device("cpu"))
              for tta in ("flip", "none")}
    return logits["flip"], logits["none"], y


def test_an_engine_without_its_tta_fails_even_with_small_logits(small_logits):
    from fastgraph.deploy.pipeline import compare

    flip, plain, labels = small_logits
    assert flip.abs().max() < 0.05  # small logits: an absolute difference looks negligible
    # The images on which the TTA moves no top-1 (most of them): accuracy alone sees nothing there.
    same = flip.argmax(1) == plain.argmax(1)
    assert same.sum() > 400
    check = compare(flip[same], plain[same], labels[same])
    assert check["max_abs_logit_diff"] < 1e-4 and check["accuracy_diff"] == 0.0
    assert check["max_rel_logit_diff"] > 10 * check["logit_tolerance"] and not check["passed"]
    assert compare(flip, flip.clone(), labels)["passed"]


def test_an_engine_with_two_classes_swapped_fails_though_top1_agrees(small_logits):
    from fastgraph.deploy.pipeline import compare

    flip, _, labels = small_logits
    predicted = set(flip.argmax(1).tolist())
    never = [c for c in range(flip.shape[1]) if c not in predicted][:2]
    assert len(never) == 2  # a model that never predicts two classes: swapping them moves no argmax
    order = torch.arange(flip.shape[1])
    order[never] = order[never[::-1]]
    check = compare(flip, flip[:, order], labels)
    assert check["top1_agreement"] == 1.0 and check["accuracy_diff"] == 0.0
    assert not check["passed"]


def test_an_fp16_engine_is_held_to_its_own_tolerance(small_logits):
    from fastgraph.deploy.pipeline import LOGIT_TOLERANCE, compare

    flip, _, labels = small_logits
    rounded = flip.half().float()  # what fp16 logits alone lose: well within the fp16 tolerance
    assert compare(flip, rounded, labels, precision="fp16")["passed"]
    assert LOGIT_TOLERANCE["fp32"] < LOGIT_TOLERANCE["fp16"] <= 1e-2


def test_a_model_of_another_class_count_is_refused_in_one_line(tmp_path, data_path, capsys):
    out = tmp_path / "imagenet.onnx"
    code = main(["export", str(small_model(tmp_path, classes=1000, scale=1.0)), "--verify-images", "20",
                 "--out", str(out), "--data", data_path])
    assert code == 2 and not out.exists()
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fastgraph: error: ")]
    assert len(errors) == 1  # besides the untrained-weights line, one line: the reason
    assert "1000 logits per image" in errors[0] and "10 classes, 3x32x32" in errors[0]


def test_the_engine_file_and_report_record_the_input_it_expects(tmp_path, data_path, cifar10):
    out, js = tmp_path / "small.onnx", tmp_path / "small.json"
    assert main(["export", str(small_model(tmp_path)), "--verify-images", "64", "--batch", "8",
                 "--out", str(out), "--json", str(js), "--data", data_path]) == 0
    record = json.loads(js.read_text())
    expected = {"name": "images", "shape": [8, 3, 32, 32], "dtype": "float32"}
    assert {k: record["engine"]["input"][k] for k in expected} == expected
    assert record["engine"]["input"]["classes"] == list(cifar10.classes)
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    stored = json.loads(props["fastgraph.input"])
    assert stored == record["engine"]["input"] and props["fastgraph.tta"] == "flip"
    v = record["verification"]
    assert v["passed"] and v["max_rel_logit_diff"] <= v["logit_tolerance"] == 1e-4


def test_a_checkpoint_written_mid_training_is_said_to_be_one(tmp_path, data_path, capsys):
    from fastgraph.training.loop import TrainOptions, train
    from fastgraph.training.recipes import load_recipe
    from support import stop_at, write_recipe

    model_path = write_model(tmp_path, (8, 16, 32, 64))
    recipe = write_recipe(tmp_path, epochs=2, batch_size=64, whitening_images=500, ghost_batch_size=None)
    options = dict(model_path=str(model_path), recipe=load_recipe(str(recipe)), subset=128, test_subset=50,
                   data=data_path, checkpoint_dir=str(tmp_path / "run"))
    with pytest.raises(KeyboardInterrupt):
        train(TrainOptions(**options), stop_at(epoch=1))
    # (a finished checkpoint says so: test_export.py's trained checkpoint)
    js = tmp_path / "mid.json"
    assert main(["export", str(model_path), "--checkpoint", str(tmp_path / "run"), "--verify-images", "20",
                 "--out", str(tmp_path / "x.onnx"), "--json", str(js), "--data", data_path]) == 0
    weights, said = json.loads(js.read_text())["weights"], capsys.readouterr()
    assert weights["finished"] is False and weights["epoch"] == 1 and weights["epochs"] == 2
    assert "epoch 1 of 2: exporting weights of an unfinished training run" in said.err
    assert "training not finished" in said.out


def test_the_pytorch_reference_runs_in_ieee_float32_and_leaves_the_flags_as_they_were(real_batch):
    # On Ampere and later GPUs cuDNN convolutions default to TF32 (about 1e-3 relative): a
    # reference that loose could neither hold an fp32 engine to 1e-4 nor be held to it.
    from fastgraph.deploy.batches import pytorch_logits

    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
            return x.flatten(1)[:, :10]

    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        images, _ = real_batch
        logits = pytorch_logits(Probe(), images, torch.device("cpu"), chunk=32)
        assert torch.equal(logits, images.flatten(1)[:, :10])
        assert seen == [(False, False), (False, False)]  # both chunks
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_a_module_holding_its_tta_is_exported_with_it_once(real_batch, data_path, tmp_path):
    # fastgraph optimize --mode infer puts TTA in the graph; exported at the same level, the
    # engine computes the module as given, not the TTA of its TTA.
    import torch.fx as fx

    from fastgraph import export
    from fastgraph.passes import get

    torch.manual_seed(0)
    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    held = get("tta_flip").fn(fx.symbolic_trace(net), level=2)
    report = export(held, tmp_path / "net.onnx", tta="flip-translate", data=data_path, verify_images=100)
    assert report.passed and report.tta == "flip-translate"
    assert "tta_flip" not in [step["name"] for step in report.passes]
    images, _ = real_batch
    session = ort.InferenceSession(str(tmp_path / "net.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: images[:16].numpy()})
    torch.testing.assert_close(torch.from_numpy(logits), held(images[:16]), rtol=1e-4, atol=1e-5)
