"""`fastgraph export`: the file has the ONNX opset asked for (or a one-line error says why
not), and the report lists exactly the batch sizes the engine ran and was verified at."""

from __future__ import annotations

import io
import json
import logging

import pytest

from fastgraph.cli.main import main
from support import cli_error

onnx = pytest.importorskip("onnx", reason="extra 'export' (onnx) not installed")
pytest.importorskip("onnxruntime", reason="extra 'export' (onnxruntime) not installed")

pytestmark = pytest.mark.usefixtures("one_thread")

# A tiny network with what the version converter cannot take down to opset 17: ResNet-20's
# zero-padded shortcut (Pad) and a mean over the image (ReduceMean with its axes as an input).
TINY = """\
import torch
import torch.nn.functional as F
from torch import nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 0, 1))
        y = F.relu(self.bn(self.conv(x))) + shortcut
        return self.fc(torch.cat([y.mean((2, 3)), y.amax((2, 3))], 1))


def build_model():
    return Tiny()
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.py"
    path.write_text(TINY)
    return path


def export(tmp_path, data_path, capfd, *argv) -> tuple[dict, str]:
    """Run ``fastgraph export`` (exit 0); return its JSON record and its stderr."""
    js = tmp_path / "export.json"
    assert main(["export", *map(str, argv), "--json", str(js), "--data", data_path]) == 0
    return json.loads(js.read_text()), capfd.readouterr().err


def table(record: dict) -> str:
    """The summary table ``fastgraph export`` prints, on one line per row."""
    from rich.console import Console

    from fastgraph.deploy.pipeline import summary_table

    text = io.StringIO()
    Console(file=text, width=300).print(summary_table(record))
    return text.getvalue()


@pytest.mark.parametrize("opset", [17, 19])
def test_the_file_has_the_opset_asked_for_and_no_traceback_is_shown(tiny, tmp_path, data_path, capfd, caplog,
                                                                    opset):
    out = tmp_path / f"tiny{opset}.onnx"
    with caplog.at_level(logging.WARNING):
        record, err = export(tmp_path, data_path, capfd, tiny, "--opset", opset, "--verify-images", 20,
                             "--out", out)
    # The version converter's warnings (with a traceback) reach neither stderr nor the log.
    assert "Traceback" not in err and "version" not in err
    assert not [r for r in caplog.records if r.name.startswith("onnxscript")]
    opsets = {o.domain: o.version for o in onnx.load(str(out)).opset_import}
    assert opsets.get("", opsets.get("ai.onnx")) == opset and record["engine"]["opset"] == opset
    assert record["verification"]["passed"]
    if opset == 17:  # torch.export's exporter writes 18 and cannot convert this graph down
        assert record["engine"]["exporter"] == "TorchScript (dynamo=False)"
        assert "could not convert this model to opset 17" in record["engine"]["fallback_reason"]


def test_an_opset_the_installed_onnx_does_not_know_is_one_line(tiny, tmp_path, capsys):
    newest = onnx.defs.onnx_opset_version()
    out = tmp_path / "never.onnx"
    line = cli_error(capsys, "export", str(tiny), "--opset", str(newest + 1), "--out", str(out))
    assert f"--opset must be between 17 and {newest}" in line and f"got {newest + 1}" in line
    assert not out.exists()


def test_verified_batch_sizes_are_those_run(tiny, tmp_path, data_path, capfd):
    # Dynamic: the 200 images run as one batch of 200, then one image alone.
    record, _ = export(tmp_path, data_path, capfd, tiny, "--verify-images", 200, "--out",
                       tmp_path / "dynamic.onnx")
    v = record["verification"]
    assert v["batch_sizes_run"] == [1, 200] and v["other_batch_size"] == 1
    assert v["max_abs_logit_diff_other_batch"] < 1e-4
    printed = table(record)
    assert "batch sizes [1, 200]" in printed and "(batch size 1: " in printed

    # Fixed: every batch is 3 images (the last one padded); there is no other batch size.
    record, _ = export(tmp_path, data_path, capfd, tiny, "--batch", 3, "--verify-images", 20, "--out",
                       tmp_path / "fixed.onnx")
    v = record["verification"]
    assert v["batch_sizes_run"] == [3] and v["other_batch_size"] is None
    assert v["max_abs_logit_diff_other_batch"] is None and v["passed"]
    printed = table(record)
    assert "batch sizes [3]" in printed and "batch size 1" not in printed and "other batch" not in printed


def test_batch_sizes_of_a_verification_run():
    from fastgraph.deploy.pipeline import verification_batch_sizes

    assert verification_batch_sizes(1200, None, 500) == {500, 200}
    assert verification_batch_sizes(1000, None, 500) == {500}
    assert verification_batch_sizes(7, 3, 500) == {3}
