"""Data-parallel training on CPUs (gloo, 2 processes through torchrun): the weights after a
training equal one process at the same global batch; SIGTERM stops every rank at one step
boundary with a checkpoint; a killed rank ends the others with an error, not a hang; each
checkpoint resumes; the batch split keeps ghost batches whole."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastgraph.training import checkpoint as ckpt
from fastgraph.training.distributed import batch_positions, ghost_batch_size, without_nproc
from support import REPO, stop_at, write_model, write_recipe

# float32 on both sides: the 2-process gradient is (g_0 + g_1) / 2 where one process sums the
# whole batch at once, a reordering worth ~1e-7 of each tensor's scale. Measured: 9e-8 after
# one step, 8e-7 after two (training at this lr amplifies rounding ~10x a step: 7e-4 after
# four). Splitting the batch in contiguous halves, which mixes ghost batches across ranks,
# differs by 0.6 after two steps.
RTOL = 1e-5


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def _train(tmp_path: Path, name: str, *extra, epochs=1, subset=512, nproc=1, wait=True):
    """``fastgraph train`` of a narrow ResNet-9 with the shortened Page recipe (ghost batches
    of 32, EMA) at global batch 128 on ``subset`` real images; ``nproc`` processes."""
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    model = write_model(folder, widths=(8, 16, 32, 64))
    recipe = write_recipe(folder, epochs=epochs, batch_size=128, ema=True, whitening_images=256)
    command = [sys.executable, "-m", "fastgraph", "train", str(model), "--recipe", str(recipe),
               "--device", "cpu", "--subset", str(subset), "--test-subset", "100", "--no-progress-eval",
               "--checkpoint", str(folder / "ckpt"), *map(str, extra)]
    if nproc > 1:
        command += ["--nproc", str(nproc)]
    if not wait:
        return subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True), folder
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done, folder


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / a.double().abs().max().clamp_min(1e-12))


def test_two_processes_train_what_one_process_trains_at_the_global_batch(data_path, tmp_path):
    one, one_dir = _train(tmp_path, "one", subset=256)
    two, two_dir = _train(tmp_path, "two", subset=256, nproc=2)
    a, b = ckpt.load_checkpoint(one_dir / "ckpt"), ckpt.load_checkpoint(two_dir / "ckpt")
    assert a["step"] == b["step"] == 2  # 256 images, global batches of 128
    assert b["settings"]["world_size"] == 2 and b["settings"]["backend"] == "gloo"
    # weights, BN running statistics (averaged over the ranks) and the EMA, tensor by tensor
    for what in ("model", "ema"):
        assert a[what].keys() == b[what].keys()
        worst = max((_relative(a[what][k], b[what][k]), k) for k in a[what] if a[what][k].is_floating_point())
        assert worst[0] < RTOL, (what, worst)
        moved = [k for k in a[what] if "running_mean" in k]
        assert moved and all(a[what][k].abs().max() > 0 for k in moved)  # the statistics did move
    # the training loss and accuracy are over the whole global batch on both
    ea, eb = a["epochs"][0], b["epochs"][0]
    assert abs(ea["train_loss"] - eb["train_loss"]) < 1e-4 * ea["train_loss"]
    assert ea["train_acc"] == pytest.approx(eb["train_acc"], abs=1 / 256)
    assert "results written" not in two.stderr  # rank 1 prints nothing of its own
    assert two.stdout.count("TTA accuracy") == one.stdout.count("TTA accuracy")


def _children(pid: int) -> list[int]:
    """Descendant process ids of ``pid`` (from /proc)."""
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) == parent:
                    found.append(int(entry.name))
                    frontier.append(int(entry.name))
    return found


def _rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [e.split(b"=", 1)[1] for e in environ if e.startswith(b"RANK=")]
    return int(ranks[0]) if ranks else None


def _wait_for(condition, proc, what: str, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    ended = proc.poll() is not None
    assert condition(), f"{what}: " + (proc.communicate()[0][-3000:] if ended else "timed out")


def _finish(proc, what: str) -> str:
    try:
        return proc.communicate(timeout=120)[0]  # every rank stops: no hang
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"{what}: the training hung")


def _same_as_one_process_stopped_there(folder: Path, saved: dict) -> None:
    """The 2-process checkpoint ``saved`` written mid-epoch holds what one process stopped
    after the same step holds, so it resumes on any number of processes: BatchNorm running
    statistics averaged over the ranks (each rank's own drifted 0.2 of their scale apart),
    and the epoch's loss so far as a sum of global-batch means (the sum over ranks read 2x)."""
    from fastgraph.training.loop import TrainOptions, train
    from fastgraph.training.recipes import load_recipe

    one = folder.parent / "one-process"
    recipe = load_recipe(str(folder / "recipe.toml"))
    options = TrainOptions(model_path=str(folder / "model.py"), recipe=recipe, device="cpu", subset=1024,
                           test_subset=100, progress_eval=False, checkpoint_dir=str(one))
    with pytest.raises(KeyboardInterrupt):
        train(options, stop_at(step=saved["step"]))
    alone = ckpt.load_checkpoint(one)
    assert alone["step"] == saved["step"]
    for what in ("model", "ema"):
        stats = [k for k in alone[what] if k.endswith(("running_mean", "running_var"))]
        worst = max((_relative(alone[what][k], saved[what][k]), k) for k in stats)
        assert worst[0] < 2e-2, (what, worst)  # rank 0's own drifted 0.2 away
    assert saved["partial"]["loss"] == pytest.approx(alone["partial"]["loss"], rel=1e-3)
    assert saved["partial"]["correct"] == pytest.approx(alone["partial"]["correct"], abs=2)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the rank's process through /proc")
def test_sigterm_and_a_killed_rank_leave_checkpoints_that_resume(data_path, tmp_path):
    """SIGTERM stops both ranks with a mid-epoch checkpoint; --resume continues it to the next
    epoch's checkpoint; then a killed rank ends the other with an error and leaves that one."""
    args = dict(epochs=3, subset=1024, nproc=2)  # 8 steps an epoch
    proc, folder = _train(tmp_path, "run", wait=False, **args)
    path = ckpt.checkpoint_path(folder / "ckpt")
    _wait_for(path.exists, proc, "the first epoch's checkpoint")
    # SIGTERM (what a scheduler sends): every rank stops after the same step and rank 0
    # writes a checkpoint there, inside the second epoch
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGTERM)
    output = _finish(proc, "SIGTERM")
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    saved = ckpt.load_checkpoint(folder / "ckpt")
    assert saved["epoch"] == 1 and 0 < saved["step_in_epoch"] < 8
    assert saved["step"] == 8 + saved["step_in_epoch"]
    assert "checkpoint written to" in output and "Traceback" not in output
    _same_as_one_process_stopped_there(folder, saved)
    # resumed, then rank 1 killed: the other rank and the launcher end with one line each
    written = path.stat().st_mtime_ns
    proc, _ = _train(tmp_path, "run", "--resume", wait=False, **args)
    _wait_for(lambda: path.stat().st_mtime_ns != written, proc, "the resumed second epoch's checkpoint")
    rank1 = [p for p in _children(proc.pid) if _rank_of(p) == 1]
    assert rank1, "rank 1 is not running"
    os.kill(rank1[0], signal.SIGKILL)
    output = _finish(proc, "a killed rank")
    assert proc.returncode == 2, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("fastgraph: error:")]
    # one line: rank 0 only lost its peer, which the launcher names
    assert errors == ["fastgraph: error: process 1 of 2 failed (SIGKILL); the others were stopped. "
                      "The --checkpoint folder holds the last finished epoch: continue with --resume"], output
    assert "Traceback" not in output
    # the resumed epoch's checkpoint, whole: --resume continues from it as from the first
    # (an epoch-end checkpoint resumes as in tests/training/test_train_reliability.py)
    after_kill = ckpt.load_checkpoint(folder / "ckpt")
    assert after_kill["epoch"] == 2 and after_kill["step_in_epoch"] == 0 and after_kill["step"] == 16


