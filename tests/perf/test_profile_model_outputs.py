"""`fastgraph profile` of models that are not one logits tensor: several outputs get the loss
`fastgraph optimize` times (every output reaches the backward); a model without trainable
parameters has no training step to profile, a one-line error."""

from __future__ import annotations

import json

import pytest

from fastgraph.cli.main import main
from support import NO_PARAMETERS_MODEL, cli_error, outputs_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("returned", ["(logits, aux)", "{'logits': logits, 'aux': aux}"])
def test_a_model_with_several_outputs_is_profiled_with_every_head(tmp_path, data_path, capsys, returned):
    model = tmp_path / "heads.py"
    model.write_text(outputs_model(returned))
    out, js = tmp_path / "profile", tmp_path / "profile.json"
    assert main(["profile", str(model), "--steps", "1", "--warmup", "1", "--batch-size", "4",
                 "--device", "cpu", "--out", str(out), "--json", str(js), "--data", data_path]) == 0
    rows = {row["node"]: row for row in json.loads(js.read_text())["rows"]}
    # both heads are in the backward: the loss reaches the auxiliary output too
    assert rows["fc"]["backward_seconds"] > 0 and rows["aux"]["backward_seconds"] > 0, rows
    assert (out / "trace.json").exists()


def test_a_model_without_trainable_parameters_is_a_one_line_error(tmp_path, capsys):
    model = tmp_path / "fixed.py"
    model.write_text(NO_PARAMETERS_MODEL)
    line = cli_error(capsys, "profile", str(model), "--steps", "1", "--warmup", "0", "--batch-size", "4",
                     "--device", "cpu", "--out", str(tmp_path / "profile"),
                     "--data", str(tmp_path / "nowhere"))
    assert f"{model}: the model has no trainable parameters, so it has no training step to profile" in line
