"""Evidence at CPU scale: each recipe as its source has it, side by side with the
deviations fastgraph used to carry, n seeds each.

A recipe file may deviate from its source only with evidence (several seeds, mean ± std,
a significance test). This script trains, on the development CPU, narrow versions of
each recipe's network on a few thousand class-balanced real CIFAR-10 images for a few
epochs, and for every comparison prints the TTA accuracy of both sides (mean ± std over
n seeds), their difference and Welch's t-test p-value (``scipy.stats.ttest_ind`` with
``equal_var=False``). Both sides of a comparison share the scale, data, seeds and
everything else.

The scale (narrow nets, 2,560 training images, 3-4 epochs, batch 128-256) is chosen so
a CPU runs it: with ``--runs 5`` on a 2-thread x86_64 CPU the timed training and evaluation
of the seven variants took 727 s in all (the sum of their ``wall_seconds`` in
``bench/results/recipe-evidence-cpu-2026-12-04.json``; loading the data is not in it). Its
accuracies are far below the recipes' full-scale ones and say nothing about them in
absolute terms, only about the direction of each difference at this scale.

Writes ``bench/results/recipe-evidence-cpu-<date>.json`` and ``.md`` (device, torch,
commit, date, the scale, every run's accuracy). Run ``python bench/recipe_evidence.py
[--runs 5] [--data PATH]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

# Narrow versions of the recipes' model files (plain PyTorch, written to a temporary
# folder): ResNet-9 at a quarter of its widths, airbench94's network at (16, 64, 64).
_RESNET9 = """
import sys
sys.path.insert(0, {examples!r})
from resnet9 import ResNet9

def build_model():
    return ResNet9(width=(16, 32, 64, 128), weight={weight})
"""
_AIRBENCH = """
import sys
import torch
sys.path.insert(0, {models!r})
from airbench94_net import AirbenchNet

def build_model():
    net = AirbenchNet(widths=(16, 64, 64), logit_divisor={divisor}, zero_stem_bias={zero_bias})
    if {unit_head}:  # airbench94_muon: head weights at std 1, logits divided by the width
        with torch.no_grad():
            net.head.weight /= net.head.weight.std()
    return net
