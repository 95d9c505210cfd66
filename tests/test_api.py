"""The Python API: the README's Python examples run as written, and what they return is what
the commands print and write (`fastgraph optimize --json`, `fastgraph roofline --json`), on
real CIFAR-10 and real models.

The README's fenced ``python`` blocks run in order in one namespace, in a temporary folder
that holds a link to ``examples/``, with CIFAR-10 from ``$FASTGRAPH_DATA``: the examples are
written to take seconds on a CPU (ResNet-20, one measured step, small training subsets).
"""

from __future__ import annotations

import json
import os
import re
import sys

import pytest
import torch

import fastgraph
from fastgraph.cli.main import main
from fastgraph.core.errors import UserError
from fastgraph.core.loading import load_model
from fastgraph.data import normalize
from support import EXAMPLES, REPO, narrow_resnet9_source

pytestmark = pytest.mark.usefixtures("one_thread")

# What differs between two runs of the same job: the clock, the date, where files went.
TIMED = {"measured_step_seconds", "measured_step_samples", "measured_images_per_second",
         "measured_flops_per_second", "timing_method"}


def untimed(row: dict) -> dict:
    """A roofline row of the optimize report without what the clock measured."""
    return {k: v for k, v in row.items() if k not in TIMED}


def readme_blocks() -> list[str]:
    """The README's fenced ``python`` code blocks, in order."""
    return re.findall(r"^```python\n(.*?)^```", (REPO / "README.md").read_text(), flags=re.S | re.M)


@pytest.fixture(scope="module")
def readme(tmp_path_factory, data_path) -> dict:
    """The namespace after running every README Python block in order, in a fresh folder."""
    pytest.importorskip("onnxruntime", reason="extra 'export' (onnx, onnxruntime) not installed")
    folder = tmp_path_factory.mktemp("readme")
    (folder / "examples").symlink_to(EXAMPLES)
    cwd, env = os.getcwd(), os.environ.get("FASTGRAPH_DATA")
    os.chdir(folder)
    os.environ["FASTGRAPH_DATA"] = data_path
    namespace = {"__name__": "readme"}
    try:
        torch.manual_seed(0)
        for block in readme_blocks():
            exec(compile(block, "README.md", "exec"), namespace)
    finally:
        os.chdir(cwd)
        if env is None:
            del os.environ["FASTGRAPH_DATA"]
        else:
            os.environ["FASTGRAPH_DATA"] = env
    namespace["folder"] = folder
    return namespace


def test_the_readme_shows_python_for_every_command():
    text = "\n".join(readme_blocks())
    for call in ("fastgraph.optimize(", "fastgraph.train(", "fastgraph.export(", "fastgraph.profile(",
                 "fastgraph.roofline(", "load_cifar10("):
        assert call in text, call


def test_import_stays_light_and_names_the_api():
    code = ("import sys, fastgraph; "
            "print(sorted(m for m in sys.modules if m.startswith(('torch', 'fastgraph.'))))")
    import subprocess

    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "['fastgraph.core', 'fastgraph.core.version']"
    assert set(fastgraph.__all__) == {"__version__", *fastgraph._API}
    with pytest.raises(AttributeError):
        fastgraph.no_such_function  # noqa: B018


def test_readme_optimize_reports_and_writes_what_it_was_asked(readme):
    """The README's optimize of examples/resnet20.py: the report says what the command's JSON
    says (fold_bn applied to its 19 conv -> BN pairs, nothing to move for the pool pass),
    prints the command's tables, and the module and code went where asked."""
    report, graph, folder = readme["optimized"], readme["graph"], readme["folder"]
    record = report.to_dict()
    assert record == readme["record"]
    for key in ("schema", "fastgraph", "torch", "commit", "date", "device"):  # the JSON header
        assert key in record, key
    assert [(p["name"], p["status"], p["rewrites"]) for p in record["passes"]] == \
        [("pool_before_activation", "no-op", 0), ("fold_bn", "applied", 19)]
    assert report.applied == ["fold_bn"] and report.mode == "infer" and report.batch_size == 8
    before, after = record["roofline"]
    assert after["step_bytes_per_image"] < before["step_bytes_per_image"]
    assert len(before["measured_step_samples"]) == 1 and record["measured_step"]["before"]["n"] == 1
    assert record["optimized_module"] == str(folder / "resnet20.optimized.pt")
    assert record["emitted_code"] == str(folder / "resnet20_optimized.py")
    saved = torch.load(folder / "resnet20.optimized.pt", weights_only=False)
    assert saved.code == graph.code and not any(isinstance(m, torch.nn.BatchNorm2d) for m in saved.modules())
    assert "fold_bn" in (folder / "resnet20_optimized.py").read_text()
    text = str(report)
    for line in ("Input 3x32x32: real CIFAR-10 test images", "Passes (infer mode)",
                 "the whole run, inference, test set", "Measured step:", "resnet20.optimized.pt"):
        assert line in text, line


