"""`fastgraph optimize` end to end on real CIFAR-10: report, saved module, code, JSON, errors."""

from __future__ import annotations

import json

import pytest
import torch

from fastgraph import passes as registry
from fastgraph.cli.main import main
from fastgraph.core.loading import load_model
from fastgraph.data import normalize
from support import EXAMPLES, cli_error, write_model


@pytest.fixture
def small_resnet9(tmp_path):
    """examples/resnet9.py at an eighth of the width, so the end-to-end runs stay fast on a CPU."""
    return write_model(tmp_path, (8, 16, 32, 64), "small_resnet9.py")


def optimize(tmp_path, model, data_path, *extra):
    out, js, code = tmp_path / "opt.pt", tmp_path / "report.json", tmp_path / "opt_code.py"
    argv = ["optimize", str(model), "--data", data_path, "--batch-size", "8", "--steps", "1",
            "--out", str(out), "--json", str(js), "--emit-code", str(code), *extra]
    torch.manual_seed(0)  # the model file initialises its weights from the global RNG
    assert main(argv) == 0
    return out, json.loads(js.read_text()), code


def test_train_mode_verifies_and_writes_everything(tmp_path, small_resnet9, data_path, cifar10, capsys):
    out, report, code = optimize(tmp_path, small_resnet9, data_path)
    printed = capsys.readouterr().out
    assert "Passes" in printed and "Roofline" in printed and str(out) in printed

    (outcome,) = report["passes"]
    assert outcome["status"] == "applied" and outcome["rewrites"] == 3
    assert outcome["max_output_diff"] <= outcome["tolerance"]
    assert outcome["max_grad_diff"] is not None and outcome["max_grad_diff"] <= outcome["tolerance"]
    # act -> pool became pool -> act: the activation now reads a quarter of the elements
    assert outcome["bytes_after"] < outcome["bytes_before"]
    assert outcome["flops_after"] == outcome["flops_before"]
    before, after = report["roofline"]
    assert before["graph"] == "before" and after["graph"] == "after"
    assert after["measured_step_seconds"] > 0 and after["roofline_seconds"] > 0
    assert report["mode"] == "train" and report["device"] == "cpu"

    # The saved module is the rewritten graph and computes what the user's model computes.
    optimized = torch.load(out, weights_only=False)
    torch.manual_seed(0)  # the same initial weights optimize saw
    model = load_model(small_resnet9).train()
    x = normalize(cifar10.test_images[::625])  # 16 images, all classes
    torch.testing.assert_close(optimized.train()(x), model(x), rtol=1e-5, atol=1e-5)
    text = code.read_text()
    compile(text, str(code), "exec")
    assert "max_pool2d" in text or "MaxPool2d" in text


def test_infer_mode_folds_batchnorm_on_resnet20(tmp_path, data_path, cifar10):
    out, report, _ = optimize(tmp_path, EXAMPLES / "resnet20.py", data_path, "--mode", "infer")
    by_name = {p["name"]: p for p in report["passes"]}
    assert by_name["pool_before_activation"]["status"] == "no-op"  # ResNet-20 has no max-pool
    fold = by_name["fold_bn"]
    assert fold["status"] == "applied" and fold["rewrites"] == 19  # 19 conv -> BN pairs
    assert fold["bytes_after"] < fold["bytes_before"]
    optimized = torch.load(out, weights_only=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in optimized.modules())
    torch.manual_seed(0)
    model = load_model(EXAMPLES / "resnet20.py").eval()
    x = normalize(cifar10.test_images[::625])  # 16 images, all classes
    with torch.no_grad():
        torch.testing.assert_close(optimized(x), model(x), rtol=1e-4, atol=1e-5)


def _flip_sign(gm):
    """Claims to be exact but negates the logits: the manager must refuse it."""
    out = registry.copy_module(gm)
    (output,) = [n for n in out.graph.nodes if n.op == "output"]
    with out.graph.inserting_before(output):
        neg = out.graph.call_function(torch.neg, (output.args[0],))
    output.args = (neg,)
    return registry.finish(out, rewrites=1)


def test_a_wrong_exact_pass_is_refused_and_the_module_kept(tmp_path, small_resnet9, data_path,
                                                           monkeypatch):
    monkeypatch.setitem(registry.REGISTRY, "flip_sign",
                        registry.PassInfo("flip_sign", _flip_sign, True, ("train", "infer")))
    out, report, _ = optimize(tmp_path, small_resnet9, data_path,
                              "--passes", "flip_sign,pool_before_activation")
    refused, applied = report["passes"]
    assert refused["status"] == "refused" and refused["max_output_diff"] > refused["tolerance"]
    assert refused["message"].startswith("differs: ") and "kept the module before it" in refused["message"]
    assert refused["max_output_diff"] == pytest.approx(2.0)  # relative: -y against y
    assert applied["status"] == "applied"
    optimized = torch.load(out, weights_only=False)
    assert "neg" not in optimized.code


@pytest.mark.parametrize(("extra", "expected"), [
    (["--profile", "tpu9"], "tpu9"),
    (["--profile", "v100", "--precision", "bf16"], "bf16"),
    (["--passes", "no_such_pass"], "unknown pass 'no_such_pass'"),
    (["--passes", "fold_bn"], "fold_bn applies in infer mode, not train"),
    (["--epochs", "0"], "--epochs"),
])
def test_bad_options_are_one_line_errors(small_resnet9, data_path, capsys, extra, expected):
    line = cli_error(capsys, "optimize", str(small_resnet9), "--data", data_path, *extra)
    assert expected in line


def test_missing_data_is_a_one_line_error(small_resnet9, tmp_path, capsys):
    line = cli_error(capsys, "optimize", str(small_resnet9), "--data", str(tmp_path / "nowhere"))
    assert "nowhere" in line


def test_a_data_pass_gets_training_images_or_a_one_line_error(small_resnet9, real_batch):
    from fastgraph.core.errors import UserError
    from fastgraph.core.pass_manager import run_passes
    from fastgraph.core.tracing import trace

    gm = trace(load_model(small_resnet9))
    with pytest.raises(UserError, match="pass whitening needs real training images"):
        run_passes(gm, ["whitening"], mode="train")
    images, _ = real_batch
    with pytest.raises(UserError, match="pass whitening is checked in its identity configuration and must "
                                        "be verified: give a real data batch"):
        run_passes(gm, ["whitening"], mode="train", options={"whitening": {"images": images}})
    out, report = run_passes(gm, ["whitening"], mode="train", batch=real_batch,
                             options={"whitening": {"images": images}})
    assert report.outcomes[0].status == "applied"


def test_the_json_report_says_what_made_it_and_how_sure_the_timing_is(tmp_path, small_resnet9, data_path):
    out, report, _ = optimize(tmp_path, small_resnet9, data_path, "--steps", "3")
    for key in ("schema", "fastgraph", "torch", "commit", "date", "device"):
        assert report[key] not in (None, ""), key
    assert report["schema"] == 1 and report["profile"] == "h100"  # the one default profile
    timing = report["measured_step"]
    assert timing["verdict"] in ("within noise", "faster", "slower")
    assert timing["before"]["n"] == timing["after"]["n"] == 3
    assert timing["before"]["min"] <= timing["before"]["median"] <= timing["before"]["max"]
    assert len(report["roofline"][0]["measured_step_samples"]) == 3


def test_version(capsys):
    import fastgraph

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"fastgraph {fastgraph.__version__}"
