"""Time-to-accuracy of fastgraph's training recipes against airbench94, on one GPU.

One command, on a CUDA machine (fastgraph, airbench==0.1.8 and torchvision installed)::

    python bench/train_cifar10.py --data PATH/TO/cifar10 [--runs 5]

ResNet-20's 200 epochs take several minutes per run even on an H100; under a time limit
run it on its own (``--recipes resnet20_seed_baseline --runs 1``, with ``--no-airbench --target``
set to the airbench94 mean of the first invocation) or shorten it (``--epochs-for
resnet20_seed_baseline=E``, which stretches its schedule: then it is no longer He et al.'s).

1. airbench94 as published on PyPI (``airbench==0.1.8``, ``airbench.train94``; Keller
   Jordan 2024) on the *same* data: our CIFAR-10 is written as the ``cifar10/train.pt`` /
   ``cifar10/test.pt`` its loader reads ({'images': uint8 N x 32 x 32 x 3, 'labels':
   int64, 'classes'}) in a work folder it runs in, the training set in a seeded shuffled
   order (``--airbench-order-seed``, recorded in the JSON): airbench computes its
   whitening from the first 5,000 training images of the file, which in our class-sorted
   copy would all be airplanes. Its own timing (CUDA events around whitening init,
   training and TTA evaluation) and TTA accuracy are read from the table it prints.
   Raced like for like: *eager* (one ``airbench.warmup94`` call first, as its README
   does) against the recipes that train eagerly, and *compiled* as its
   ``airbench94_compiled.py`` does it (``torch.compile(mode="max-autotune")``, one
   network re-initialised every run, a whole warm-up run first, not counted) against the
   recipes that compile. Each variant runs only when a recipe needs it.
2. Each fastgraph recipe (``fast``, ``fast_muon``, ``page2019``,
   ``resnet20_seed_baseline``) on the model file it names, N runs, evaluated with TTA
   after every epoch, timed with ``fastgraph.core.timing.Timer`` (CUDA events; whitening init,
   training, final TTA evaluation counted; data upload, compile and cuDNN warm-up, progress evaluation not).
3. Per method: mean +/- std TTA accuracy, mean counted time, and the ratio of the time to
   reach the mean TTA accuracy of the airbench94 row compiled or eager as it is (the mean
   over runs of the TTA accuracy per epoch, first epoch at or above it; the time is the
   counted time to that epoch plus its TTA evaluation) over that row's mean time. "not
   reached" when it never does.

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
RECIPES = ("fast", "fast_muon", "page2019", "resnet20_seed_baseline")
# ResNet-20's 200 epochs take many minutes per run on any GPU and never reach 94%: one
# run unless --runs-for says otherwise.
DEFAULT_RUNS_FOR = {"resnet20_seed_baseline": 1}
AIRBENCH_VERSION = "0.1.8"
AIRBENCH_ORDER_SEED = 0  # seed of the shuffled order of airbench's train.pt (--airbench-order-seed)
AIRBENCH_COMPILE_MODE = "max-autotune"  # airbench94_compiled.py's torch.compile mode
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


def airbench_train_order(n: int, seed: int):
    """The order airbench's ``train.pt`` holds the training images in: int64 (n,), a
    permutation of ``range(n)`` from a CPU ``torch.Generator`` seeded with ``seed`` (the
    same on every machine and torch build that keeps torch's Philox/MT19937 stream).

    Raises:
        BenchError: ``n`` < 1.
    """
    import torch

    if n < 1:
        raise BenchError(f"no training images to write for airbench (n = {n})")
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def export_for_airbench(dataset, folder: Path, seed: int = AIRBENCH_ORDER_SEED) -> dict:
    """Write ``folder/cifar10/{train,test}.pt`` in airbench's format, the training set in
    the seeded order of :func:`airbench_train_order`; return what the JSON records of it.

    airbench's CifarLoader loads ``{'images': uint8 (N, 32, 32, 3), 'labels': int64 (N,),
    'classes': list[str]}`` (torchvision's NHWC layout) relative to the working folder,
    and ``train94`` computes its whitening from the file's first 5,000 training images:
    the official CIFAR-10 files are in random order, an ImageFolder copy (ours) is sorted
    by class, so the images are shuffled, each keeping its label. The test set keeps its
    order (airbench evaluates all of it).

    Args:
        dataset: ``fastgraph.data`` CIFAR-10 (uint8 (N, 3, 32, 32) images, int64 labels).
        folder: the work folder airbench runs in.
        seed: seed of the training-set order.

    Returns:
        ``{"train_order": how the order is made, "train_order_seed": seed}``.
    """
    import torch

    target = folder / "cifar10"
    target.mkdir(parents=True, exist_ok=True)
    order = airbench_train_order(len(dataset.train_labels), seed)
    for split, images, labels in (("train", dataset.train_images[order], dataset.train_labels[order]),
                                  ("test", dataset.test_images, dataset.test_labels)):
        torch.save({"images": images.permute(0, 2, 3, 1).contiguous(), "labels": labels.clone(),
                    "classes": list(dataset.classes)}, target / f"{split}.pt")
    return {"train_order": "torch.randperm(N, generator=torch.Generator().manual_seed(seed))",
            "train_order_seed": seed}


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
    """Add ``target``, ``time_to_target`` and ``ratio`` to each method's summary.

    A method is held against ``m["reference"]`` (else ``reference``): the airbench94 row
    compiled or eager as the method is. ``target`` is that row's mean TTA accuracy
    (fraction), ``time_to_target`` the method's counted seconds to reach it (None: never
    reached), ``ratio`` that time over the row's mean seconds; a reference's ratio is 1.
    """
    for m in methods.values():
        ref = methods[m.get("reference", reference)]
        base = ref["summary"]["seconds"]["mean"]
        if ref is m:
            m["time_to_target"] = base
        else:
            reached = m["summary"].get("target") or {}
            m["time_to_target"] = reached.get("seconds") if reached.get("reached") else None
        m["ratio"] = None if m["time_to_target"] is None else m["time_to_target"] / base
        m["target"] = ref["summary"]["tta_acc"]["mean"]
    return methods


def compile_label(m: dict) -> str:
    """How a method's network ran: ``"eager"``, or ``"compiled"`` with a mode other than default."""
    if not m.get("compiled"):
        return "eager"
    mode = m.get("compile_mode", "default")
    return "compiled" if mode == "default" else f"compiled ({mode})"


