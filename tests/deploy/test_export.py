"""`fastgraph export` end to end on real CIFAR-10: ONNX with TTA in the graph, verified by ONNX
Runtime against PyTorch; weights from a state_dict and from a training checkpoint; the errors."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fastgraph.cli.main import main
from fastgraph.core.loading import load_model
from fastgraph.data import normalize
from support import EXAMPLES, cli_error, write_model, write_recipe

onnx = pytest.importorskip("onnx", reason="extra 'export' (onnx) not installed")
ort = pytest.importorskip("onnxruntime", reason="extra 'export' (onnxruntime) not installed")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cifar10):
    """(model file, state_dict file, eval-mode model): narrow ResNet-9 after 8 SGD steps on real images."""
    folder = tmp_path_factory.mktemp("export")
    model_path = write_model(folder, (8, 16, 32, 64), "narrow_resnet9.py")
    torch.manual_seed(0)
    model = load_model(model_path)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        idx = torch.randint(0, len(cifar10.train_images), (64,), generator=g)
        loss = F.cross_entropy(model(normalize(cifar10.train_images[idx])), cifar10.train_labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    weights = folder / "weights.pt"
    torch.save(model.state_dict(), weights)
    return model_path, weights, model.eval()


def spread(cifar10, n):
    """The ``n`` test images (of all classes: the test set is stored class by class) export verifies on."""
    from fastgraph.deploy.pipeline import spread_indices

    index = spread_indices(n, len(cifar10.test_images))
    return normalize(cifar10.test_images[index]), cifar10.test_labels[index]


def export(tmp_path, data_path, *argv) -> dict:
    js = tmp_path / "export.json"
    assert main(["export", *map(str, argv), "--json", str(js), "--data", data_path]) == 0
    return json.loads(js.read_text())


def test_onnx_with_flip_tta_agrees_with_pytorch_on_real_images(trained, tmp_path, data_path, cifar10):
    model_path, weights, model = trained
    out = tmp_path / "narrow.onnx"
    record = export(tmp_path, data_path, model_path, "--checkpoint", weights, "--format", "onnx",
                    "--tta", "flip", "--verify-images", 256, "--out", out)

    v = record["verification"]
    # On 256 images 0.05 points of accuracy is less than one image: the check demands the
    # same number of correct images from ONNX Runtime and PyTorch.
    assert v["images"] == 256 and v["passed"]
    assert v["accuracy_engine"] == v["accuracy_pytorch"] and v["top1_agreement"] == 1.0
    assert v["max_abs_logit_diff"] < 1e-4 and v["max_abs_logit_diff_other_batch"] < 1e-4
    engine = record["engine"]
    assert engine["exporter"] == "torch.export (dynamo=True)" and engine["fallback_reason"] is None
    assert engine["opset"] >= 17 and engine["dynamic_batch"] and engine["provider"] == "CPUExecutionProvider"
    assert "Slice" in engine["operators"]  # torch.flip: ONNX has no Flip op
    status = {p["name"]: (p["status"], p["rewrites"]) for p in record["passes"]}
    assert status["fold_bn"] == ("applied", 8) and status["tta_flip"] == ("applied", 1)
    onnx.checker.check_model(str(out), full_check=True)

    # Independently of the command: the trained model with the flip TTA written out by
    # hand has the accuracy the command reports, and ONNX Runtime reproduces its logits at
    # two batch sizes.
    x, y = spread(cifar10, 256)
    with torch.no_grad():
        plain = model(x)
        expected = (plain + model(torch.flip(x, [-1]))) / 2
    assert (expected.argmax(1) == y).double().mean().item() == v["accuracy_pytorch"]
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for n in (1, 37):
        got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x[:n].numpy()})[0])
        torch.testing.assert_close(got, expected[:n], rtol=1e-4, atol=1e-4)
    assert (plain - expected).abs().max() > 1e-3  # the engine carries the TTA, not the plain model


def test_training_checkpoint_exports_the_model_the_trainer_evaluated(tmp_path, data_path, cifar10):
    from fastgraph.training.loop import TrainOptions, train
    from fastgraph.training.recipes import load_recipe

    # The training graph differs from the model file: patch whitening, pool before BN, CELU,
    # frozen BN scales and the fused BN+CELU kernel; the EMA is evaluated.
    model_path = write_model(tmp_path, (8, 16, 32, 64))
    recipe = write_recipe(tmp_path, epochs=1, batch_size=64, ema=True, whitening_images=1000,
                          ghost_batch_size=None, fuse=True)
    torch.manual_seed(0)
    result = train(TrainOptions(model_path=str(model_path), recipe=load_recipe(str(recipe)),
                                subset=256, test_subset=100, data=data_path,
                                checkpoint_dir=str(tmp_path / "run")))
    out = tmp_path / "trained.onnx"
    record = export(tmp_path, data_path, model_path, "--checkpoint", tmp_path / "run", "--verify-images", 200,
                    "--out", out)

    assert record["weights"]["kind"] == "training checkpoint" and record["weights"]["weights"] == "ema"
    assert record["weights"]["finished"] is True and record["weights"]["epochs"] == 1
    status = {p["name"]: p["status"] for p in record["passes"]}
    assert status["reference_ops"] == "applied"  # the fused BN+CELU kernels went back to BN + CELU
    assert status["tta_flip"] == "applied"
    assert status["fuse_whitening"] == "applied"  # the whitening conv and the 1x1 conv became one conv
    assert "Celu" in record["engine"]["operators"] and record["verification"]["passed"]

    evaluated = result.model.eval()  # the trainer's EMA module, fused kernels and all
    assert any(type(m).__name__ == "BatchNormActivation" for m in evaluated.modules())
    x, _ = spread(cifar10, 50)
    with torch.no_grad():
        expected = (evaluated(x) + evaluated(torch.flip(x, [-1]))) / 2
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_fixed_batch_fp16_with_translate_tta(trained, tmp_path, data_path):
    model_path, weights, _ = trained
    out = tmp_path / "fixed.onnx"
    record = export(tmp_path, data_path, model_path, "--checkpoint", weights, "--batch", 50, "--precision",
                    "fp16", "--tta", "flip-translate", "--verify-images", 120, "--out", out)
    assert not record["engine"]["dynamic_batch"] and record["batch"] == 50
    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [50, 3, 32, 32]
    v = record["verification"]
    assert v["passed"] and v["top1_agreement"] >= 0.99
    assert 1e-6 < v["max_abs_logit_diff"] < 0.05  # fp16 engine against the fp32 graph: rounding, no more
    assert record["passes"][-1]["name"] == "tta_flip"


class BnCelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.CELU(0.3)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.act(self.bn(self.conv(x))).mean((2, 3)))


def test_reference_ops_swap_fused_kernels_back_exactly(real_batch):
    from fastgraph.deploy.pipeline import reference_ops
    from fastgraph.passes import get

    torch.manual_seed(0)
    model = BnCelu()
    x, y = real_batch
    with torch.no_grad():  # running statistics of real images, so eval-mode BN is not the identity
        model.train()(x)
    fused = get("fuse_bn_activation").fn(fx.symbolic_trace(model)).eval()
    assert any(type(m).__name__ == "BatchNormActivation" for m in fused.modules())
    swapped = reference_ops(fused)
    assert not any(type(m).__name__ == "BatchNormActivation" for m in swapped.modules())
    assert type(swapped.get_submodule("bn")) is nn.BatchNorm2d
    assert swapped.state_dict().keys() == fused.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(swapped.double()(x.double()), fused.double()(x.double()),
                                   rtol=1e-10, atol=1e-10)
    plain = fx.symbolic_trace(BnCelu())
    assert reference_ops(plain) is plain  # nothing fused: the input comes back


def test_checkpoint_of_another_shape_names_the_key_and_both_shapes(trained, tmp_path, capsys, data_path):
    model_path, _, _ = trained
    wider = tmp_path / "wider.pt"
    ns = {}
    exec(compile((EXAMPLES / "resnet9.py").read_text(), "resnet9.py", "exec"), ns)
    torch.save(ns["ResNet9"](width=(16, 16, 32, 64)).state_dict(), wider)
    line = cli_error(capsys, "export", str(model_path), "--checkpoint", str(wider), "--data", data_path,
                     "--out", str(tmp_path / "x.onnx"))
    assert str(wider) in line and "'prep.0.weight'" in line
    assert "(16, 3, 3, 3) in the checkpoint" in line and "(8, 3, 3, 3) in the model" in line


def test_missing_or_corrupt_checkpoint_is_named(trained, tmp_path, capsys, data_path):
    model_path, _, _ = trained
    missing = tmp_path / "nowhere.pt"
    line = cli_error(capsys, "export", str(model_path), "--checkpoint", str(missing), "--data", data_path)
    assert str(missing) in line and "not found" in line
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a PyTorch file" * 10)
    line = cli_error(capsys, "export", str(model_path), "--checkpoint", str(corrupt), "--data", data_path)
    assert str(corrupt) in line and "cannot read checkpoint" in line


def test_api_weights_choice_without_a_checkpoint_is_refused_before_any_work(trained, tmp_path):
    from fastgraph import export
    from fastgraph.core.errors import UserError

    _, _, model = trained
    out = tmp_path / "net.onnx"
    for choice in ("trained", "ema"):  # else the module's own weights went out as if chosen
        with pytest.raises(UserError, match=f"--weights {choice} .*--checkpoint"):
            export(model, out, weights=choice, data=tmp_path / "no-data")
    assert not out.exists()


@pytest.mark.skipif(importlib.util.find_spec("torch_tensorrt") is not None,
                    reason="torch_tensorrt is installed: the missing-extra error cannot occur")
def test_tensorrt_without_torch_tensorrt_names_the_extra(trained, capsys):
    model_path, _, _ = trained
    line = cli_error(capsys, "export", str(model_path), "--format", "tensorrt")
    assert "torch_tensorrt" in line and "pip install 'fastgraph[gpu]'" in line


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("torch_tensorrt") is None or not torch.cuda.is_available(),
                    reason="TensorRT export needs torch_tensorrt (pip install 'fastgraph[gpu]') "
                           "and a CUDA GPU")
def test_tensorrt_engine_is_saved_reloaded_and_verified(trained, tmp_path, data_path):
    model_path, weights, _ = trained
    record = export(tmp_path, data_path, model_path, "--checkpoint", weights, "--format", "tensorrt",
                    "--verify-images", 1000, "--out", tmp_path / "narrow.ep")
    v = record["verification"]
    assert v["passed"] and v["top1_agreement"] >= 0.999 and record["engine"]["dynamic_batch"]
