"""Check fastgraph on one CUDA GPU in one command, in under 9.5 minutes (H100/H200 class).

    python bench/gpu_check.py /path/to/cifar10-jpeg.tar.xz       # run every step
    python bench/gpu_check.py /path/to/cifar10-jpeg.tar.xz --plan   # print the plan, run nothing

The CIFAR-10 archive (or folder; any form ``--data`` takes) is copied into ``.data/`` of the
checkout unless it is there already, and every step reads it from there. The steps run one
after another, each as its own process with a time budget (killed when it runs over):

1. ``data``: ``fastgraph data info``: decode the archive once into fastgraph's cache.
2. ``kernels``: ``bench/kernels.py --only bn_act``: the fused BN + activation kernels at the
   shapes of the ``fast`` and ``page2019`` training graphs, forward and forward+backward,
   against eager PyTorch and Inductor, as fractions of the copy bandwidth measured in the
   same run (its own JSON and Markdown land in the results folder too).
3. ``gpu tests``: ``pytest -m gpu tests``: the tests that need a CUDA device (the kernel
   tests under Triton's interpreter run on every machine, in CI; not here).
4. ``optimize``: ``fastgraph optimize examples/resnet9.py --device cuda``: the exact passes,
   verified, with the measured step before and after.
5. ``ddp``: ``torchrun --nproc-per-node 1 -m fastgraph train examples/resnet9.py --recipe
   page2019 --epochs 1``: the data-parallel path (DistributedDataParallel over NCCL) on one
   GPU, a smoke test.
6. ``imagenet loader``: ``bench/imagenet_loader.py``: decode + augment images/s of the
   ImageNet-format stream on a folder it builds (1,536 CIFAR-10 images upscaled to
   320..480 px), Pillow workers and nvJPEG; the folder is kept for the next step.
7. ``resnet50``: ``examples/resnet50.py`` with the ``resnet50_ffcv16`` recipe on that
   folder, 2 epochs at batch 256 in bf16, through torchrun on one GPU with
   ``--sync-bn``: the streamed path, SyncBatchNorm and the ResNet-50 training throughput
   (images/s of the counted training time, decoding included).
8. ``train <recipe> fused`` and ``train <recipe> unfused`` for each recipe of ``--recipes``
   (default ``fast``, airbench94's network with 6 BN + GELU pairs, and ``page2019``, Page's
   ResNet-9 with 8 ghost-BN + CELU pairs, each on its own model file): 3 epochs, 2 runs,
   with the fused kernels and with ``--no-fused-kernels``. They run without
   ``torch.compile`` (the recipes' ``max-autotune`` compilation alone takes minutes): the
   comparison is between the kernels, not compilers. Where ``fastgraph train --help`` has
   no ``--no-fused-kernels``, the unfused steps are recorded as "flag not available in this
   checkout".

``--skip NAME ...`` leaves steps out (recorded as skipped). The JSON is rewritten after
every step, so a check stopped from outside keeps the steps it finished.

Prints one table and writes ``bench/results/gpu_check-<device>-<date>.json``: device, torch,
Triton and CUDA versions, commit, date, the timing method, and each step's command, budget,
status (passed, failed, timeout, skipped), seconds and numbers (kernel goals, test counts,
measured step speed-up, training accuracy and counted seconds, loader and ResNet-50
images/s). Without a CUDA device it exits with status 2 and one line: GPU numbers are never taken on a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import io
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DATA_DIR = REPO / ".data"
TOTAL_BUDGET_S = 560  # the whole check: 9 1/3 minutes of device time
TRAIN_ARGS = ["--epochs", "3", "--runs", "2", "--no-compile", "--no-progress-eval", "--device", "cuda"]
# the model file each recipe trains (the recipe's own network)
RECIPE_MODELS = {"fast": "bench/models/airbench94_net.py", "page2019": "examples/resnet9.py"}
RECIPES = ("fast", "page2019")  # trained by default
IMAGENET_IMAGES = 1536  # the built ImageNet-format folder: 10 classes of 320..480 px JPEGs


def step_names(recipes=RECIPES) -> tuple[str, ...]:
    """The names of the check's steps, in order, for the training ``recipes``."""
    trains = [f"train {r} {kind}" for r in recipes for kind in ("fused", "unfused")]
    return ("data", "kernels", "gpu tests", "optimize", "ddp", "imagenet loader", "resnet50", *trains)
