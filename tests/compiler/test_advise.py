"""`fastgraph advise` on real models: the sites it reports are what each pass rewrites, its
costs are the roofline's node costs of the rewritten graph, its ranking follows the
predicted gain, its accuracy claims are cited and found in their sources, its measured
numbers are the benchmark record's, and it says why a trick does not apply."""

from __future__ import annotations

import io
import json
import re

import pytest
import torch
from rich.console import Console

from fastgraph import passes as registry
from fastgraph.cli.main import main
from fastgraph.compiler.advise import BENCH_RESULTS, NOT_MEASURED, advise, why_not
from fastgraph.core.loading import load_model
from fastgraph.core.outputs import report_header
from fastgraph.core.tracing import trace
from fastgraph.data import normalize
from fastgraph.perf.roofline import node_costs
from support import EXAMPLES, REPO, cli_error

MODELS = REPO / "tests" / "models"
SOURCES = REPO.parent / "shared" / "sources"

# (model file, mode, input shape): the four kinds of model advise must serve.
CASES = {
    "resnet9": (EXAMPLES / "resnet9.py", "train", (3, 32, 32)),
    "resnet20": (EXAMPLES / "resnet20.py", "infer", (3, 32, 32)),
    "resnet50": (MODELS / "resnet50.py", "infer", (3, 224, 224)),
    "mobilenet_v2": (MODELS / "mobilenet_v2.py", "train", (3, 32, 32)),
}

NO_BN_MODEL = """\
import torch
from torch import nn


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.relu(self.conv2(x))
        return self.head(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


def build_model():
    return Plain()
"""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def advices(cifar10, one_thread) -> dict:
    """The advice on each of :data:`CASES` (the model files initialise from a seeded RNG)."""
    found = {}
    for name, (path, mode, shape) in CASES.items():
        torch.manual_seed(0)
        found[name] = advise(str(path), mode=mode, input_shape=shape, data=cifar10)
    return found


@pytest.fixture(scope="module")
def no_bn_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("plain") / "plain.py"
    path.write_text(NO_BN_MODEL)
    return path


def _traced(name: str):
    path, mode, _ = CASES[name]
    torch.manual_seed(0)
    gm = trace(load_model(path), str(path), mode=mode)
    return gm.train(mode == "train")


def _forward_costs(gm, shape, advice) -> tuple[float, float]:
    costs = node_costs(gm, torch.zeros(1, *shape), batch_size=advice.batch_size, precision=advice.precision)
    return sum(c.flops for c in costs), sum(c.bytes for c in costs)


@pytest.mark.parametrize("name", list(CASES))
def test_sites_and_costs_are_those_of_the_pass_applied(advices, cifar10, name):
    advice, (_, mode, shape) = advices[name], CASES[name]
    gm = _traced(name)
    before = {n.name for n in gm.graph.nodes}
    flops, nbytes = _forward_costs(gm, shape, advice)
    assert advice.baseline["flops"] == pytest.approx(flops, rel=1e-9)
    assert advice.baseline["bytes"] == pytest.approx(nbytes, rel=1e-9)
    applied = [t for t in advice.tricks if t.applies and t.name in registry.REGISTRY]
    assert len(applied) >= 2, "advise found almost nothing to do for a ResNet or MobileNet"
    images = normalize(cifar10.train_images[::500]).float()
    for t in applied:
        info = registry.get(t.name)
        assert mode in info.modes
        options = {k: v for k, v in t.options.items() if k != "images"}
        if info.needs_data:
            options["images"] = torch.nn.functional.interpolate(images, size=shape[1:], mode="bilinear")
        after = info.fn(gm, **options)
        assert t.sites == registry.rewrite_count(gm, after) > 0, t.name
        assert set(registry.declared_rewritten(gm, after)) & before <= set(t.where) <= before, t.name
        assert t.flops_before == advice.baseline["flops"] and t.bytes_before == advice.baseline["bytes"]
        gain = 1 - t.roofline_seconds_after / t.roofline_seconds_before
        assert t.predicted_gain == pytest.approx(gain)
        flops, nbytes = _forward_costs(after, shape, advice)
        assert t.flops_after == pytest.approx(flops, rel=1e-9), t.name
        assert t.bytes_after == pytest.approx(nbytes, rel=1e-9), t.name
    for t in advice.tricks:
        if t.name in registry.REGISTRY and not t.applies and mode in registry.get(t.name).modes:
            assert t.sites == 0 and t.reason and t.flops_after is None, t.name