"""
MODELS = {
    "resnet9": _RESNET9.format(examples=str(REPO / "examples"), weight="1 / 16"),
    "resnet9_eighth": _RESNET9.format(examples=str(REPO / "examples"), weight="1 / 8"),
    "airbench94": _AIRBENCH.format(models=str(REPO / "bench" / "models"), divisor=9, zero_bias=True,
                                   unit_head=False),
    "airbench94_muon": _AIRBENCH.format(models=str(REPO / "bench" / "models"), divisor=64, zero_bias=False,
                                        unit_head=True),
}


@dataclass(frozen=True)
class Variant:
    """One side of a comparison: a shipped recipe, the model it trains, changes to the
    recipe (section -> key -> value; ``passes`` -> pass name -> options to merge) and
    the scale (batch size, epochs)."""

    key: str
    label: str
    recipe: str
    model: str
    batch_size: int
    epochs: float
    changes: dict = field(default_factory=dict)


# Page's EMA (0.99 per step, updated every 5) needs hundreds of steps before the initial
# weights fade from it: after the 60 steps of this scale they still hold about half of it
# and every page2019 variant scores near chance. At this scale the page2019 variants are
# evaluated on their trained weights instead, all alike.
_PAGE_SCALE = {"eval": {"model": "trained"}}

VARIANTS = [
    Variant("page2019", "page2019 as its source (1x1 conv fresh, logits / 16)", "page2019", "resnet9",
            128, 3, _PAGE_SCALE),
    Variant("page2019_reproduce", "page2019, 1x1 conv reproducing the stem (fastgraph before)", "page2019",
            "resnet9", 128, 3, {**_PAGE_SCALE, "passes": {"whitening": {"pointwise_init": "reproduce"}}}),
    Variant("page2019_eighth", "page2019, logits / 8 (fastgraph's example before)", "page2019",
            "resnet9_eighth", 128, 3, _PAGE_SCALE),
    Variant("fast", "fast = airbench94 as its source (whitening stem, bias 3 epochs)", "fast", "airbench94",
            256, 4),
    Variant("fast_pointwise", "fast, whitening + 1x1 conv reproducing the stem, bias always trained "
            "(fastgraph before)", "fast", "airbench94", 256, 4,
            {"passes": {"whitening": {"into": "pointwise", "pointwise_init": "reproduce",
                                      "bias_epochs": None}}}),
    Variant("fast_muon_triangle", "fast + Muon on the conv filters, airbench94's schedule (fastgraph's "
            "fast before)", "fast", "airbench94", 256, 4, {"muon": {"enabled": True}}),
    Variant("fast_muon", "fast_muon = airbench94_muon as its source", "fast_muon", "airbench94_muon", 256, 4),
]
# (source side, other side): the question each comparison answers.
COMPARISONS = [
    ("page2019", "page2019_reproduce"),
    ("page2019", "page2019_eighth"),
    ("fast", "fast_pointwise"),
    ("fast", "fast_muon_triangle"),
    ("fast", "fast_muon"),
]
SUBSET, TEST_SUBSET = 2560, 2000  # class-balanced training / test images


def recipe_for(variant: Variant):
    """The shipped recipe of ``variant`` with its changes applied (a validated Recipe)."""
    from fastgraph.training.recipes import RECIPE_FOLDER, validate

    path = REPO / "profiles" / RECIPE_FOLDER / f"{variant.recipe}.toml"
    data = tomllib.loads(path.read_text())
    for section, values in variant.changes.items():
        if section == "passes":
            for item in data["passes"]:
                for key, value in values.get(item["name"], {}).items():
                    if value is None:
                        item.pop(key, None)
                    else:
                        item[key] = value
        else:
            data.setdefault(section, {}).update(values)
    return validate(f"{path.name} ({variant.key})", data)


def welch(a: list[float], b: list[float]) -> dict:
    """Mean difference of ``a`` and ``b`` (fractions) and Welch's two-sided t-test.

    Returns ``{"difference", "t", "p"}`` (``difference`` = mean(a) - mean(b)); t and p
    are None with fewer than two values on a side or no spread on both.
    """
    from scipy import stats

    difference = statistics.fmean(a) - statistics.fmean(b)
    if min(len(a), len(b)) < 2 or (statistics.pstdev(a) == 0 and statistics.pstdev(b) == 0):
        return {"difference": difference, "t": None, "p": None}
    result = stats.ttest_ind(a, b, equal_var=False)
    return {"difference": difference, "t": float(result.statistic), "p": float(result.pvalue)}


def run_variant(variant: Variant, runs: int, data: str | None, folder: Path) -> dict:
    """Train ``variant`` ``runs`` times (seeds 0..runs-1) on the CPU; its record."""
    from fastgraph.training.loop import TrainOptions, train

    model = folder / f"{variant.model}.py"
    model.write_text(MODELS[variant.model])
    start = time.perf_counter()
    result = train(TrainOptions(model_path=str(model), recipe=recipe_for(variant), runs=runs, seed=0,
                                epochs=variant.epochs, batch_size=variant.batch_size, subset=SUBSET,
                                test_subset=TEST_SUBSET, device="cpu", compile=False, progress_eval=False,
                                data=data))
    tta = [r.tta_acc for r in result.runs]
    return {"label": variant.label, "recipe": variant.recipe, "model": variant.model,
            "changes": variant.changes, "batch_size": variant.batch_size, "epochs": variant.epochs,
            "tta_acc": tta, "test_acc": [r.test_acc for r in result.runs],
            "mean": statistics.fmean(tta), "std": statistics.stdev(tta) if len(tta) > 1 else 0.0,
            "wall_seconds": time.perf_counter() - start}


def comparisons(records: dict) -> list[dict]:
    """Each comparison whose two sides ran: both means, the difference and Welch's p."""
    rows = []
    for source, other in COMPARISONS:
        if source in records and other in records:
            rows.append({"source": source, "other": other,
                         **welch(records[source]["tta_acc"], records[other]["tta_acc"])})
    return rows