NO_FLAG = "flag not available in this checkout"
TIMING_METHOD = ("steps: wall-clock seconds of each step's process (time.perf_counter), killed past its "
                 "budget; kernels: bench/kernels.py's (triton.testing.do_bench, CUDA events, L2 flushed, "
                 "median); optimize: fastgraph optimize's measured step (CUDA-synchronised, alternated "
                 "before/after); training: fastgraph train's counted seconds (its timing_method)")


@dataclass(frozen=True)
class Step:
    """One step of the check: ``command`` (argv, run in the repository root) killed after
    ``budget_s`` seconds; ``output`` the JSON file the step writes (None: numbers are parsed
    from its output); ``skip`` why it does not run (None: it runs)."""

    name: str
    what: str
    command: tuple[str, ...]
    budget_s: int
    output: str | None = None
    skip: str | None = None


def fused_flag_available() -> bool:
    """Whether this checkout's ``fastgraph train`` takes ``--no-fused-kernels``: read from the
    help text ``fastgraph train --help`` prints (the CLI's own parser, built here)."""
    from fastgraph.cli.main import build_parser

    help_text = io.StringIO()
    with contextlib.redirect_stdout(help_text), contextlib.suppress(SystemExit):
        build_parser().parse_args(["train", "--help"])
    return "--no-fused-kernels" in help_text.getvalue()


def plan(data: str | Path, work: str | Path, *, fused_flag: bool, results: str | Path = RESULTS,
         recipes: tuple[str, ...] = RECIPES, skip: tuple[str, ...] = ()) -> list[Step]:
    """The steps of the check, in order, with their commands and time budgets (seconds).

    Args:
        data: the CIFAR-10 location every step reads (``--data``).
        work: a folder for the steps' JSON files.
        fused_flag: whether ``fastgraph train`` takes ``--no-fused-kernels``; without it the
            unfused training steps are skipped, saying so.
        results: where ``bench/kernels.py`` writes its JSON and Markdown.
        recipes: the recipes trained, fused and unfused (keys of ``RECIPE_MODELS``).
        skip: names of steps to leave out (:func:`step_names`); they are recorded as skipped.

    The budgets add up to at most ``TOTAL_BUDGET_S``.

    Raises:
        ValueError: an unknown recipe or step name.
    """
    unknown = [r for r in recipes if r not in RECIPE_MODELS]
    if unknown or not recipes:
        raise ValueError(f"unknown recipe {unknown[0] if unknown else None!r}; "
                         f"choose from {', '.join(RECIPE_MODELS)}")
    names = step_names(recipes)
    unknown = sorted(set(skip) - set(names))
    if unknown:
        raise ValueError(f"unknown step {unknown[0]!r}; steps are {', '.join(names)}")
    data, work, py = str(data), Path(work), sys.executable
    fastgraph = (py, "-m", "fastgraph")
    steps = [
        Step("data", "decode CIFAR-10 into the cache", (*fastgraph, "data", "info", "--data", data), 25),
        Step("kernels", "bn_act at the recipes' shapes vs eager, Inductor and copy bandwidth",
             (py, "bench/kernels.py", "--only", "bn_act", "--out", str(results)), 120),
        Step("gpu tests", "pytest -m gpu", (py, "-m", "pytest", "-q", "-m", "gpu", "tests"), 90),
        Step("optimize", "fastgraph optimize examples/resnet9.py --device cuda",
             (*fastgraph, "optimize", "examples/resnet9.py", "--device", "cuda", "--data", data,
              "--out", str(work / "resnet9.optimized.pt"), "--json", str(work / "optimize.json")),
             25, output=str(work / "optimize.json")),
        Step("ddp", "page2019, 1 epoch, DistributedDataParallel on one GPU (torchrun, NCCL)",
             (py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "fastgraph",
              "train", RECIPE_MODELS["page2019"], "--recipe", "page2019", "--epochs", "1", "--no-compile",
              "--device", "cuda", "--data", data, "--json", str(work / "ddp.json")),
             38, output=str(work / "ddp.json")),
        Step("imagenet loader", "ImageNet-format decode + augment images/s, Pillow workers and nvJPEG",
             (py, "bench/imagenet_loader.py", "--images", str(IMAGENET_IMAGES), "--batch-size", "256",
              "--resolutions", "160", "224",
              "--keep-input", str(work / "imagenet"), "--out", str(results)), 45),
        Step("resnet50", "examples/resnet50.py, resnet50_ffcv16, DDP + SyncBatchNorm on one GPU, bf16",
             (py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "fastgraph",
              "train", "examples/resnet50.py", "--recipe", "resnet50_ffcv16",
              "--data", str(work / "imagenet"), "--epochs", "2", "--batch-size", "256", "--precision", "bf16",
              "--no-compile", "--sync-bn", "--no-progress-eval", "--device", "cuda",
              "--json", str(work / "resnet50.json")),
             60, output=str(work / "resnet50.json")),
    ]
    budget = (TOTAL_BUDGET_S - sum(step.budget_s for step in steps)) // (2 * len(recipes))
    for recipe in recipes:
        train = (*fastgraph, "train", RECIPE_MODELS[recipe], "--recipe", recipe, *TRAIN_ARGS, "--data", data)
        for kind, flag in (("fused", ()), ("unfused", ("--no-fused-kernels",))):
            out = str(work / f"train-{recipe}-{kind}.json")
            steps.append(Step(f"train {recipe} {kind}", f"{recipe}, 3 epochs, 2 runs, {kind}",
                              (*train, *flag, "--json", out), budget, output=out,
                              skip=None if fused_flag or not flag else NO_FLAG))
    return [dataclasses.replace(s, skip="left out (--skip)") if s.name in skip else s for s in steps]


