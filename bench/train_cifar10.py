"""Time-to-accuracy of fastgraph's training recipes against airbench94, on one GPU.

One command, on a CUDA machine (fastgraph, airbench==0.1.8 and torchvision installed)::

    python bench/train_cifar10.py --data PATH/TO/cifar10 [--runs 5]

ResNet-20's 200 epochs take several minutes per run even on an H100; under a time limit
run it on its own (``--recipes resnet20_he2016 --runs 1``, with ``--no-airbench --target``
set to the airbench94 mean of the first invocation) or shorten it (``--epochs-for
resnet20_he2016=E``, which stretches its schedule: then it is no longer He et al.'s).

1. airbench94 as published on PyPI (``airbench==0.1.8``, ``airbench.train94``; Keller
   Jordan 2024), uncompiled, on the *same* data: our CIFAR-10 is written as the
   ``cifar10/train.pt`` / ``cifar10/test.pt`` its loader reads ({'images': uint8
   N x 32 x 32 x 3, 'labels': int64, 'classes'}) in a work folder it runs in. Its own
   timing (CUDA events around whitening init, training and TTA evaluation) and TTA
   accuracy are read from the table it prints. One warm-up call (``airbench.warmup94``)
   first, as its README does.
2. Each fastgraph recipe (``fast``, ``page2019``, ``resnet20_he2016``) on the model file
   it names, N runs, evaluated with TTA after every epoch, timed with
   ``fastgraph.timing.Timer`` (CUDA events; whitening init, training, final TTA
   evaluation counted; data upload, compile and cuDNN warm-up, progress evaluation not).
3. Per method: mean +/- std TTA accuracy, mean counted time, and the ratio of the time to
   reach airbench94's own mean TTA accuracy (the mean over runs of the TTA accuracy per
   epoch, first epoch at or above it; the time is the counted time to that epoch plus
   its TTA evaluation) over airbench94's mean time. "not reached" when it never does.

Writes ``bench/results/train_cifar10-<device>-<date>.json`` (device, torch version,
commit, date, timing method, per-run results) and a Markdown table beside it, and
prints the table. Without CUDA it refuses in one line (exit 2): a CPU run would not be
a measurement of anything this benchmark claims. The data is JPEG-re-encoded CIFAR-10
here: compare the methods side by side on it, never with published accuracies.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import statistics
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
RECIPES = ("fast", "page2019", "resnet20_he2016")
# ResNet-20's 200 epochs take many minutes per run on any GPU and never reach 94%: one
# run unless --runs-for says otherwise.
DEFAULT_RUNS_FOR = {"resnet20_he2016": 1}
AIRBENCH_VERSION = "0.1.8"
AIRBENCH_COLUMNS = ("run", "epoch", "train_loss", "train_acc", "val_acc", "tta_val_acc", "total_time_seconds")


class BenchError(Exception):
    """A problem the user fixes (no GPU, no airbench, bad option): one line, exit 2."""


# --------------------------------------------------------------------- pieces ---------


def parse_assignments(items: list[str], kind, what: str) -> dict:
    """``["fast=3", ...]`` -> ``{"fast": kind("3")}``; recipe names checked."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in RECIPES:
            raise BenchError(f"{what} takes RECIPE=VALUE with RECIPE in {', '.join(RECIPES)}, got {item!r}")
        try:
            out[name] = kind(value)
        except ValueError:
            raise BenchError(f"{what} {item!r}: {value!r} is not a {kind.__name__}") from None
    return out


def export_for_airbench(dataset, folder: Path) -> Path:
    """Write ``folder/cifar10/{train,test}.pt`` in airbench's format; returns ``folder``.

    airbench's CifarLoader loads ``{'images': uint8 (N, 32, 32, 3), 'labels': int64 (N,),
    'classes': list[str]}`` (torchvision's NHWC layout) relative to the working folder.
    """
    import torch

    target = folder / "cifar10"
    target.mkdir(parents=True, exist_ok=True)
    for split, images, labels in (("train", dataset.train_images, dataset.train_labels),
                                  ("test", dataset.test_images, dataset.test_labels)):
        torch.save({"images": images.permute(0, 2, 3, 1).contiguous(), "labels": labels.clone(),
                    "classes": list(dataset.classes)}, target / f"{split}.pt")
    return folder