def test_what_each_model_gets_is_what_its_graph_holds(advices):
    resnet9, resnet20, resnet50, mobilenet = (advices[n] for n in CASES)
    # Page's ResNet-9: three ReLU -> max-pool pairs, eight conv -> BN -> ReLU blocks.
    assert resnet9.trick("pool_before_activation").sites == 3
    assert resnet9.trick("pool_before_bn").sites == 3
    assert resnet9.trick("swap_activation").sites == 8 and resnet9.trick("ghost_batchnorm").sites == 8
    assert resnet9.trick("pool_before_activation").bytes_after < resnet9.baseline["bytes"]
    assert resnet9.trick("pool_before_activation").predicted_gain > 0
    assert resnet9.trick("whitening").applies and resnet9.images.startswith("1000 CIFAR-10 training images")
    assert resnet9.trick("fold_bn").reason == "for inference only: advise in infer mode"
    # ResNet-20 in inference: every conv has its BN (19 folds), no max-pool anywhere.
    assert resnet20.trick("fold_bn").sites == 19 and resnet20.trick("fold_bn").predicted_gain > 0
    assert resnet20.trick("pool_before_activation").reason == "no max-pool in the graph"
    tta = resnet20.trick("tta_flip")
    assert tta.kind == "inference-time pass" and resnet20.trick("fold_bn").kind == "exact pass"
    assert tta.flops_after == pytest.approx(2 * tta.flops_before) and tta.predicted_gain < 0
    # ResNet-50 at 224x224: 53 conv -> BN pairs; its one max-pool follows the stem's ReLU.
    assert resnet50.trick("fold_bn").sites == 53
    assert resnet50.trick("pool_before_activation").sites == 1
    assert resnet50.trick("whitening").reason == "for training only: advise in train mode"
    # MobileNetV2 uses ReLU6, which swap_activation does not replace, and BN feeds no smooth activation.
    assert "ReLU6" in mobilenet.trick("swap_activation").reason
    assert "ReLU6" in mobilenet.trick("fuse_bn_activation").reason
    assert mobilenet.trick("ghost_batchnorm").sites == 52


def test_why_a_strided_stem_cannot_be_whitened():
    assert "stride 2" in why_not("whitening", _traced("resnet50"))


@pytest.mark.parametrize("name", list(CASES))
def test_ranked_by_predicted_gain_and_every_claim_cited(advices, name):
    tricks = advices[name].tricks
    applies = [t.applies for t in tricks]
    assert applies == sorted(applies, reverse=True)  # those that apply first
    predicted = [t.predicted_gain for t in tricks if t.applies and t.predicted_gain is not None]
    assert predicted == sorted(predicted, reverse=True)
    unpredicted = [i for i, t in enumerate(tricks) if t.applies and t.predicted_gain is None]
    assert all(i >= len(predicted) for i in unpredicted)
    for t in tricks:
        if t.accuracy_source is not None:
            assert t.accuracy_source["citation"].strip() and t.accuracy_source["claim"].strip(), t.name
        assert t.measured == NOT_MEASURED or t.measured["file"], t.name
    assert {t.name for t in tricks} >= {"precision", "channels_last", "pool_before_bn", "fold_bn", "tta_flip"}


@pytest.mark.skipif(not SOURCES.is_dir(), reason="the shared sources folder is not beside the checkout")
def test_quoted_claims_are_in_the_cited_sources(advices):
    texts = {p.name: " ".join(p.read_text().split()) for p in SOURCES.glob("*.txt")}
    checked = 0
    for t in advices["resnet9"].tricks:
        if t.accuracy_source is None:
            continue
        cited = re.findall(r"shared/sources/(\S+?\.txt)", t.accuracy_source["citation"])
        for quote in re.findall(r"'([^']+)'", t.accuracy_source["claim"]):
            assert any(quote in texts[f] for f in cited), (t.name, quote)
            checked += 1
        for number in re.findall(r"\d+\.\d%", t.accuracy_source["claim"]):
            if len(cited) == 1 and cited[0].startswith("001_"):  # Page writes accuracies as percentages
                assert number in texts[cited[0]], (t.name, number)
                checked += 1
    assert checked >= 10


def test_measured_numbers_are_the_benchmark_records(advices):
    measured = {t.name: t.measured for t in advices["resnet9"].tricks if t.measured != NOT_MEASURED}
    assert set(measured) == {"whitening"}  # the one trick whose options the CPU benchmark compared
    record = json.loads((REPO / measured["whitening"]["file"]).read_text())
    assert (REPO / measured["whitening"]["file"]).parent == BENCH_RESULTS
    rows = measured["whitening"]["numbers"]
    assert {(r["source"], r["other"]) for r in rows} == {("page2019", "page2019_reproduce"),
                                                          ("fast", "fast_pointwise")}
    for row in rows:
        source, other = record["variants"][row["source"]], record["variants"][row["other"]]
        (comparison,) = [c for c in record["comparisons"]
                         if (c["source"], c["other"]) == (row["source"], row["other"])]
        assert (row["source_mean"], row["source_std"]) == (source["mean"], source["std"])
        assert (row["other_mean"], row["other_std"]) == (other["mean"], other["std"])
        assert row["runs"] == [len(source["tta_acc"]), len(other["tta_acc"])]
        assert (row["difference"], row["p"]) == (comparison["difference"], comparison["p"])
        assert row["options_changed"] == other["changes"]["passes"]["whitening"]