def test_optimize_of_a_module_is_the_eager_model_and_the_command(tmp_path, data_path, cifar10, capsys):
    """fastgraph.optimize(module): the graph computes what the module computes in eval mode,
    the module is left as it was, and the report is the command's JSON for the same model."""
    model_file = tmp_path / "resnet9.py"
    model_file.write_text(narrow_resnet9_source((8, 16, 32, 64)))
    torch.manual_seed(0)
    module = load_model(model_file)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    gm, report = fastgraph.optimize(module, measure_steps=1, batch_size=8, data=data_path)

    assert isinstance(gm, torch.fx.GraphModule) and not gm.training
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in gm.modules())  # folded
    assert module.training and all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    x = normalize(cifar10.test_images[::625])  # 16 real images of every class
    with torch.no_grad():
        torch.testing.assert_close(gm(x), module.eval()(x), rtol=1e-4, atol=1e-5)

    js = tmp_path / "cli.json"
    torch.manual_seed(0)  # the file builds the same weights
    assert main(["optimize", str(model_file), "--mode", "infer", "--batch-size", "8", "--steps", "1",
                 "--data", data_path, "--out", str(tmp_path / "cli.pt"), "--json", str(js)]) == 0
    capsys.readouterr()
    cli, api = json.loads(js.read_text()), report.to_dict()
    assert api.keys() == cli.keys()
    assert api["model"] == "ResNet9 (nn.Module)" and api["optimized_module"] is None
    assert [(p["name"], p["status"], p["rewrites"]) for p in api["passes"]] == \
        [(p["name"], p["status"], p["rewrites"]) for p in cli["passes"]] == \
        [("pool_before_activation", "applied", 3), ("fold_bn", "applied", 8)]
    assert api["passes"] == cli["passes"]  # float64 differences, FLOPs and bytes included
    assert [untimed(r) for r in api["roofline"]] == [untimed(r) for r in cli["roofline"]]
    for key in ("input", "mode", "batch_size", "profile", "precision", "device", "schema", "verify_images"):
        assert api[key] == cli[key], key


def test_api_errors_are_user_errors(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())
    with pytest.raises(UserError, match="mode must be 'train' or 'infer'"):
        fastgraph.optimize(net, mode="eval")
    with pytest.raises(UserError, match="measure_steps"):
        fastgraph.optimize(net, measure_steps=0)
    with pytest.raises(UserError, match="input_shape"):
        fastgraph.optimize(net, input_shape=(3, 32))
    with pytest.raises(UserError, match="is a folder"):
        fastgraph.optimize(net, out=tmp_path)
    with pytest.raises(UserError, match="fresh model for every run"):
        fastgraph.train(net, recipe="resnet20_seed_baseline")
    with pytest.raises(UserError, match="unknown training option"):
        fastgraph.train(EXAMPLES / "resnet20.py", recipe="resnet20_seed_baseline", epoch=1)
    with pytest.raises(UserError, match="tta"):
        fastgraph.export(net, tmp_path / "x.onnx", tta="mirror")
    with pytest.raises(UserError, match="no suffix"):
        fastgraph.roofline(EXAMPLES / "resnet20.py").plot(tmp_path / "plot")


