"""Data-parallel training on PyTorch's own engine: ``torchrun`` starts the processes,
``torch.distributed`` connects them (NCCL on GPUs, gloo on CPUs) and
``DistributedDataParallel`` averages the gradients.

``torchrun --nproc-per-node N -m fastgraph train ...`` (or ``fastgraph train --nproc N``,
which starts torchrun) gives every process its ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``;
:func:`from_environment` reads them (one process under torchrun trains in DDP too: a
smoke test of the path on one GPU). What each process does:

- **The same global batch, split.** Every rank draws the epoch's permutation and every
  image's augmentation from the run's seed, as one process would, and trains on its own
  positions of each global batch (:func:`batch_positions`). Each image still gets its own
  draw; the ranks together train on exactly the batches one process at the global batch
  would, so the recipe's batch size and learning rate are the global ones.
- **Ghost batch norm stays exact.** With ghost batches of G images, the global batch holds
  B / G ghost batches (sample n in ghost batch n mod (B / G)). Each rank takes whole ghost
  batches, ordered so that its own ghost split groups the same images: where W divides
  B / G the ranks compute exactly the single-process function. Plain BatchNorm normalises
  over each rank's B / W images (the usual DDP behaviour; as ghost BN with G = B / W).
- **BatchNorm running statistics** are averaged over the ranks before every evaluation and
  checkpoint (:func:`average_running_stats`). Every update of them (BN's momentum, the EMA
  of the weights, Lookahead's copy back) is linear, so the average is what one process
  would hold.
- **Rank 0** alone evaluates, reports, writes checkpoints and the JSON; the others wait at
  the next collective. ``--resume`` loads the same checkpoint on every rank.
- **Stopping together.** A Ctrl-C or SIGTERM reaches the ranks at slightly different
  moments; each step all-reduces its stop request asynchronously and every rank acts on
  the previous step's agreed answer (:class:`StopAgreement`), so all stop after the same
  step and none waits forever in a gradient all-reduce.
- **A lost rank** ends the others through torchrun (which stops the whole group when a
  worker fails) or, without it, through the process group's timeout
  (``FASTGRAPH_DIST_TIMEOUT`` seconds, default 300), with an error, never a hang.

Multi-node training is torchrun's rendezvous (``--nnodes``, ``--rdzv-backend c10d``,
``--rdzv-endpoint HOST:PORT``); the README shows a Slurm script.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import signal
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from fastgraph.core.errors import UserError

DEFAULT_TIMEOUT_S = 300


@dataclass
class DistributedContext:
    """This process's place in a data-parallel training.

    rank: 0..world_size-1 over all nodes; local_rank: index on this node (its GPU);
    world_size: number of processes; backend: "nccl" or "gloo"; control: the gloo group
    small CPU messages go through (None: the default group, already gloo; None after
    :func:`shutdown`, which releases it).
    """

    rank: int
    local_rank: int
    world_size: int
    backend: str
    control: object = field(default=None, compare=False, repr=False)

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the one that evaluates, reports and writes."""
        return self.rank == 0

    def device(self, requested: torch.device) -> torch.device:
        """The device of this rank: ``cuda:local_rank`` for a CUDA training, else ``requested``."""
        return torch.device("cuda", self.local_rank) if requested.type == "cuda" else requested