# ----------------------------------------------------------------------------- numbers


def _pytest_counts(text: str) -> dict:
    """Counts of pytest's last summary line ("3 passed, 1 skipped in 2.0s")."""
    counts = {}
    for line in reversed(text.strip().splitlines()):
        found = re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", line)
        if found:
            counts = {kind.rstrip("s") if kind.startswith("error") else kind: int(n) for n, kind in found}
            break
    return counts


def _kernels_numbers(text: str) -> dict:
    written = re.search(r"wrote (\S+)\.json and", text)
    if not written:
        return {}
    record = json.loads(Path(written.group(1) + ".json").read_text())
    goals = record.get("bn_act_goals", [])
    copy_goals = [g["copy_goal"] for g in goals if g["copy_goal"] is not None]
    inductor_goals = [g["inductor_goal"] for g in goals if g["inductor_goal"] is not None]
    return {"file": written.group(1) + ".json",
            "goal_timing": sorted({g.get("timing", "call") for g in goals}),
            "copy_bandwidth_gbps": record["copy_bandwidth_bytes_per_s"] / 1e9,
            "faster_than_inductor": f"{sum(inductor_goals)}/{len(inductor_goals)}",
            "copy_goal_met": f"{sum(copy_goals)}/{len(copy_goals)}",
            "bn_act_goals": goals}


def _optimize_numbers(record: dict) -> dict:
    step = record.get("measured_step", {})
    return {"applied": [p.get("name") for p in record.get("passes", []) if p.get("status") == "applied"],
            "speedup": step.get("speedup"), "verdict": step.get("verdict"), "device": record.get("device")}


def _train_numbers(record: dict) -> dict:
    summary = record.get("summary", {})
    return {"tta_acc_mean": summary.get("tta_acc", {}).get("mean"),
            "tta_acc_std": summary.get("tta_acc", {}).get("std"),
            "seconds_mean": summary.get("seconds", {}).get("mean"),
            "seconds_std": summary.get("seconds", {}).get("std"),
            "runs": len(record.get("runs", [])),
            "world_size": record.get("settings", {}).get("world_size"),
            "backend": record.get("settings", {}).get("backend")}


