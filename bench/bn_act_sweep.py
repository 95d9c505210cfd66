"""Search the bn_act kernels' tile configuration at the recipes' shapes on one CUDA GPU.

    python bench/bn_act_sweep.py                  # fast and page2019 shapes, bf16, 240 s budget
    python bench/bn_act_sweep.py --budget-s 600 --recipes page2019
    python bench/bn_act_sweep.py --dry-run        # CPU + Triton interpreter, one tiny shape,
                                                  # two configurations: checks the script, writes nothing

Why: ``fastgraph.kernels.bn_act`` picks its tiles by rule (``_config``: 4,096-element
tiles, 8 warps, about 8 programs an SM), a rule no GPU has tested. On an H200, forward +
backward at the shapes of 16 MiB or more moved the kernels' own bytes at 27-51% of the
copy bandwidth (``results/kernels-nvidia-h200-2026-12-04-bn-act-rewrite.json``); too few
loads in flight per SM is one possible cause. This measures instead of guessing.

What is timed: for each bn_act case of the recipes' training graphs (the shapes
``bench/kernels.py`` derives from the model files), training-mode forward + backward of
the kernels alone (``_forward_triton`` then ``_backward_triton``, bf16 channels-last, ghost
batches as the recipe has them), each candidate configuration captured once in a CUDA graph
and replayed under ``triton.testing.do_bench`` (CUDA events, L2 flushed, median and
20th/80th percentiles, ms). Each configuration is checked against ``bn_act_reference``
first (output and input gradient); one that fails or does not compile is recorded with its
error. Candidates, in two stages per case: (1) channel block 32 or 64, tiles of 2,048,
4,096 or 8,192 elements, 4 or 8 warps, at the rule's grid size; (2) the best of those with
grids of 1, 2, 4, 8 and 16 programs an SM. The rule's own configuration is always timed
first. Cases run largest first until ``--budget-s`` is spent; the rest are recorded as
not reached.

GB/s counts the minimum bytes of forward + backward (5 accesses an element of x, as
``bench/kernels.py``), against the copy bandwidth measured in the same run.

Writes ``results/bn-act-sweep-<device>-<date>.json`` (device, torch, Triton and CUDA
versions, commit, date, timing method, every configuration's numbers) and prints, per
case, the rule's time, the best configuration and its time. Without a CUDA device it exits
with status 2 and one line.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
BLOCK_CHANNELS = (32, 64)
TILE_ELEMENTS = (2048, 4096, 8192)
WARPS = (4, 8)
PROGRAMS_PER_SM = (1, 2, 4, 8, 16)
METHOD = ("triton.testing.do_bench on a CUDA graph replay of the kernels' forward + backward: CUDA events, "
          "L2 flushed before each run, warm-up 25 ms, rep 100 ms; median and 20th/80th percentiles in ms; "
          "compilation and capture before timing")


def _bench_kernels():
    """bench/kernels.py as a module (its shapes, timing and reporting helpers)."""
    spec = importlib.util.spec_from_file_location("bench_kernels_for_sweep", REPO / "bench" / "kernels.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def candidates(bn, channels: int, hw: int, rows: int, groups: int, sm_count: int,
               per_thread: int = 8) -> list:
    """Stage-1 configurations (``bn._Config``) for one shape: the rule's own first, then
    every channel block, tile size and warp count of the search, at the rule's grid size,
    without repeats and without tiles of fewer than ``per_thread`` elements a thread."""
    programs = 4 * sm_count * bn._PROGRAMS_PER_TARGET  # as _default_plan sizes the grid
    rule = bn._config("cuda", channels, hw, rows, True, programs, groups)
    found, seen = [rule], {_key(rule)}
    for block_c in BLOCK_CHANNELS:
        block_c = min(block_c, bn.next_power_of_2(channels))
        for tile in TILE_ELEMENTS:
            block_r = min(tile // block_c, bn.next_power_of_2(rows))
            for warps in WARPS:
                if block_r * block_c < per_thread * 32 * warps:
                    continue
                cfg = bn._Config(block_r, block_c, hw % block_r == 0, programs, warps)
                if _key(cfg) not in seen:
                    seen.add(_key(cfg))
                    found.append(cfg)
    return found


def grid_variants(bn, best, sm_count: int) -> list:
    """Stage 2: ``best`` with each grid size of the search."""
    return [bn._Config(best.block_r, best.block_c, best.in_sample, per_sm * sm_count, best.num_warps)
            for per_sm in PROGRAMS_PER_SM if per_sm * sm_count != best.programs]


def _key(cfg) -> tuple:
    return cfg.block_r, cfg.block_c, cfg.in_sample, cfg.programs, cfg.num_warps


def describe(cfg) -> str:
    """``C32 R128 w8 p1056``: channel block, rows per tile, warps, target programs."""
    return f"C{cfg.block_c} R{cfg.block_r} w{cfg.num_warps} p{cfg.programs}"


def _inputs(torch, case, device, dtype):
    n, c, _, _ = case.shape
    g = torch.Generator(device=device).manual_seed(0)
    x, dy = (torch.randn(case.shape, device=device, generator=g).to(dtype)
             .contiguous(memory_format=torch.channels_last) for _ in range(2))
    weight = torch.rand(c, device=device, generator=g) + 0.5
    bias = torch.randn(c, device=device, generator=g)
    splits = n // case.ghost_batch_size if case.ghost_batch_size else 1
    return x, dy, weight, bias, splits


def measure_case(ctx, bk, bn, case, budget_end: float, sm_count: int) -> list[dict]:
    """Every configuration of ``case`` measured (or failed), until ``budget_end``
    (time.perf_counter seconds); one dict each, the rule's first."""
    torch = ctx.torch
    dtype = torch.float32 if ctx.dry_run else torch.bfloat16
    x, dy, weight, bias, splits = _inputs(torch, case, ctx.device, dtype)
    n, c, h, w = case.shape
    rows = (n // splits) * h * w
    reference = _reference(torch, bn, x, dy, weight, bias, splits, case)
    nbytes = 5 * x.numel() * x.element_size()

    def run(cfg):
        def step():
            y, mean, invstd, _, _ = bn._forward_triton(x, None, None, weight, bias, True, case.momentum,
                                                        case.eps, case.activation, case.alpha, splits,
                                                        config=cfg)
            dx, _, _ = bn._backward_triton(dy, x, weight, bias, mean, invstd, True, case.activation,
                                           case.alpha, config=cfg)
            return y, dx
        return step

    def one(cfg, stage):
        record = {"config": describe(cfg), "stage": stage, "block_r": cfg.block_r, "block_c": cfg.block_c,
                  "num_warps": cfg.num_warps, "programs": cfg.programs, "in_sample": cfg.in_sample}
        try:
            y, dx = run(cfg)()
            tol = 1e-4 if dtype == torch.float32 else 5e-2
            record["checked"] = all(torch.allclose(a.float(), b, rtol=tol, atol=tol)
                                    for a, b in zip((y, dx), reference, strict=True))
            if record["checked"]:
                fn = run(cfg) if ctx.dry_run else bk._graphed(ctx, run(cfg))
                record["median_ms"], record["p20_ms"], record["p80_ms"] = bk._time(ctx, fn)
                record["gbps"] = nbytes / (record["median_ms"] * 1e-3) / 1e9
                record["frac_copy"] = record["gbps"] * 1e9 / ctx.copy_bw if ctx.copy_bw else None
        except Exception as exc:  # a configuration that does not compile or launch: recorded, not fatal
            record["error"] = bk._error_text(exc)
        return record

    configs = candidates(bn, c, h * w, rows, splits, sm_count, per_thread=0 if ctx.dry_run else 8)
    if ctx.dry_run:  # the rule's and one other: the interpreter is slow
        configs = configs[:2]
    records = []
    for cfg in configs:
        if time.perf_counter() > budget_end:
            break
        records.append(one(cfg, "rule" if not records else "tiles"))
    timed = [(r["median_ms"], cfg) for r, cfg in zip(records, configs, strict=False) if r.get("median_ms")]
    if timed and not ctx.dry_run:
        best = min(timed, key=lambda t: t[0])[1]
        for cfg in grid_variants(bn, best, sm_count):
            if time.perf_counter() > budget_end:
                break
            records.append(one(cfg, "grid"))
    return records


def _reference(torch, bn, x, dy, weight, bias, splits, case):
    """(y, dx) of bn_act_reference in float32."""
    xg = x.detach().requires_grad_()
    y = bn.bn_act_reference(xg, None, None, weight, bias, training=True, momentum=case.momentum, eps=case.eps,
                            activation=case.activation, alpha=case.alpha, ghost_splits=splits)
    (dx,) = torch.autograd.grad(y, (xg,), dy)
    return y.float(), dx.float()


def summarise(label: str, records: list[dict]) -> dict:
    """The rule's time and the best measured configuration of one case."""
    rule = next((r for r in records if r["stage"] == "rule"), {})
    timed = [r for r in records if r.get("median_ms")]
    best = min(timed, key=lambda r: r["median_ms"]) if timed else {}
    speedup = (rule["median_ms"] / best["median_ms"]) if rule.get("median_ms") and best else None
    return {"case": label, "rule": rule.get("config"), "rule_ms": rule.get("median_ms"),
            "best": best.get("config"), "best_ms": best.get("median_ms"),
            "best_frac_copy": best.get("frac_copy"),
            "speedup_over_rule": speedup, "configs_measured": len(timed),
            "configs_failed": sum(1 for r in records if r.get("error") or r.get("checked") is False)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", nargs="+", default=["fast", "page2019"],
                   help="recipes whose training graphs give the shapes (default fast page2019)")
    p.add_argument("--budget-s", type=float, default=240.0,
                   help="seconds after which no new configuration starts (default 240)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder (default bench/results)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU + Triton interpreter, one tiny shape, two configurations; writes nothing")
    args = p.parse_args(argv)
    bk = _bench_kernels()
    torch = bk.gpu_torch("bench/bn_act_sweep.py", args.dry_run)
    if torch is None:
        return 2
    import triton

    from fastgraph.core.errors import UserError
    from fastgraph.kernels import bn_act as bn

    device = torch.device("cpu" if args.dry_run else "cuda")
    ctx = bk.Context(torch=torch, device=device, dry_run=args.dry_run)
    ctx.copy_bw = bk._measure_copy_bandwidth(ctx)
    try:
        cases = bk.derive_bn_cases(args.recipes)
    except UserError as exc:
        print(f"bench/bn_act_sweep.py: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        cases = [bk._dry_case(cases[0])]
    cases = sorted(cases, key=lambda case: -case.shape[0] * case.shape[1] * case.shape[2] * case.shape[3])
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count if not args.dry_run else 1
    end = time.perf_counter() + args.budget_s
    results = []
    for case in cases:
        records = measure_case(ctx, bk, bn, case, end, sm_count) if time.perf_counter() <= end else []
        results.append({"case": case.label, "shape": list(case.shape), "configs": records,
                        "summary": summarise(case.label, records)})
    header = ["bn_act case", "rule", "rule ms", "best", "best ms", "x rule", "% copy BW", "measured",
              "failed"]
    body = [[s["case"], s["rule"] or "not reached", bk._fmt(s["rule_ms"], ".4f"), s["best"] or "-",
             bk._fmt(s["best_ms"], ".4f"), bk._fmt(s["speedup_over_rule"], ".2f"),
             bk._fmt(s["best_frac_copy"] and 100 * s["best_frac_copy"], ".0f"), str(s["configs_measured"]),
             str(s["configs_failed"])] for s in (r["summary"] for r in results)]
    failed = [c for r in results for c in r["configs"] if c.get("error") or c.get("checked") is False]
    if args.dry_run:
        bk._print_rich(header, body, "DRY RUN on the CPU (Triton interpreter, tiny shape): NOT a measurement")
        for c in failed:
            print(f"dry run problem: {c['config']}: {c.get('error') or 'check failed'}", file=sys.stderr)
        return 1 if failed or not all(r["configs"] for r in results) else 0
    name = torch.cuda.get_device_name(device)
    date = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    bk._print_rich(header, body, f"bn_act tile search, {name}, {date} (fwd+bwd, bf16, CUDA graph replay)")
    commit, dirty = bk._git_commit()
    gpu = {"name": name, "sm_count": sm_count, "capability": list(torch.cuda.get_device_capability(device))}
    payload = {"benchmark": "bn_act_sweep", "device": gpu,
               "date": date, "git_commit": commit, "git_dirty": dirty, "torch": torch.__version__,
               "triton": triton.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
               "timing_method": METHOD, "copy_bandwidth_bytes_per_s": ctx.copy_bw, "budget_s": args.budget_s,
               "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bn-act-sweep-{bk._slug(name)}-{date[:10]}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