def test_each_rank_takes_whole_ghost_batches_in_its_own_split_order():
    batch, ghost, world = 128, 32, 2
    splits = batch // ghost
    seen = []
    for rank in range(world):
        positions = batch_positions(batch, world, rank, ghost)
        local_splits = len(positions) // ghost
        # local ghost batch g (local index i with i % local_splits == g) is one global ghost batch
        for g in range(local_splits):
            members = positions[g::local_splits]
            assert len({int(p) % splits for p in members}) == 1 and len(members) == ghost
        seen.append(positions)
    assert sorted(torch.cat(seen).tolist()) == list(range(batch))  # every image once
    # without ghost batches (or one that does not split), contiguous blocks
    assert batch_positions(128, 2, 1, None).tolist() == list(range(64, 128))
    assert batch_positions(96, 2, 0, 32).tolist() == list(range(48))  # 3 ghost batches over 2 ranks
    with pytest.raises(Exception, match="does not split over 3 processes"):
        batch_positions(128, 3, 0, None)


def test_ghost_batch_size_is_read_from_the_training_graph(tmp_path, cifar10):
    from fastgraph.core.tracing import trace
    from fastgraph.training.recipes import load_recipe
    from fastgraph.training.trained import spread_training_images, training_graph
    from support import build_example

    gm = trace(build_example(str(write_model(tmp_path, widths=(8, 16, 32, 64)))), mode="train")
    assert ghost_batch_size(gm) is None
    images, labels = spread_training_images(cifar10, 64)
    recipe = load_recipe("page2019").to_dict()
    fused, _ = training_graph(gm, recipe, images=images, labels=labels, checks=False)
    assert ghost_batch_size(fused) == 32