def _loader_numbers(text: str) -> dict:
    written = re.search(r"wrote (\S+\.json)", text)
    if not written:
        return {}
    record = json.loads(Path(written.group(1)).read_text())
    return {"file": written.group(1), "images_per_s": {f"{r['decoder']} {r['stage']} {r['res']}":
                                                       round(r["images_per_s"]) for r in record["results"]}}


def _throughput(record: dict) -> dict:
    """Training images/s of a run's counted training seconds (steps x batch / train phase)."""
    run = (record.get("runs") or [{}])[0]
    train = run.get("phases", {}).get("phases", {}).get("train", {}).get("seconds")
    steps = run["epochs"][-1]["step"] if run.get("epochs") else None
    batch = record.get("settings", {}).get("batch_size")
    return {"train_images_per_s": steps * batch / train if train and steps and batch else None}


def _numbers(step: Step, text: str) -> dict:
    if step.name == "kernels":
        return _kernels_numbers(text)
    if step.name == "imagenet loader":
        return _loader_numbers(text)
    if step.name.endswith("tests"):
        return _pytest_counts(text)
    if step.output and Path(step.output).is_file():
        record = json.loads(Path(step.output).read_text())
        if step.name == "optimize":
            return _optimize_numbers(record)
        return {**_train_numbers(record), **_throughput(record)}
    return {}


def run_step(step: Step, env: dict) -> dict:
    """Run one step: its record (status passed / failed (exit N) / timeout / skipped, seconds,
    numbers, the last 3,000 characters of its output)."""
    record = {"name": step.name, "what": step.what, "command": list(step.command), "budget_s": step.budget_s}
    if step.skip:
        return dict(record, status="skipped", reason=step.skip, seconds=None, numbers={})
    t0 = time.perf_counter()
    # Its own process group and a file for its output: at the budget the whole group dies
    # (Inductor's compile workers and pytest's subprocesses too), and no pipe stays open.
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(step.command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            code = proc.wait(timeout=step.budget_s)
            status = "passed" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = "timeout"
        log.seek(0)
        text = log.read()
    seconds = time.perf_counter() - t0
    try:
        numbers = _numbers(step, text)
    except (OSError, ValueError, KeyError) as exc:  # a step's half-written file must not lose the others
        numbers = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return dict(record, status=status, seconds=seconds, numbers=numbers, output_tail=text[-3000:])


def _summary(record: dict, fused_seconds: dict[str, float]) -> str:
    n = record["numbers"]
    if record["status"] == "skipped":
        return record["reason"]
    if "error" in n:
        return n["error"]
    name = record["name"]
    if name == "kernels" and n:
        timing = "GPU time, CUDA graphs" if n.get("goal_timing") == ["graph"] else "per call"
        return (f"copy {n['copy_bandwidth_gbps']:.0f} GB/s; {timing}: faster than Inductor "
                f"{n['faster_than_inductor']}; >= 70% copy BW (fwd+bwd, large) {n['copy_goal_met']}")
    if name.endswith("tests"):
        return ", ".join(f"{v} {k}" for k, v in n.items()) or "-"
    if name == "optimize" and n:
        speedup = "-" if n["speedup"] is None else f"{n['speedup']:.2f}x"
        return f"applied {', '.join(n['applied']) or 'nothing'}; step {speedup} ({n['verdict']})"
    if name == "imagenet loader" and n:
        return "; ".join(f"{k} {v}/s" for k, v in n["images_per_s"].items() if k.endswith(("160", "224")))
    if name == "resnet50" and n.get("train_images_per_s"):
        return (f"{n['train_images_per_s']:.0f} images/s training (decode included), "
                f"{n['world_size']} process, {n['backend']}, SyncBatchNorm")
    if (name.startswith("train") or name == "ddp") and n.get("seconds_mean") is not None:
        acc = n["tta_acc_mean"]
        text = f"TTA {100 * acc:.2f}%, {n['seconds_mean']:.2f} s mean of {n['runs']} runs"
        fused = fused_seconds.get(name.replace(" unfused", " fused"))
        if name.endswith(" unfused") and fused:
            text += f"; fused {n['seconds_mean'] / fused:.2f}x faster"
        if name == "ddp":
            text += f"; DDP, {n['world_size']} process, {n['backend']}"
        return text
    return "-"


def _device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _dirty() -> bool | None:
    """Whether the checkout has uncommitted changes (None: not a git checkout, or a copied
    tree whose commit ``FASTGRAPH_GIT_COMMIT`` names)."""
    if os.environ.get("FASTGRAPH_GIT_COMMIT"):
        return None
    done = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True)
    return bool(done.stdout.strip()) if done.returncode == 0 else None