def markdown(meta: dict, records: dict, rows: list[dict]) -> str:
    """The results as Markdown: the scale, one line per variant, one per comparison."""
    lines = [f"# Recipe evidence at CPU scale ({meta['date']})", "",
             f"Device {meta['device']}, torch {meta['torch']}, commit {meta['commit']}. {meta['scale']}", "",
             "| variant | runs | TTA accuracy % (mean ± std) |", "|---|---|---|"]
    for key, r in records.items():
        lines.append(f"| {key}: {r['label']} | {len(r['tta_acc'])} | "
                     f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f} |")
    lines += ["", "| source | other | difference (points) | Welch p |", "|---|---|---|---|"]
    for row in rows:
        p = "n/a" if row["p"] is None else f"{row['p']:.3g}"
        lines.append(f"| {row['source']} | {row['other']} | {100 * row['difference']:+.2f} | {p} |")
    return "\n".join(lines) + "\n"


def print_table(records: dict, rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="TTA accuracy at CPU scale")
    for column in ("variant", "runs", "mean ± std %"):
        table.add_column(column)
    for key, r in records.items():
        table.add_row(key, str(len(r["tta_acc"])), f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}")
    diffs = Table(title="source minus other")
    for column in ("source", "other", "difference (points)", "Welch p"):
        diffs.add_column(column)
    for row in rows:
        diffs.add_row(row["source"], row["other"], f"{100 * row['difference']:+.2f}",
                      "n/a" if row["p"] is None else f"{row['p']:.3g}")
    console = Console()
    console.print(table)
    console.print(diffs)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5, help="seeds per variant (default 5)")
    p.add_argument("--data", default=None, help="CIFAR-10 (default $FASTGRAPH_DATA or the cache)")
    p.add_argument("--only", default=None, help="comma-separated variant keys (default all)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder (default bench/results)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    import torch

    from fastgraph.core.outputs import environment

    args = parse_args(argv)
    chosen = [v for v in VARIANTS if args.only is None or v.key in args.only.split(",")]
    if args.runs < 1 or not chosen:
        print("recipe_evidence: --runs must be >= 1 and --only must name variants: "
              + ", ".join(v.key for v in VARIANTS), file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, torch.get_num_threads()))
    records = {}
    with tempfile.TemporaryDirectory() as folder:
        for variant in chosen:
            records[variant.key] = run_variant(variant, args.runs, args.data, Path(folder))
            r = records[variant.key]
            print(f"{variant.key}: {100 * r['mean']:.2f} ± {100 * r['std']:.2f} % over {args.runs} runs "
                  f"({r['wall_seconds']:.0f} s)", flush=True)
    rows = comparisons(records)
    meta = {**environment("cpu"), "benchmark": "recipe_evidence",
            "scale": (f"CPU scale: {SUBSET} class-balanced training images, {TEST_SUBSET} test images, "
                      "narrow networks (ResNet-9 at widths 16/32/64/128, airbench94 at 16/64/64), "
                      "batch and epochs per variant; seeds 0..n-1; TTA accuracy as each recipe evaluates, "
                      "except page2019's variants, evaluated on the trained weights (see _PAGE_SCALE)"),
            "test": "Welch's t-test, two-sided (scipy.stats.ttest_ind, equal_var=False)"}
    print_table(records, rows)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"recipe-evidence-cpu-{dt.date.today().isoformat()}"
    stem.with_suffix(".json").write_text(json.dumps({**meta, "variants": records, "comparisons": rows},
                                                    indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(meta, records, rows))
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