def from_environment() -> tuple[int, int, int] | None:
    """(rank, local_rank, world_size) from torchrun's environment (``RANK`` and
    ``WORLD_SIZE`` set; one process too, which runs DDP all the same), or None when this
    process was not started by torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError) as exc:
        raise UserError(f"WORLD_SIZE is set but RANK is not a number ({exc}): start with torchrun") from None


def timeout_seconds() -> float:
    """The process groups' timeout: ``FASTGRAPH_DIST_TIMEOUT`` seconds, default
    :data:`DEFAULT_TIMEOUT_S`.

    Raises:
        UserError: the variable is set to something other than a number of seconds > 0.
    """
    text = os.environ.get("FASTGRAPH_DIST_TIMEOUT")
    if text is None:
        return float(DEFAULT_TIMEOUT_S)
    try:
        seconds = float(text)
        datetime.timedelta(seconds=seconds)  # a count of seconds past timedelta's range overflows
    except (ValueError, OverflowError):
        seconds = math.nan
    if not (seconds > 0 and math.isfinite(seconds)):
        raise UserError(f"FASTGRAPH_DIST_TIMEOUT must be a number of seconds > 0, got {text!r}")
    return seconds


def initialise(device: torch.device) -> DistributedContext | None:
    """Join the process group torchrun set up (NCCL for a CUDA ``device``, else gloo),
    with a timeout of ``FASTGRAPH_DIST_TIMEOUT`` seconds; None when not distributed.

    Raises:
        UserError: a CUDA training with more processes on a node than GPUs; a bad
            ``FASTGRAPH_DIST_TIMEOUT`` (see :func:`timeout_seconds`).
    """
    found = from_environment()
    if found is None:
        return None
    rank, local_rank, world_size = found
    cuda = device.type == "cuda"
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                            "start at most that many processes per node")
        torch.cuda.set_device(local_rank)
    backend = "nccl" if cuda else "gloo"
    # DDP imports this module lazily; its functions take ``group=group.WORLD`` as a default
    # argument, so imported after the group exists they hold it for good: destroying it then
    # frees nothing and its gloo threads live into interpreter shutdown, where one can abort
    # the finished process ("terminate called without an active exception", SIGABRT).
    # Imported before, those defaults are None.
    import torch.distributed.nn.functional as _world_default_args  # noqa: F401
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_seconds())
        dist.init_process_group(backend, timeout=timeout,
                                device_id=torch.device("cuda", local_rank) if cuda else None)
    # stop requests are host values: through gloo, so reading them never waits for the GPU
    control = dist.new_group(backend="gloo") if cuda else None
    return DistributedContext(rank, local_rank, world_size, backend, control)


PEER_LOST = "another process of the training stopped"  # what a PeerLost says, after the rank
ERRORS_ENV = "FASTGRAPH_RANK_ERRORS"  # set by launch: the folder where each rank leaves its error


def say_error(line: str, *, peer_lost: bool = False) -> None:
    """Print a process's one-line error (``"fastgraph: error: ..."``) to stderr, and under
    :func:`launch` also leave it as ``<folder>/<RANK>.err`` for the launcher, which then
    says the failure once (the ranks' errors are each other's echoes). A rank that only
    lost another (``peer_lost``) prints nothing under the launcher: the launcher names the
    process that stopped first."""
    folder = os.environ.get(ERRORS_ENV)
    if folder:
        with contextlib.suppress(OSError):
            Path(folder, f"{os.environ.get('RANK', '0')}.err").write_text(line)
        if peer_lost:
            return
    print(line, file=sys.stderr)


class PeerLost(UserError):
    """Another process of the training went away: this one's process groups are broken.

    A process that gets it should report it and end without tearing the groups down (see
    :func:`shutdown`); ``fastgraph train`` exits 2 with ``os._exit``, past the destructors.
    """


def shutdown(ctx: DistributedContext, failure: BaseException | None = None) -> None:
    """Leave the process groups at the end of a distributed training, releasing them so
    that their threads end here and not during interpreter shutdown (see :func:`initialise`).

    The models wrapped by :func:`wrap` hold the groups: they must be released first. Where
    the training ends in ``failure`` (an error or a stop on a signal), the frames of its
    traceback still hold them; their local variables are cleared (the traceback still
    prints: it needs the code and lines, not the values). After :class:`PeerLost` nothing
    is torn down: a broken group's destructor waits for collectives the lost process will
    never join (in 1 of 26 killed-rank runs it waited until torchrun killed the process).
    """
    if isinstance(failure, PeerLost):
        return
    seen = set()
    while failure is not None and id(failure) not in seen:
        seen.add(id(failure))
        traceback.clear_frames(failure.__traceback__)
        failure = failure.__cause__ or failure.__context__
    ctx.control = None
    if dist.is_initialized():
        dist.destroy_process_group()


def check_split(batch_size: int, world_size: int) -> None:
    """Raise ``UserError`` unless the global batch splits evenly over ``world_size`` processes."""
    if batch_size % world_size:
        raise UserError(f"the global batch of {batch_size} does not split over {world_size} processes: "
                        "choose a batch size that is a multiple of the process count")


def batch_positions(batch_size: int, world_size: int, rank: int,
                    ghost_batch_size: int | None) -> torch.Tensor:
    """Positions (int64, ``batch_size // world_size``) of ``rank``'s images in each global batch.

    With ghost batches of ``ghost_batch_size`` images (ghost batch g = positions p with
    p mod S == g, S = batch_size / ghost_batch_size) and W dividing S, rank r takes ghost
    batches r S/W .. (r+1) S/W - 1, ordered so that its own split (S/W ghost batches of its
    batch) groups the same images: position ``row * S + col`` for row in 0..G-1 and col in
    that range. Otherwise the r-th contiguous block.

    Raises:
        UserError: ``batch_size`` not divisible by ``world_size`` (:func:`check_split`).
    """
    check_split(batch_size, world_size)
    per_rank = batch_size // world_size
    if ghost_batch_size and batch_size % ghost_batch_size == 0:
        splits = batch_size // ghost_batch_size
        if splits % world_size == 0:
            local = splits // world_size
            grid = torch.arange(batch_size).view(ghost_batch_size, splits)
            return grid[:, rank * local:(rank + 1) * local].reshape(-1)
    return torch.arange(rank * per_rank, (rank + 1) * per_rank)


def ghost_batch_size(module: nn.Module) -> int | None:
    """The ghost batch size of ``module``'s ghost batch norms (``GhostBatchNorm``, the fused
    ``BatchNormActivation``), or None when it has none or several different ones."""
    sizes = {getattr(m, "ghost_batch_size", None) for m in module.modules()} - {None}
    return sizes.pop() if len(sizes) == 1 else None


def wrap(module: nn.Module, ctx: DistributedContext) -> nn.Module:
    """``module`` in ``DistributedDataParallel``: gradients averaged over the ranks in
    buckets during the backward. Buffers are not broadcast from rank 0 at every forward
    (each rank's BN statistics are its own until :func:`average_running_stats`)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.local_rank] if ctx.backend == "nccl" else None
    # torch 2.13 renamed the option (broadcast_buffers warns there); older releases have only it
    options = inspect.signature(DistributedDataParallel).parameters
    sync = "forward_sync_buffers" if "forward_sync_buffers" in options else "broadcast_buffers"
    return DistributedDataParallel(module, device_ids=device_ids, **{sync: False})


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every ``nn.BatchNorm*`` replaced by ``torch.nn.SyncBatchNorm``
    (``convert_sync_batchnorm``, in place; a ``GraphModule``'s graph calls the new modules by
    the same names): in training, each BN normalises with the mean and variance of the
    global batch, gathered over the ranks in every forward (Ioffe and Szegedy's batch
    statistics over the whole batch, at one all-gather per BN layer). The running statistics
    are then the same on every rank. torch runs SyncBatchNorm on GPUs only.

    Raises:
        UserError: the module normalises per ghost batch (``GhostBatchNorm``) or with the
            fused BN + activation, both of which define their statistics per slice of a
            rank's batch: synchronising them would train another function.
    """
    from fastgraph.core.modules import GhostBatchNorm
    from fastgraph.kernels.bn_act import BatchNormActivation

    for name, m in module.named_modules():
        if isinstance(m, (GhostBatchNorm, BatchNormActivation)):
            raise UserError(f"--sync-bn: {name} is a {type(m).__name__}, which normalises each ghost "
                            "batch on its own; SyncBatchNorm would normalise the global batch instead. "
                            "Drop --sync-bn (ghost batches stay exact across ranks) or use a recipe "
                            "without ghost BN")
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)


@torch.no_grad()
def average_running_stats(modules: list[nn.Module], ctx: DistributedContext) -> None:
    """Replace every BatchNorm running mean and variance (buffers named ``running_mean`` /
    ``running_var``) of ``modules`` by its average over the ranks (one all-reduce)."""
    buffers = [b for m in modules for name, b in m.named_buffers()
               if name.rsplit(".", 1)[-1] in ("running_mean", "running_var")]
    if not buffers:
        return
    flat = torch.cat([b.reshape(-1).float() for b in buffers])
    dist.all_reduce(flat)
    flat /= ctx.world_size
    offset = 0
    for b in buffers:
        b.copy_(flat[offset:offset + b.numel()].view_as(b))
        offset += b.numel()


def all_sum(values: list[float | int], ctx: DistributedContext) -> list[float]:
    """The sums over the ranks of ``values`` (one all-reduce of float64 host values)."""
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, group=ctx.control)
    return t.tolist()


def gather(value, ctx: DistributedContext) -> list:
    """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
    values = [None] * ctx.world_size
    dist.all_gather_object(values, value, group=ctx.control)
    return values


def barrier() -> None:
    """Wait for every rank (a no-op outside a distributed training)."""
    if dist.is_initialized():
        dist.barrier()


class StopAgreement:
    """Whether to stop, agreed by every rank without a synchronising step.

    ``should_stop(requested)`` starts an asynchronous MAX all-reduce of this rank's request
    (a CPU tensor through the context's gloo group: it never waits for the GPU) and returns
    the result of the one started at the previous call: all ranks get the same answer at
    the same step, one step after the first rank was asked to stop. Every rank calls it the
    same number of times and :meth:`finish` after its last step.
    """

    def __init__(self, ctx: DistributedContext):
        self.group = ctx.control
        self._pending = None

    def should_stop(self, requested: bool) -> bool:
        flag = torch.tensor([1 if requested else 0], dtype=torch.int32)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        previous, self._pending = self._pending, (flag, work)
        if previous is None:
            return False
        tensor, work = previous
        work.wait()
        return bool(tensor.item())

    def finish(self) -> bool:
        """Complete the outstanding all-reduce; whether it asked to stop."""
        if self._pending is None:
            return False
        tensor, work = self._pending
        self._pending = None
        work.wait()
        return bool(tensor.item())


def agree(requested: bool, ctx: DistributedContext) -> bool:
    """Whether any rank ``requested`` (a blocking all-reduce; between runs and epochs)."""
    flag = torch.tensor([1 if requested else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=ctx.control)
    return bool(flag.item())


STOPPED_BY_ANOTHER_RANK = signal.SIGTERM  # the signal a rank acts as if it got when another was stopped


def without_nproc(argv: list[str]) -> list[str]:
    """``argv`` without its ``--nproc N`` / ``--nproc=N`` (what each process is started with)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``fastgraph ARGV`` in ``nproc`` processes on this machine through torchrun's
    launcher (``torch.distributed.run --standalone --nproc-per-node N -m fastgraph ...``),
    with ``OMP_NUM_THREADS`` shared out among them where it is not set; returns 0, or
    128 + the signal when Ctrl-C or SIGTERM stopped it (torchrun passes it to every process,
    which stop together at a step boundary and write their checkpoint, saying so).

    Rank 0 writes to this terminal; the other ranks' output goes to files in a temporary
    folder (they print nothing of their own, and every rank meets the same bad option: on
    the terminal each error would show N times), read back only to say why one failed.
    torchrun's own log lines are silenced for the same reason: the failure is said here.

    Raises:
        UserError: a bad ``FASTGRAPH_DIST_TIMEOUT`` (before any process starts); a process
            failed (one line: which, and its exit code or signal, or its own error; where
            ``argv`` gives ``--checkpoint``, that its folder holds the last finished epoch); a
            rank 0 that stopped on bad input already said why and exits 2, as does this.
    """
    import tempfile

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    timeout_seconds()  # every process reads it: a bad value is said once, here
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    others = ",".join(f"{i}:3" for i in range(1, nproc))  # 3: stdout and stderr to files
    with tempfile.TemporaryDirectory(prefix="fastgraph-ranks-") as logs, _torchrun_quiet(), \
            _environment(ERRORS_ENV, logs):
        try:
            run(parse_args(["--standalone", "--nproc-per-node", str(nproc), "--log-dir", logs,
                            "--redirects", others, "-m", "fastgraph", *without_nproc(argv)]))
        except SignalException as exc:  # Ctrl-C or SIGTERM: torchrun passed it on; the ranks checkpointed
            return 128 + int(exc.sigval)
        except ChildFailedError as exc:
            raise _failure(exc, nproc, argv, logs) from None
    return 0


def _failure(exc, nproc: int, argv: list[str], logs: str) -> BaseException:
    """What ``launch`` raises for torchrun's ``ChildFailedError`` ``exc``: ``SystemExit(2)``
    where rank 0 printed its own one-line error, else a ``UserError`` naming the process.

    The ranks' errors are read from the files :func:`say_error` leaves, not from exit codes:
    torchrun may see another rank exit first and end rank 0 with SIGTERM after its line."""
    prefix = "fastgraph: error: "
    said = {}
    for path in Path(logs).glob("*.err"):
        with contextlib.suppress(OSError, ValueError):
            said[int(path.stem)] = path.read_text().removeprefix(prefix).strip()
    if said.get(0) and PEER_LOST not in said[0]:
        return SystemExit(2)  # rank 0's line is on the terminal above
    failures = sorted(exc.failures.items())
    # a process killed by a signal (not the SIGTERM torchrun stops the others with) is the
    # cause, whatever the others then did; else a process's own one-line error
    killed = [(rank, f) for rank, f in failures if f.exitcode < 0 and f.exitcode != -signal.SIGTERM]
    own = sorted((rank, line) for rank, line in said.items() if line and PEER_LOST not in line)
    if not killed and own:
        rank, line = own[0]
        return UserError(f"process {rank} of {nproc}: {line}")
    rank, failure = killed[0] if killed else exc.get_first_failure()
    how = failure.signal_name() if failure.exitcode < 0 else f"exit code {failure.exitcode}"
    last = _last_line(logs, failure.local_rank) if rank and failure.exitcode > 0 else ""
    resume = (" The --checkpoint folder holds the last finished epoch: continue with --resume"
              if checkpoint_given(argv) else "")
    return UserError(f"process {rank} of {nproc} failed ({how}{': ' + last[:300] if last else ''}); "
                     f"the others were stopped.{resume}")


def _last_line(logs: str, local_rank: int) -> str:
    """The last line of the stderr of process ``local_rank`` under torchrun's ``logs`` folder
    ("" when there is none): what a rank that crashed (a traceback's last line) said."""
    lines = [line.strip() for path in sorted(Path(logs).glob(f"*/attempt_*/{local_rank}/stderr.log"))
             for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else ""


@contextlib.contextmanager
def _environment(name: str, value: str):
    """``os.environ[name] = value`` inside the block (torchrun's processes inherit it)."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


@contextlib.contextmanager
def _torchrun_quiet():
    """torchrun's loggers (``torch.distributed.elastic.*``, ``torch.distributed.run``) at
    CRITICAL inside the block: their lines about a failed process ("Sending process ...
    closing signal", "failed (exitcode: 2)") repeat what :func:`launch` says in one line.
    Each logger has its own level, set when its module was imported."""
    import logging

    import torch.distributed.run  # noqa: F401  (imports the launcher's modules: their loggers exist)

    names = [n for n in logging.root.manager.loggerDict
             if n.startswith(("torch.distributed.elastic", "torch.distributed.run"))]
    saved = [(logger, logger.level) for logger in map(logging.getLogger, names)]
    for logger, _ in saved:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def checkpoint_given(argv: list[str]) -> bool:
    """Whether ``argv`` (``fastgraph train ...``) gives ``--checkpoint DIR`` (also as
    ``--checkpoint=DIR`` or an abbreviation argparse accepts, such as ``--ch``)."""
    return any(len(option) > len("--c") and "--checkpoint".startswith(option)
               for option in (arg.split("=", 1)[0] for arg in argv if arg.startswith("--")))


def peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says another process of the training went away (a collective's
    connection closed, reset or timed out), not a fault of this one."""
    text = str(exc)
    signs = ("Connection closed by peer", "Connection reset by peer", "timed out", "Timed out")
    return isinstance(exc, getattr(dist, "DistError", ())) or any(s in text for s in signs)