def _print(title: str, header: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for h in header:
        table.add_column(h)
    for row in rows:
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # a log file: do not squeeze the table into 80 columns
        console = Console(width=200)
    console.print(table)


def _stage_data(source: Path) -> Path:
    """``source`` itself when it lies in ``.data/``, else its copy there (made once)."""
    source = source.resolve()
    if DATA_DIR.resolve() in source.parents:
        return source
    target = DATA_DIR / source.name
    if not target.exists():
        DATA_DIR.mkdir(exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, target)
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="CIFAR-10 archive (e.g. cifar10-jpeg.tar.xz) or folder")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default bench/results)")
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPE_MODELS), default=list(RECIPES),
                        help=f"recipes of the training steps (default {' '.join(RECIPES)})")
    parser.add_argument("--skip", nargs="+", default=[], metavar="STEP",
                        help=f"steps to leave out: {', '.join(repr(n) for n in step_names())}")
    parser.add_argument("--plan", action="store_true", help="print the steps, commands, budgets; run nothing")
    args = parser.parse_args(argv)
    options = dict(fused_flag=fused_flag_available(), results=args.out, recipes=tuple(args.recipes),
                   skip=tuple(args.skip))
    try:
        plan(args.data, "<work>", **options)
    except ValueError as exc:  # an unknown step name
        parser.error(str(exc))
    if args.plan:
        steps = plan(args.data, "<work>", **options)
        _print("gpu_check plan", ["step", "budget s", "command"],
               [[s.name, str(s.budget_s), s.skip or shlex.join(s.command)] for s in steps])
        return 0
    import torch

    if not torch.cuda.is_available():
        print("bench/gpu_check.py: no CUDA device; this check runs on a GPU machine only", file=sys.stderr)
        return 2
    if not args.data.exists():
        print(f"bench/gpu_check.py: CIFAR-10 not found at {args.data}", file=sys.stderr)
        return 2
    import triton

    data = _stage_data(args.data)
    env = dict(os.environ, FASTGRAPH_DATA=str(data))
    env.pop("TRITON_INTERPRET", None)  # compiled kernels; tests/kernels sets the interpreter itself
    device = torch.cuda.get_device_name(0)
    date = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    from fastgraph.core.outputs import git_commit

    props = torch.cuda.get_device_properties(0)
    payload = {"benchmark": "gpu_check",
               "device": {"name": device, "capability": list(torch.cuda.get_device_capability(0)),
                          "memory_bytes": props.total_memory, "sm_count": props.multi_processor_count},
               "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
               "python": platform.python_version(), "git_commit": git_commit(REPO), "git_dirty": _dirty(),
               "date": date, "timing_method": TIMING_METHOD, "data": str(data), "recipes": args.recipes,
               "steps": []}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu_check-{_device_slug(device)}-{date[:10]}.json"
    records = payload["steps"]
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as work:
        for step in plan(data, work, **options):
            print(f"gpu_check: {step.name} (budget {step.budget_s} s) ...", flush=True)
            records.append(run_step(step, env))
            path.write_text(json.dumps(payload, indent=2) + "\n")  # kept if the check is stopped
    fused = {r["name"]: r["numbers"]["seconds_mean"] for r in records
             if r["name"].endswith(" fused") and r["numbers"].get("seconds_mean")}
    rows = [[r["name"], r["status"], "-" if r["seconds"] is None else f"{r['seconds']:.0f}/{r['budget_s']}",
             _summary(r, fused)] for r in records]
    _print(f"fastgraph gpu_check, {device}, {date}", ["step", "status", "s / budget", "numbers"], rows)
    print(f"wrote {path}")
    return 0 if all(r["status"] in ("passed", "skipped") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