def markdown_table(methods: dict[str, dict], meta: dict) -> str:
    """The results as a Markdown table with a header naming device, torch, commit and date."""
    whose = ("per row, the mean TTA accuracy of the airbench94 row that runs as it does "
             "(compiled against compiled, eager against eager)" if meta.get("airbench")
             else "given with --target (airbench94 not run)")
    order = ("" if meta.get("airbench_train_order_seed") is None else
             f" airbench94's training set shuffled with seed {meta['airbench_train_order_seed']}.")
    lines = [f"# CIFAR-10 training: fastgraph recipes vs airbench94 ({meta['device']})", "",
             f"torch {meta['torch']}, commit {meta['commit'] or 'unknown'}, {meta['date']}; timing: "
             f"{meta['timing_method']}. Data: {meta['data']}.{order} Target: {whose}.", "",
             "| method | model | runs | TTA accuracy % (mean ± std) | min–max % | mean time s | "
             "target % | time to target s | ratio to airbench94 | network |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, m in methods.items():
        s = m["summary"]
        acc, sec = s["tta_acc"], s["seconds"]
        to_target = "not reached" if m["time_to_target"] is None else f"{m['time_to_target']:.3f}"
        ratio = "—" if m["ratio"] is None else f"{m['ratio']:.2f}"
        lines.append(f"| {name} | {m['model']} | {acc['n']} | "
                     f"{100 * acc['mean']:.2f} ± {100 * acc['std']:.2f} | "
                     f"{100 * acc['min']:.2f}–{100 * acc['max']:.2f} | {sec['mean']:.3f} | "
                     f"{100 * m['target']:.2f} | {to_target} | {ratio} | {compile_label(m)} |")
    lines += ["", "Time is counted seconds per run: whitening initialisation, training and the final TTA "
              "evaluation; data upload, compilation/warm-up and per-epoch progress "
              "evaluation are not counted. Ratio: time to reach the target over the mean time "
              "of the airbench94 row it is held against (lower is faster). Network: eager, or "
              "torch.compile (its mode)."]
    return "\n".join(lines) + "\n"


def result_stem(device_name: str, date: str) -> str:
    """``train_cifar10-<device slug>-<date>``."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    return f"train_cifar10-{slug}-{date}"


# --------------------------------------------------------------------- runners --------


def compiled_make_net94(airbench):
    """A ``make_net`` for ``airbench.train94`` that compiles as ``airbench94_compiled.py`` does.

    That script compiles its network once with ``torch.compile(mode="max-autotune")``,
    re-initialises the same compiled network at the start of every run (``reinit_net``:
    ``reset_parameters`` of its Conv, BatchNorm and Linear layers) and warms it up with a
    whole run first, so no run compiles. Here the first call builds
    ``airbench.make_net94()`` and compiles it in place (``nn.Module.compile``: the same
    compiled forward, and the network stays the ``nn.Sequential`` that ``train94``
    indexes, ``model[0]`` being the whitening conv); later calls re-initialise it. The
    script's second network for the frozen whitening bias is not needed: ``train94``
    turns the bias's ``requires_grad`` off at epoch 3 of the one network, Dynamo compiles
    a graph for each setting in the warm-up run and picks the matching one afterwards.
    """
    from torch import nn

    lib = airbench.lib_airbench94
    built = []

    def make_net():
        if not built:
            net = airbench.make_net94()
            net.compile(mode=AIRBENCH_COMPILE_MODE)
            built.append(net)
        else:
            net = built[0]
            for m in net.modules():
                if type(m) in (lib.Conv, lib.BatchNorm, nn.Linear):
                    m.reset_parameters()
        return net

    return make_net


def run_airbench(dataset, runs: int, workdir: Path, *, compiled: bool = False,
                 seed: int = AIRBENCH_ORDER_SEED) -> dict:
    """airbench94 (PyPI 0.1.8) ``runs`` times on ``dataset`` (training set shuffled with
    ``seed``), eager after one ``warmup94`` call, or ``compiled`` after one whole
    warm-up run (:func:`compiled_make_net94`).

    Returns:
        the method's record: model, version, compiled, compile_mode, train_order_seed,
        runs (TTA accuracy as a fraction, airbench's counted seconds, graphs compiled
        during the run), summary, timing method.

    Raises:
        BenchError: airbench not importable, its output unreadable, or a compiled run that
            compiled a graph after the warm-up (its time would include compilation).
    """
    try:
        import airbench
    except ImportError as exc:
        raise BenchError(f"airbench is not importable ({exc}): pip install airbench=={AIRBENCH_VERSION} "
                         "(it also needs torchvision), or pass --no-airbench --target ACC") from None
    from fastgraph.core.timing import compiled_graphs

    version = getattr(airbench, "__version__", None)
    order = export_for_airbench(dataset, workdir, seed)
    name = "airbench94_compiled" if compiled else "airbench94"
    make_net = compiled_make_net94(airbench) if compiled else airbench.make_net94
    accs, secs, compiles = [], [], []
    with contextlib.chdir(workdir):
        with contextlib.redirect_stdout(io.StringIO()):
            if compiled:  # a whole run: both whitening-bias settings, train and eval mode
                airbench.train94(run=0, verbose=True, make_net=make_net)
            else:
                airbench.warmup94()
        for run in range(runs):
            buffer = io.StringIO()
            before = compiled_graphs()
            with contextlib.redirect_stdout(buffer):
                airbench.train94(run=run, verbose=True, make_net=make_net)
            compiles.append(compiled_graphs() - before)
            if compiled and compiles[-1]:
                raise BenchError(f"{name} run {run + 1} compiled {compiles[-1]} graph(s) after its "
                                 "warm-up run: its time would include compilation")
            acc, sec = parse_airbench_table(buffer.getvalue())
            print(f"{name} run {run + 1}/{runs}: TTA {100 * acc:.2f}%, {sec:.3f} s", flush=True)
            accs.append(acc)
            secs.append(sec)
    return {"model": "airbench94 net (airbench.make_net94)", "version": version or AIRBENCH_VERSION,
            "compiled": compiled, "compile_mode": AIRBENCH_COMPILE_MODE if compiled else None,
            "reference": name, **order,
            "runs": [{"tta_acc": a, "seconds": s, "compiles": c}
                     for a, s, c in zip(accs, secs, compiles, strict=True)],
            "summary": {"tta_acc": _stats(accs), "seconds": _stats(secs)},
            "timing_method": "airbench's own: CUDA events around whitening init, training, TTA eval"}


def run_recipe(name: str, runs: int, target: float, data: str | None, device: str, epochs: float | None,
               subset: int | None = None, test_subset: int | None = None,
               batch_size: int | None = None) -> dict:
    """A fastgraph recipe on its model file, ``runs`` runs, TTA after every epoch."""
    from fastgraph.training.loop import Reporter, TrainOptions, train
    from fastgraph.training.recipes import load_recipe

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
    settings = record["settings"]
    return {"model": model, "runs": record["runs"], "summary": record["summary"],
            "settings": settings, "hyperparameters": record["hyperparameters"],
            "compiled": settings["compile"], "compile_mode": settings.get("compile_mode", "default"),
            "timing_method": result.timing_method}


# --------------------------------------------------------------------- main -----------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="CIFAR-10 for both (folder or archive; default $FASTGRAPH_DATA)")
    p.add_argument("--runs", type=int, default=5, help="runs per method (default 5)")
    p.add_argument("--runs-for", action="append", default=[], metavar="RECIPE=N",
                   help="runs for one recipe (default resnet20_seed_baseline=1)")
    p.add_argument("--epochs-for", action="append", default=[], metavar="RECIPE=E",
                   help="override a recipe's epochs (its lr schedule stretches)")
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipes to run")
    p.add_argument("--no-airbench", action="store_true", help="skip airbench94; needs --target")
    p.add_argument("--target", type=float, help="TTA accuracy to time to without airbench (fraction)")
    p.add_argument("--airbench-order-seed", type=int, default=AIRBENCH_ORDER_SEED,
                   help="seed of the shuffled order of airbench's training set "
                        f"(default {AIRBENCH_ORDER_SEED})")
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
    from fastgraph.core.errors import UserError
    from fastgraph.core.outputs import git_commit
    from fastgraph.data import load_cifar10
    from fastgraph.training.recipes import load_recipe

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
    # each recipe is raced against airbench94 run as it runs: compiled or eager (on CUDA
    # the trainer compiles when the recipe says so)
    compiles = {name: bool(load_recipe(name)["train"]["compile"]) for name in recipes}
    reference = {}
    if not skip_airbench:
        for compiled in sorted(set(compiles.values())):
            with tempfile.TemporaryDirectory(prefix="airbench-data-") as work:
                m = run_airbench(dataset, args.runs, Path(work), compiled=compiled,
                                 seed=args.airbench_order_seed)
            methods[m["reference"]] = m
            reference[compiled] = m["reference"]
    for name in recipes:
        runs = 1 if args.dry_run else runs_for.get(name, args.runs)
        epochs = 1 if args.dry_run else epochs_for.get(name)
        ref = reference.get(compiles[name])
        target = args.target if ref is None else methods[ref]["summary"]["tta_acc"]["mean"]
        try:
            methods[name] = run_recipe(name, runs, target, args.data, device, epochs, **small)
        except UserError as exc:
            raise BenchError(f"{name}: {exc}") from None
        if ref is not None:
            if methods[name]["compiled"] != compiles[name]:
                raise BenchError(f"{name} ran {compile_label(methods[name])} but was raced against "
                                 f"{ref}: the recipe's compile setting did not hold")
            methods[name]["reference"] = ref
    if skip_airbench:
        for m in methods.values():
            reached = m["summary"].get("target") or {}
            m["time_to_target"] = reached.get("seconds") if reached.get("reached") else None
            m["ratio"], m["target"] = None, args.target
    else:
        summarize(methods)

    date = datetime.now(UTC).strftime("%Y-%m-%d")
    meta = {"benchmark": "train_cifar10", "device": device_name, "torch": torch.__version__,
            "commit": git_commit(REPO), "date": date,
            "timing_method": "CUDA events" if device == "cuda" else "time.perf_counter (dry run)",
            "data": str(args.data or "$FASTGRAPH_DATA"),
            "airbench": None if skip_airbench else AIRBENCH_VERSION,
            "airbench_train_order_seed": None if skip_airbench else args.airbench_order_seed,
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