@pytest.mark.parametrize("name", list(CASES))
def test_the_advice_fits_80_columns_and_names_every_trick(advices, name):
    buf = io.StringIO()
    Console(width=80, file=buf).print(advices[name])
    text = buf.getvalue()
    assert max(map(len, text.splitlines())) <= 80
    assert "…" not in text
    for i, t in enumerate([t for t in advices[name].tricks if t.applies], 1):
        assert f"{i}. {t.name}" in text
    for t in advices[name].tricks:
        if not t.applies:
            assert " ".join(f"{t.name}: {t.reason}".split()) in " ".join(text.split())


def test_a_model_without_batchnorm_says_why_nothing_folds(no_bn_model, data_path):
    advice = advise(str(no_bn_model), mode="infer", data=data_path)
    fold = advice.trick("fold_bn")
    assert not fold.applies and fold.sites == 0 and fold.reason == "no BatchNorm2d in the graph"
    assert fold.flops_after is None and fold.predicted_gain is None
    assert advice.trick("pool_before_activation").applies  # relu -> max-pool, as functions
    module = advise(load_model(no_bn_model), mode="infer", data=data_path)  # an nn.Module, not a file
    assert module.model == "Plain" and module.trick("fold_bn").reason == fold.reason
    assert [(t.name, t.sites) for t in module.tricks] == [(t.name, t.sites) for t in advice.tricks]
    trained = advise(str(no_bn_model), mode="train", data=data_path)
    for name in ("ghost_batchnorm", "fuse_bn_activation"):
        assert trained.trick(name).reason == "no BatchNorm2d in the graph"
    assert "BatchNorm" in trained.trick("freeze_bn_scale").reason


def test_without_data_the_data_pass_is_not_evaluated(no_bn_model, tmp_path, monkeypatch):
    monkeypatch.delenv("FASTGRAPH_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.cache/fastgraph/cifar10 either
    advice = advise(str(no_bn_model), mode="train")
    whitening = advice.trick("whitening")
    assert not whitening.applies and whitening.reason.startswith("needs data: not evaluated")
    assert advice.images is None


def test_cli_json_is_the_advice(no_bn_model, tmp_path, data_path, capsys):
    js = tmp_path / "advice.json"
    assert main(["advise", str(no_bn_model), "--mode", "infer", "--data", data_path, "--batch-size", "256",
                 "--profile", "a100", "--precision", "fp16", "--json", str(js)]) == 0
    printed = capsys.readouterr().out
    assert "Advice for" in printed and "fold_bn: no BatchNorm2d in the graph" in printed
    written = json.loads(js.read_text())
    header = set(report_header()) | {"device"}
    expected = advise(str(no_bn_model), mode="infer", data=data_path, batch_size=256, profile="a100",
                      precision="fp16").to_dict()
    assert {k: v for k, v in written.items() if k not in header} == json.loads(json.dumps(expected))


@pytest.mark.parametrize(("argv", "expected"), [
    (["--input-shape", "3,32"], "--input-shape"),
    (["--profile", "tpu9"], "unknown hardware profile"),
    (["--precision", "tf32", "--profile", "v100"], "tf32"),
    (["--entry", "nothing_here"], "nothing_here"),
    (["--mode", "infer", "--data", "/no/such/cifar10"], "/no/such/cifar10"),
])
def test_bad_input_is_one_line(capsys, no_bn_model, argv, expected):
    line = cli_error(capsys, "advise", str(no_bn_model), *argv)
    assert expected in line, line


def test_an_unwritable_json_is_refused_before_any_work(capsys, tmp_path):
    missing = tmp_path / "no" / "advice.json"
    line = cli_error(capsys, "advise", str(tmp_path / "not-a-model.py"), "--json", str(missing))
    assert "--json" in line and str(missing) in line, line  # not the missing model file
    with pytest.raises(SystemExit) as info:
        main(["advise", str(tmp_path / "m.py"), "--batch-size", "0"])
    assert info.value.code == 2


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_precision_at_16_bit_already_gains_nothing_and_says_so(no_bn_model, precision):
    advice = advise(str(no_bn_model), mode="infer", precision=precision)
    trick = advice.trick("precision")
    assert not trick.applies and trick.predicted_gain is None
    assert trick.reason.startswith(f"already at {precision}") and "no gain" in trick.reason


def test_precision_from_fp32_or_tf32_is_against_the_advice_s_own_roofline(no_bn_model):
    for precision in ("fp32", "tf32"):
        advice = advise(str(no_bn_model), mode="infer", precision=precision)
        trick = advice.trick("precision")
        assert trick.applies and trick.options == {"precision": "bf16"}
        assert trick.roofline_seconds_before == advice.baseline["roofline_seconds"]
        gain = 1 - trick.roofline_seconds_after / trick.roofline_seconds_before
        assert trick.predicted_gain == pytest.approx(gain) and gain > 0