def test_nproc_is_taken_out_of_what_each_process_runs():
    argv = ["train", "m.py", "--nproc", "4", "--recipe", "fast", "--nproc=2", "--json", "o.json"]
    assert without_nproc(argv) == ["train", "m.py", "--recipe", "fast", "--json", "o.json"]


# One rank of a gloo training, in a fresh interpreter (where torch.distributed.nn is not yet
# imported): after a DDP step and shutdown, are gloo's threads gone? Threads that outlive
# the process group run into interpreter shutdown, where one aborted a finished rank
# (SIGABRT, "terminate called without an active exception") in 2 of 240 two-process runs. In
# "fails", the step raises with the DDP model a local of the failed frame (as a stop on
# SIGTERM or a lost peer leaves it) and shutdown is given the exception.
_ONE_RANK = """
import json, os, socket, sys, torch
from fastgraph.training import distributed as dp
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
def gloo_threads():
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    return sorted(n for n in names if "gloo" in n)
def step(ctx, fail):
    model = dp.wrap(torch.nn.Linear(4, 2), ctx)
    model(torch.ones(3, 4)).sum().backward()
    if fail:
        raise RuntimeError("stopped mid-training")
ctx = dp.initialise(torch.device("cpu"))
failure = None
try:
    step(ctx, sys.argv[1] == "fails")
except RuntimeError as exc:
    failure = exc
during = gloo_threads()
dp.shutdown(ctx, failure)
print(json.dumps([during, gloo_threads()]))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through Linux's /proc")
@pytest.mark.parametrize("ending", ["finishes", "fails"])
def test_shutdown_ends_the_process_groups_threads(ending):
    done = subprocess.run([sys.executable, "-c", _ONE_RANK, ending], env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    during, after = json.loads(done.stdout.strip().splitlines()[-1])
    assert during, "no gloo thread seen before shutdown: the check would prove nothing"
    assert after == [], f"gloo threads alive after shutdown: {after}"