def test_readme_roofline_is_the_commands(readme, tmp_path, capsys):
    """The README's roofline of examples/resnet20.py with the measured profile: the same
    nodes and step as `fastgraph roofline --measured` writes, and the plot it drew."""
    roof, measured = readme["roof"], readme["measured"]
    profile_json, js = tmp_path / "profile.json", tmp_path / "roofline.json"
    profile_json.write_text(json.dumps(measured.to_dict()))
    assert main(["roofline", str(EXAMPLES / "resnet20.py"), "--measured", str(profile_json),
                 "--out", str(tmp_path / "roofline.png"), "--json", str(js)]) == 0
    capsys.readouterr()
    cli, api = json.loads(js.read_text()), roof.to_dict()
    assert api["nodes"] == cli["nodes"] and api["step"] == cli["step"]
    assert api.keys() == cli.keys() and api["batch_size"] == measured.batch_size == 8
    assert sum("measured_seconds" in n for n in api["nodes"]) == len(measured.rows)
    assert api["plot"] == str(readme["folder"] / "roofline.png")
    assert (readme["folder"] / "roofline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The module's roofline: one node per layer that computes or moves data, at batch 256.
    net_roof = readme["net_roof"]
    assert net_roof.batch_size == 256 and net_roof.model == "Sequential (nn.Module)"
    assert [n["label"] for n in net_roof.nodes][:4] == ["0", "1", "2", "3"]


def test_readme_export_runs_in_onnx_runtime(readme, cifar10):
    """The ONNX file the README wrote from the training checkpoint holds the trained weights
    and the flip TTA: ONNX Runtime's logits are the mean of the trained module's logits on
    the images and on their mirrors, computed here in PyTorch."""
    import onnxruntime as ort

    engine = readme["engine"]
    assert engine.passed and engine.format == "onnx" and engine.verification["images"] == 100
    assert engine.weights["kind"] == "training checkpoint"
    assert {p["name"]: p["status"] for p in engine.passes} == {"fold_bn": "applied", "tta_flip": "applied"}
    assert engine.to_dict()["out"] == str(readme["folder"] / "resnet20.onnx")
    assert "fastgraph export: resnet20.py -> onnx" in str(engine)

    x = normalize(cifar10.test_images[::500])  # 20 real images of every class
    trained = readme["result"].model.eval().cpu()  # the README's training, which wrote the checkpoint
    with torch.no_grad():
        expected = (trained(x) + trained(torch.flip(x, dims=[3]))) / 2
    session = ort.InferenceSession(engine.out, providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-4, atol=1e-4)


def test_readme_trains_a_function_and_a_file(readme, cifar10):
    """Both forms train: the function is named in the settings, the file by its path, and
    the returned module is the one whose accuracy the result records."""
    from fastgraph.training.loop import TrainResult

    by_function, by_file = readme["trained"], readme["result"]
    assert isinstance(by_function, TrainResult) and isinstance(by_file, TrainResult)
    assert by_function.settings["model"] == "readme.make_net"
    assert by_file.settings["model"] == str(EXAMPLES / "resnet20.py")
    for result in (by_function, by_file):
        (run,) = result.runs
        assert [e.epoch for e in run.epochs] == [1]
        assert 0.0 <= run.test_acc <= 1.0 and run.seconds > 0
    # Printed, a result is the summary `fastgraph train` prints, at 80 columns.
    text = str(by_file)
    assert "TTA accuracy %" in text and f"{100 * by_file.runs[0].tta_acc:.2f}" in text
    assert max(map(len, text.splitlines())) <= 80
    # The file's run left a checkpoint, which the README's export read.
    assert (readme["folder"] / "resnet20-run" / "checkpoint.pt").is_file()
    # The returned module is the evaluated one: its accuracy on the same 100 test images
    # (class-balanced: the first 10 of each class) is the recorded one.
    labels = cifar10.test_labels
    index = torch.cat([torch.nonzero(labels == c).flatten()[:10] for c in range(10)]).sort().values
    for result in (by_function, by_file):
        model = result.model.eval().cpu()
        with torch.no_grad():
            correct = (model(normalize(cifar10.test_images[index])).argmax(1) == labels[index]).sum().item()
        assert correct / 100 == pytest.approx(result.runs[0].test_acc, abs=0.011)


def test_readme_profile_report_is_its_json(readme):
    measured = readme["measured"]
    record = measured.to_dict()
    assert record["rows"] == measured.rows and record["nsys_command"].startswith("nsys profile")
    assert {r["node"] for r in measured.rows} >= {"conv1", "bn1", "fc"}
    assert all(r["forward_seconds"] > 0 for r in measured.rows if r["node"].endswith("conv1"))
    assert "Per node" in str(measured)


def test_readme_advice_and_compile_backend(readme):
    """The README's advice on ResNet-20 in inference ranks fold_bn among what applies, with
    the sites the pass rewrites; its torch.compile example folds both BNs and moves both
    pools, and the compiled net is the eager one."""
    from fastgraph.compiler.advise import Advice

    advice = readme["advice"]
    assert isinstance(advice, Advice)
    applying = {t["name"]: t for t in advice.to_dict()["tricks"] if t["applies"]}
    assert applying["fold_bn"]["sites"] == 19  # 19 conv -> BN pairs in ResNet-20
    assert dict(readme["stats"].rewrites) == {"pool_before_activation": 3, "fold_bn": 2}
    with torch.no_grad():
        torch.testing.assert_close(readme["compiled"](readme["x"]), readme["net"](readme["x"]))