def parse_airbench_table(text: str) -> tuple[float, float]:
    """(TTA accuracy as a fraction, counted seconds) from the table ``train94(verbose=True)`` prints.

    The row whose epoch column is ``eval`` holds ``tta_val_acc`` and ``total_time_seconds``.

    Raises:
        BenchError: no such row (airbench's output format changed).
    """
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        fields = [f.strip() for f in line.strip().strip("|").split("|")]
        if len(fields) == len(AIRBENCH_COLUMNS) and fields[1] == "eval":
            row = dict(zip(AIRBENCH_COLUMNS, fields, strict=True))
            return float(row["tta_val_acc"]), float(row["total_time_seconds"])
    raise BenchError("no 'eval' row in airbench's output: is it airbench==0.1.8? output ends: "
                     + " / ".join(text.strip().splitlines()[-3:]))


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def summarize(methods: dict[str, dict], reference: str = "airbench94") -> dict[str, dict]:
    """Add ``time_to_target`` and ``ratio`` (time to the reference's mean TTA accuracy over
    the reference's mean time) to each method's summary; the reference's ratio is 1."""
    base = methods[reference]["summary"]["seconds"]["mean"]
    target = methods[reference]["summary"]["tta_acc"]["mean"]
    for name, m in methods.items():
        if name == reference:
            m["time_to_target"] = base
        else:
            reached = m["summary"].get("target") or {}
            m["time_to_target"] = reached.get("seconds") if reached.get("reached") else None
        m["ratio"] = None if m["time_to_target"] is None else m["time_to_target"] / base
        m["target"] = target
    return methods


