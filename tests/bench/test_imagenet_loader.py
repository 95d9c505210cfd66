"""bench/imagenet_loader.py on a CPU: a small built folder, measured end to end, and its
results folder made (or refused in one line) before the slow work."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from support import REPO


def _loader(*args, data_path=None):
    env = dict(os.environ, **({"FASTGRAPH_DATA": data_path} if data_path else {}))
    return subprocess.run([sys.executable, "bench/imagenet_loader.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_measures_a_built_folder_into_a_new_results_folder(data_path, tmp_path):
    out = tmp_path / "not" / "yet"
    done = _loader("--images", "64", "--batch-size", "16", "--resolutions", "160", "--workers", "1",
                   "--out", str(out), data_path=data_path)
    assert done.returncode == 0, done.stderr[-2000:]
    (written,) = out.glob("imagenet-loader-cpu-*.json")
    record = json.loads(written.read_text())
    stages = {(r["stage"], r["res"]) for r in record["results"]}
    assert stages == {("train", 160), ("eval", 224)}
    assert all(r["images"] > 0 and r["images_per_s"] > 0 for r in record["results"])


def test_an_unwritable_results_folder_is_one_line_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = _loader("--out", str(blocker / "results"))
    assert done.returncode == 2
    assert done.stderr.strip().startswith("bench/imagenet_loader.py:") and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
