"""bench/bn_act_sweep.py on a CPU: its search space at the recipes' real shapes, and a dry
run through the kernels under Triton's interpreter."""

from __future__ import annotations

import sys

import pytest
import torch

from support import load_script


@pytest.fixture(scope="module")
def sweep():
    yield load_script("bench/bn_act_sweep.py", "bench_bn_act_sweep")
    sys.modules.pop("bench_bn_act_sweep", None)


@pytest.mark.parametrize("shape, groups", [((1024, 64, 15, 15), 1), ((512, 128, 16, 16), 16),
                                           ((512, 512, 4, 4), 16)])
def test_the_search_starts_at_the_rule_and_tries_each_tile_once(sweep, shape, groups):
    from fastgraph.kernels import bn_act as bn

    n, c, h, w = shape
    rows, sms = (n // groups) * h * w, 132  # an H100 SXM
    found = sweep.candidates(bn, c, h * w, rows, groups, sms)
    rule = bn._config("cuda", c, h * w, rows, True, 4 * sms * bn._PROGRAMS_PER_TARGET, groups)
    assert sweep.describe(found[0]) == sweep.describe(rule) and found[0].in_sample == rule.in_sample
    keys = [sweep._key(cfg) for cfg in found]
    assert len(keys) == len(set(keys)) >= 4
    for cfg in found[1:]:
        assert cfg.block_c in (32, 64) and cfg.block_c <= c
        assert cfg.block_r * cfg.block_c >= 8 * 32 * cfg.num_warps  # 8 elements a thread or more
        assert cfg.in_sample == (h * w % cfg.block_r == 0) and cfg.programs == rule.programs
    grids = sweep.grid_variants(bn, found[1], sms)
    assert {g.programs for g in grids} | {found[1].programs} >= {sms * k for k in (1, 2, 4, 8, 16)}
    assert all((g.block_r, g.block_c, g.num_warps) == (found[1].block_r, found[1].block_c, found[1].num_warps)
               for g in grids)


def test_dry_run_checks_and_times_two_configurations_on_the_cpu(sweep, tmp_path, capsys):
    code = sweep.main(["--dry-run", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0, out[-3000:] + err[-3000:]
    assert "DRY RUN" in out and "fast " in out
    assert list(tmp_path.iterdir()) == []  # a dry run writes no result


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_refuses_without_cuda_in_one_line(sweep, tmp_path, capsys):
    assert sweep.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device" in err[0]
    assert list(tmp_path.iterdir()) == []