def markdown_table(methods: dict[str, dict], meta: dict) -> str:
    """The results as a Markdown table with a header naming device, torch, commit and date."""
    target = next(iter(methods.values()))["target"]
    whose = ("airbench94's own mean TTA accuracy" if meta.get("airbench")
             else "given with --target (airbench94 not run)")
    lines = [f"# CIFAR-10 training: fastgraph recipes vs airbench94 ({meta['device']})", "",
             f"torch {meta['torch']}, commit {meta['commit'] or 'unknown'}, {meta['date']}; timing: "
             f"{meta['timing_method']}. Data: {meta['data']}. Target: {100 * target:.2f}%, {whose}.", "",
             "| method | model | runs | TTA accuracy % (mean ± std) | min–max % | mean time s | "
             "time to target s | ratio to airbench94 |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, m in methods.items():
        s = m["summary"]
        acc, sec = s["tta_acc"], s["seconds"]
        to_target = "not reached" if m["time_to_target"] is None else f"{m['time_to_target']:.3f}"
        ratio = "—" if m["ratio"] is None else f"{m['ratio']:.2f}"
        lines.append(f"| {name} | {m['model']} | {acc['n']} | "
                     f"{100 * acc['mean']:.2f} ± {100 * acc['std']:.2f} | "
                     f"{100 * acc['min']:.2f}–{100 * acc['max']:.2f} | {sec['mean']:.3f} | "
                     f"{to_target} | {ratio} |")
    lines += ["", "Time is counted seconds per run: whitening initialisation, training and the final TTA "
              "evaluation; data upload, compilation/warm-up and per-epoch progress "
              "evaluation are not counted. Ratio: time to reach airbench94's mean TTA accuracy "
              "over airbench94's mean time (lower is faster)."]
    return "\n".join(lines) + "\n"


def result_stem(device_name: str, date: str) -> str:
    """``train_cifar10-<device slug>-<date>``."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    return f"train_cifar10-{slug}-{date}"


# --------------------------------------------------------------------- runners --------


def run_airbench(dataset, runs: int, workdir: Path) -> dict:
    """airbench94 (PyPI 0.1.8) ``runs`` times on ``dataset`` after one warm-up call."""
    try:
        import airbench
    except ImportError as exc:
        raise BenchError(f"airbench is not importable ({exc}): pip install airbench=={AIRBENCH_VERSION} "
                         "(it also needs torchvision), or pass --no-airbench --target ACC") from None
    version = getattr(airbench, "__version__", None)
    export_for_airbench(dataset, workdir)
    accs, secs = [], []
    with contextlib.chdir(workdir):
        with contextlib.redirect_stdout(io.StringIO()):
            airbench.warmup94()
        for run in range(runs):
            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer):
                airbench.train94(run=run, verbose=True)
            acc, sec = parse_airbench_table(buffer.getvalue())
            print(f"airbench94 run {run + 1}/{runs}: TTA {100 * acc:.2f}%, {sec:.3f} s", flush=True)
            accs.append(acc)
            secs.append(sec)
    return {"model": "airbench94 net (airbench.make_net94)", "version": version or AIRBENCH_VERSION,
            "runs": [{"tta_acc": a, "seconds": s} for a, s in zip(accs, secs, strict=True)],
            "summary": {"tta_acc": _stats(accs), "seconds": _stats(secs)},
            "timing_method": "airbench's own: CUDA events around whitening init, training, TTA eval"}


def run_recipe(name: str, runs: int, target: float, data: str | None, device: str, epochs: float | None,
               subset: int | None = None, test_subset: int | None = None,
               batch_size: int | None = None) -> dict:
    """A fastgraph recipe on its model file, ``runs`` runs, TTA after every epoch."""
    from fastgraph.recipes import load_recipe
    from fastgraph.train import Reporter, TrainOptions, train

    class Progress(Reporter):
        def run_end(self, run, record):
            print(f"{name} run {run + 1}/{runs}: TTA {100 * record.tta_acc:.2f}%, {record.seconds:.3f} s",
                  flush=True)

    recipe = load_recipe(name)
    model = recipe[""]["model"]
    result = train(TrainOptions(model_path=str(REPO / model), recipe=recipe, runs=runs, target=target,
                                data=data, device=device, epochs=epochs, subset=subset,
                                test_subset=test_subset, batch_size=batch_size), Progress())
    record = result.to_dict()
    return {"model": model, "runs": record["runs"], "summary": record["summary"],
            "settings": record["settings"], "hyperparameters": record["hyperparameters"],
            "timing_method": result.timing_method}


# --------------------------------------------------------------------- main -----------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="CIFAR-10 for both (folder or archive; default $FASTGRAPH_DATA)")
    p.add_argument("--runs", type=int, default=5, help="runs per method (default 5)")
    p.add_argument("--runs-for", action="append", default=[], metavar="RECIPE=N",
                   help="runs for one recipe (default resnet20_he2016=1)")
    p.add_argument("--epochs-for", action="append", default=[], metavar="RECIPE=E",
                   help="override a recipe's epochs (its lr schedule stretches)")
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipes to run")
    p.add_argument("--no-airbench", action="store_true", help="skip airbench94; needs --target")
    p.add_argument("--target", type=float, help="TTA accuracy to time to without airbench (fraction)")
    p.add_argument("--out", default=str(RESULTS), help="folder for the JSON and Markdown results")
    p.add_argument("--dry-run", action="store_true",
                   help="exercise everything but the GPU on the CPU (tiny subsets, no airbench, "
                        "results written under a temporary folder, never under bench/results)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except BenchError as exc:
        print(f"train_cifar10: error: {exc}", file=sys.stderr)
        return 2


def _main(args) -> int:
    import torch

    try:
        import fastgraph  # noqa: F401
    except ImportError:
        raise BenchError("fastgraph is not installed: pip install -e . in the repository first") from None
    from fastgraph.cli_common import git_commit
    from fastgraph.data import load_cifar10
    from fastgraph.errors import UserError

    if not args.dry_run and not torch.cuda.is_available():
        raise BenchError("needs a CUDA GPU: this benchmark times GPU training "
                         "(use --dry-run to check it on a CPU)")
    recipes = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown or args.runs < 1:
        raise BenchError(f"--recipes must be among {', '.join(RECIPES)} and --runs >= 1, "
                         f"got {args.recipes}, {args.runs}")
    runs_for = {**DEFAULT_RUNS_FOR, **parse_assignments(args.runs_for, int, "--runs-for")}
    epochs_for = parse_assignments(args.epochs_for, float, "--epochs-for")
    skip_airbench = args.no_airbench or args.dry_run
    if skip_airbench and args.target is None:
        raise BenchError("without airbench94 give --target ACC (a fraction, e.g. 0.94)")
    try:
        dataset = load_cifar10(args.data)
    except UserError as exc:
        raise BenchError(str(exc)) from None

    device = "cpu" if args.dry_run else "cuda"
    device_name = "CPU dry run" if args.dry_run else torch.cuda.get_device_name(0)
    small = dict(subset=256, test_subset=100, batch_size=64) if args.dry_run else {}
    methods: dict[str, dict] = {}
    if skip_airbench:
        target = args.target
    else:
        with tempfile.TemporaryDirectory(prefix="airbench-data-") as work:
            methods["airbench94"] = run_airbench(dataset, args.runs, Path(work))
        target = methods["airbench94"]["summary"]["tta_acc"]["mean"]
    for name in recipes:
        runs = 1 if args.dry_run else runs_for.get(name, args.runs)
        epochs = 1 if args.dry_run else epochs_for.get(name)
        try:
            methods[name] = run_recipe(name, runs, target, args.data, device, epochs, **small)
        except UserError as exc:
            raise BenchError(f"{name}: {exc}") from None
    if skip_airbench:
        for m in methods.values():
            reached = m["summary"].get("target") or {}
            m["time_to_target"] = reached.get("seconds") if reached.get("reached") else None
            m["ratio"], m["target"] = None, target
    else:
        summarize(methods)

    date = datetime.now(UTC).strftime("%Y-%m-%d")
    meta = {"benchmark": "train_cifar10", "device": device_name, "torch": torch.__version__,
            "commit": git_commit(REPO), "date": date,
            "timing_method": "CUDA events" if device == "cuda" else "time.perf_counter (dry run)",
            "data": str(args.data or "$FASTGRAPH_DATA"),
            "airbench": None if skip_airbench else AIRBENCH_VERSION,
            "dry_run": bool(args.dry_run)}
    out = Path(tempfile.mkdtemp(prefix="train_cifar10-dry-")) if args.dry_run else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = result_stem(device_name, date)
    for n in range(2, 1000):  # a second run the same day must not overwrite the first
        if not (out / f"{stem}.json").exists():
            break
        stem = f"{result_stem(device_name, date)}-{n}"
    (out / f"{stem}.json").write_text(json.dumps({**meta, "methods": methods}, indent=2) + "\n")
    table = markdown_table(methods, meta)
    (out / f"{stem}.md").write_text(table)
    print(table)
    print(f"written: {out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
