"""Train a model on CIFAR-10 with a recipe: runs, epochs, steps, the learning rate per
optimiser group, the compile warm-up, checkpoints and resume, interrupts.

One ``GraphModule`` flows: the user's model (a model file, or a function that builds it)
is built, traced and rewritten by the recipe's passes (``fastgraph.training.build``),
trained on the uint8 dataset resident on the device (``fastgraph.training.batches``) and
augmented per epoch (``fastgraph.training.augmentation``), and evaluated plain and with
test-time augmentation (``fastgraph.training.evaluation``). What is asked, what is
reported and how signals stop a run: ``options``, ``records``, ``signals``.

Timing (``fastgraph.core.timing.Timer``, CUDA events on a GPU, ``perf_counter`` on CPU), as
the record holders time it: *not counted* are the data upload, building (from the file
or function) and tracing the model, the pass manager's float64 checks of the recipe's
passes (once per training), cuDNN/``torch.compile`` warm-up, and the per-epoch progress
evaluation (plain accuracy every epoch, TTA accuracy on epochs before the last); *counted* are the
recipe's passes (which include the whitening initialisation from data), training, and
the final TTA evaluation. For ``target`` the time to reach an accuracy at epoch *e* is
the counted time through epoch *e*'s training plus that epoch's TTA evaluation, as if
the run had stopped and been evaluated there (earlier epochs' evaluations not counted).
A resumed run carries the counted seconds and phases of the processes before it; it
rebuilds its graph outside the timer (its passes were counted before it stopped).

Compilation stays out of the counted time: the warm-up runs the training step exactly as
the loop does, on real batches from the run's own augmenter (its dtype, layout and
shape; the augmenter's and torch's random state and the weights restored after), and
evaluates a full and the last, smaller test batch, plain and with TTA. The timer records
the graphs ``torch.compile`` compiled in every phase, and one compiled inside a counted
phase raises :class:`fastgraph.core.timing.CompiledInCountedPhase`, naming the run and epoch.

An optimiser parameter group with ``train_epochs = N`` (a parameter hint, e.g.
airbench's whitening bias, trained 3 epochs) trains in epochs 0..N-1 and gets lr 0 from
epoch N on: SGD with lr 0 leaves the parameter exactly as it is and, unlike turning
``requires_grad`` off, changes nothing a compiled graph's guards look at. With
``own_schedule`` its lr follows the recipe's schedule over its N epochs.

Reliability: a checkpoint at the end of every epoch (``fastgraph.training.checkpoint``); a
first Ctrl-C or SIGTERM lets the current step finish and writes a checkpoint at that step
boundary before :class:`Interrupted` is raised (``fastgraph.training.signals``).
``resume`` continues bit-exactly on the same device, and a NaN or infinite loss stops the
run with :class:`~fastgraph.training.options.TrainingDiverged`. The model, the checkpoint
and the options are checked before the data is looked for.

Data parallel: started by torchrun (``RANK``, ``WORLD_SIZE``), every process trains its share of
each global batch in ``DistributedDataParallel``; rank 0 alone evaluates, reports and
writes (``fastgraph.training.distributed`` says how the ranks compute what one process at
the global batch would).
"""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import asdict, dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fastgraph.core import nvtx
from fastgraph.core.devices import resolve_device
from fastgraph.core.errors import UserError
from fastgraph.core.timing import CompiledInCountedPhase, Timer
from fastgraph.training import checkpoint as ckpt
from fastgraph.training import distributed as dp
from fastgraph.training.batches import load_device_data, warm_up_batches
from fastgraph.training.build import ModelBuilder, check_model, model_name
from fastgraph.training.evaluation import Evaluator, check_logits
from fastgraph.training.optim import WeightAverage, build_optimizers
from fastgraph.training.options import DTYPES, TrainingDiverged, TrainOptions, autocast_for
from fastgraph.training.recipes import check_passes_registered, lr_factor, same_recipe, torch_hyperparameters
from fastgraph.training.records import EpochRecord, Reporter, RunRecord, TrainResult
from fastgraph.training.signals import Interrupted, InterruptGuard

# The public API imports these from here.
__all__ = ["EpochRecord", "Interrupted", "Reporter", "RunRecord", "TrainOptions", "TrainResult", "Trainer",
           "train"]


@dataclass
class _Run:
    """One run while it trains: its objects, where it is (updated at every step boundary,
    which is what a checkpoint saves), and what a resume carried over."""

    index: int
    seed: int
    device: torch.device
    timer: Timer
    module: fx.GraphModule  # whose parameters train
    call: nn.Module  # what the step calls: ``module`` or its torch.compile wrapper
    optimizers: list
    ema: WeightAverage | None
    evaluated: nn.Module  # ``module`` or the EMA average
    augmenter: object  # fastgraph.training.augmentation.DeviceAugmenter
    scaler: torch.amp.GradScaler | None
    passes: dict
    completed: list[RunRecord]
    total_steps: int
    steps_per_epoch: int
    n_epochs: int
    aug_state: dict  # the augmenter's state at the start of ``epoch``
    step: int = 0  # steps done in the run
    epoch: int = 0  # the epoch in progress (0-based)
    done: int = 0  # steps done in ``epoch``
    steps: int = 0  # steps of ``epoch`` done since this process started it
    boundary: bool = True  # between steps: the state is consistent
    records: list[EpochRecord] = field(default_factory=list)
    offset: float = 0.0  # counted seconds before a resume
    earlier: dict | None = None  # Timer.as_dict() of the processes that trained the run before a resume
    carry: float = 0.0  # counted seconds of the resumed epoch before the resume
    partial: dict = field(default_factory=lambda: {"loss": 0.0, "correct": 0, "seen": 0})
    before: float = 0.0  # timer total when ``epoch`` started in this process
    loss_sum: torch.Tensor | None = None  # on the device: summed without synchronising
    correct: torch.Tensor | None = None
    agreed_stop: bool = False  # distributed: every rank stopped at this step boundary
    classes_checked: bool = False  # the logits' width against the data's classes, at the first step

    def new_epoch(self, epoch: int, done: int, aug_state: dict, before: float) -> None:
        """Enter ``epoch`` with ``done`` of its steps behind (a resume keeps their statistics)."""
        if done == 0:
            self.partial = {"loss": 0.0, "correct": 0, "seen": 0}
        self.epoch, self.done, self.aug_state, self.before, self.steps = epoch, done, aug_state, before, 0
        self.loss_sum = torch.zeros((), device=self.device)
        self.correct = torch.zeros((), dtype=torch.int64, device=self.device)


# Settings a checkpoint written before they existed holds implicitly, at these values.
SETTINGS_ADDED = {"data_format": "cifar10", "sync_bn": False}


def _recipe_difference(saved: dict, current: dict) -> str:
    """The first recipe value (``section.key``) that differs between ``saved`` (a checkpoint's
    ``Recipe.to_dict()``) and ``current``, as ``"recipe section.key: VALUE there"``."""
    for section in dict.fromkeys([*current, *saved]):
        old, new = saved.get(section), current.get(section)
        if isinstance(old, dict) and isinstance(new, dict):
            for key in dict.fromkeys([*new, *old]):
                if key in old and old.get(key) != new.get(key):
                    return f"recipe {section}.{key}: {old[key]!r} there"
        elif old != new and old is not None:
            return f"recipe {section}: {old!r} there"[:200]
    return "recipe contents differ"


class Trainer:
    """Runs :func:`train`; one instance per call (holds the data, the evaluator and the model builder)."""

    def __init__(self, opts: TrainOptions, reporter: Reporter | None = None):
        self.opts = opts
        self.recipe = recipe = opts.recipe
        self.reporter = reporter or Reporter()
        check_passes_registered(recipe)
        if opts.runs < 1:
            raise UserError(f"--runs must be >= 1, got {opts.runs}")
        self.device = resolve_device(opts.device)
        self.dist = dp.initialise(self.device)  # None unless started by torchrun
        if self.dist is not None:
            self.device = self.dist.device(self.device)
        train_cfg = recipe["train"]
        self.epochs = float(opts.epochs if opts.epochs is not None else train_cfg["epochs"])
        self.batch_size = int(opts.batch_size if opts.batch_size is not None else train_cfg["batch_size"])
        if not (self.epochs > 0 and math.isfinite(self.epochs)):  # an infinite schedule never ends
            raise UserError(f"--epochs must be a finite number > 0, got {self.epochs}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        cuda = self.device.type == "cuda"
        self.precision = opts.precision or (recipe["train"]["precision"] if cuda else "fp32")
        if self.precision not in DTYPES:
            raise UserError(f"--precision must be fp32, fp16 or bf16, got {self.precision!r}")
        self.compile = opts.compile if opts.compile is not None else (recipe["train"]["compile"] and cuda)
        self.compile_mode = recipe["train"].get("compile_mode", "default")
        if self.compile:
            from torch._dynamo import list_backends  # deferred: importing Dynamo takes seconds

            backends = list_backends(exclude_tags=())
            if opts.compile_backend not in backends:
                raise UserError(f"compile backend must be one of {', '.join(sorted(backends))}, "
                                f"got {opts.compile_backend!r}")
        self.channels_last = cuda
        self.hyper = torch_hyperparameters(recipe, self.batch_size)
        if opts.target is not None and not 0 < opts.target <= 1:
            raise UserError(f"--target must be an accuracy in (0, 1] or a percentage, got {opts.target}")
        if opts.target is not None and not opts.progress_eval:
            raise UserError("--target needs the TTA accuracy of every epoch: drop --no-progress-eval")
        if self.precision == "fp16" and recipe["muon"]["enabled"]:
            raise UserError("fp16 with loss scaling does not combine with Muon here; use --precision bf16")
        self.tta_level = recipe["eval"]["tta_level"]
        self.autocast = autocast_for(self.device, self.precision)
        self.interrupt = InterruptGuard()
        if self.dist is not None:  # the global batch splits evenly, or nothing starts
            dp.check_split(self.batch_size, self.dist.world_size)
        if opts.sync_bn and (self.dist is None or not cuda):
            raise UserError("--sync-bn synchronises BatchNorm over the processes of a data-parallel "
                            "training on GPUs (torch runs SyncBatchNorm on CUDA only): use it with "
                            "--nproc N or torchrun on CUDA devices")
        # distributed: the DDP wrapper is compiled, not the module (see _start_run)
        self.builder = ModelBuilder(opts, self.device, channels_last=self.channels_last,
                                    compile=self.compile and self.dist is None,
                                    compile_mode=self.compile_mode)
        self.data = None  # DeviceData, and the evaluator over its test images, once loaded
        self.data_digest: str | None = None  # the data's fingerprint, when a checkpoint records it
        self.model_digest: str | None = None  # the traced model's (see build.check_model)
        self.evaluator: Evaluator | None = None

    # -- settings and data ------------------------------------------------------------

    def settings(self) -> dict:
        """What this training was run with (JSON-ready; checked on ``resume``)."""
        o = self.opts
        return {"model": model_name(o), "entry": o.entry, "recipe": self.recipe.name, "epochs": self.epochs,
                "batch_size": self.batch_size,
                "runs": o.runs, "seed": o.seed, "subset": o.subset, "test_subset": o.test_subset,
                "device": str(self.device), "precision": self.precision, "compile": bool(self.compile),
                "compile_backend": o.compile_backend, "compile_mode": self.compile_mode,
                "stochastic_depth": o.stochastic_depth, "fused_kernels": o.fused_kernels,
                "sync_bn": o.sync_bn, "target": o.target,
                "data_format": self.recipe["data"]["format"],
                "world_size": self.dist.world_size if self.dist else 1,
                "backend": self.dist.backend if self.dist else None}

    @property
    def is_main(self) -> bool:
        """Whether this process evaluates, reports and writes (rank 0, or the only one)."""
        return self.dist is None or self.dist.is_main

    def _load_data(self, timer: Timer) -> None:
        """Put the (subset of the) data on the device, or index the folders it streams from
        (``[data] format``); build the evaluator over its test images."""
        o = self.opts
        cfg = self.recipe["data"]
        if cfg["format"] == "imagefolder":
            from fastgraph.training.streaming import load_streamed_data

            self.data = load_streamed_data(o.data, cfg, self.device, timer, batch_size=self.batch_size,
                                           subset=o.subset, test_subset=o.test_subset)
        else:
            if self.dist is not None and not self.is_main:
                dp.barrier()  # rank 0 decodes the archive into the cache once; the others then read it
            self.data = load_device_data(o.data, self.device, timer, batch_size=self.batch_size,
                                         subset=o.subset, test_subset=o.test_subset)
            if self.dist is not None and self.is_main:
                dp.barrier()
        data = self.data
        self.evaluator = Evaluator(data.test_batches(self.recipe["eval"]["batch_size"]), mean=data.mean,
                                   std=data.std, tta_level=self.tta_level, autocast=self.autocast,
                                   channels_last=self.channels_last)

    def _step(self, r: _Run, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of one training step of run ``r`` on batch ``x`` (the
        augmenter's dtype and layout, (B, 3, H, W)) with int64 labels ``y`` (B,): autocast,
        fp32 logits, cross-entropy with the recipe's label smoothing, the gradients set
        (scaled with fp16). Returns (logits (B, classes) in the compute dtype, loss (fp32
        scalar)). The loop and the warm-up both call this, so what the warm-up compiles
        is what the loop runs."""
        label_smoothing = self.recipe["train"]["label_smoothing"]
        # NVTX ranges per phase for Nsight Systems; free when no profiler listens.
        with nvtx.range("forward"), self.autocast():
            out = r.call(x)
            if not r.classes_checked:  # before the loss: a label past the logits is a device assert on CUDA
                self._check_classes(out, len(y))
                r.classes_checked = True
            loss = F.cross_entropy(out.float(), y, label_smoothing=label_smoothing)
        for opt in r.optimizers:
            opt.zero_grad(set_to_none=True)
        with nvtx.range("backward"):
            (r.scaler.scale(loss) if r.scaler is not None else loss).backward()
        return out, loss

    def _check_classes(self, logits, images: int) -> None:
        """Raise ``UserError`` unless the model's output on ``images`` images is one logits
        tensor (images, K) with one column per class of the data (``ModelError`` for
        another output: a tuple or dict of them, a feature map)."""
        check_logits(logits, images, "fastgraph train")
        classes = self.data.classes
        if classes and logits.shape[-1] != len(classes):
            raise UserError(f"the model outputs {logits.shape[-1]} logits per image but the data has "
                            f"{len(classes)} classes ({', '.join(classes[:3])}...): build the model with "
                            f"{len(classes)} outputs (e.g. num_classes={len(classes)})")

    def _warm_up_batches(self, augmenter, steps: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The batches the warm-up trains on: see :func:`fastgraph.training.batches.warm_up_batches`;
        with progressive resizing also one batch at each later resolution of the run."""
        batches = warm_up_batches(augmenter, steps)
        resolution = getattr(self.data, "resolution", None)
        if resolution is not None:
            later = {resolution(e): e for e in range(math.ceil(self.epochs) - 1, 0, -1)}
            state = augmenter.state_dict()
            try:
                for res, epoch in sorted(later.items()):
                    if res != resolution(0):
                        batches += list(augmenter.epoch(epoch, steps=1))
            finally:
                augmenter.load_state_dict(state)
        return batches

    def _warm_up(self, r: _Run) -> None:
        """Compile and autotune outside the timer: three training steps as the loop runs
        them (no optimizer step) on real batches of the run's augmenter, then evaluation,
        plain and with TTA, on a full test batch and the last, smaller one. The weights,
        buffers, gradients and the augmenter's and torch's random state are as before.

        A graph compiled for other input than the timed phase's (the fp32 random input of
        a bf16 run) compiles again inside the timed phase; cuDNN autotunes per shape.
        """
        saved = copy.deepcopy(r.module.state_dict())  # BN running statistics move in train mode
        rng = self._rng_state()  # stochastic depth and dropout draw from torch's generator
        r.module.train()
        for x, y in self._warm_up_batches(r.augmenter):
            self._step(r, x, y)
        r.module.zero_grad(set_to_none=True)
        if self.is_main:  # the only rank that evaluates
            self.evaluator.warm_up(r.evaluated)
        r.module.load_state_dict(saved)
        r.module.train()
        self._set_rng_state(rng)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- one run ----------------------------------------------------------------------

    def _rng_state(self) -> dict:
        state = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _set_rng_state(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def _start_run(self, run: int, completed: list[RunRecord], saved: dict | None) -> _Run:
        """Build run ``run``'s module, optimisers, EMA and augmenter; warm up; load ``saved``."""
        recipe, seed = self.recipe, self.opts.seed + run
        timer = Timer(self.device)
        torch.manual_seed(seed)  # the model's initialisation (file or factory)
        # A resumed run's passes were counted before it stopped (in saved["phases"]): rebuilding
        # the same graph here is set-up, not a second count of the passes.
        gm, pass_report = self.builder.build(timer if saved is None else Timer(self.device), self.data)
        module, call = self.builder.training_module(gm)
        positions = None
        if self.dist is not None:
            if self.opts.sync_bn:
                module = dp.sync_batchnorm(module)
            call = dp.wrap(module, self.dist)  # broadcasts rank 0's weights: every rank starts alike
            if self.compile:
                call = self.builder.compiled(call)
            positions = dp.batch_positions(self.batch_size, self.dist.world_size, self.dist.rank,
                                           dp.ghost_batch_size(module))
            if self.dist.rank:  # dropout and stochastic depth draw per rank; rank 0 as one process
                torch.manual_seed((seed + 1_000_003 * self.dist.rank) % 2**64)  # torch takes < 2**64
        optimizers = build_optimizers(module, recipe, self.hyper)
        cfg = recipe["ema"]
        ema = (WeightAverage(module, decay=cfg["decay"], every=cfg["every"], warmup_power=cfg["warmup_power"],
                             lookahead=cfg["lookahead"]) if cfg["enabled"] else None)
        evaluated = ema.averaged.module if ema is not None and recipe["eval"]["model"] == "ema" else module
        augmenter = self.data.augmenter(batch_size=self.batch_size, seed=seed,
                                        out_dtype=DTYPES[self.precision], channels_last=self.channels_last,
                                        positions=positions, augment=recipe["augment"])
        scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        total = max(1, math.ceil(augmenter.steps_per_epoch * self.epochs))
        r = _Run(index=run, seed=seed, device=self.device, timer=timer, module=module, call=call,
                 optimizers=optimizers, ema=ema, evaluated=evaluated, augmenter=augmenter, scaler=scaler,
                 passes=pass_report, completed=completed, total_steps=total,
                 steps_per_epoch=augmenter.steps_per_epoch,
                 n_epochs=math.ceil(total / augmenter.steps_per_epoch), aug_state=augmenter.state_dict())
        if self.compile or self.device.type == "cuda":  # every run: a reused compiled module too
            with timer.phase("warm-up", counted=False):
                self._warm_up(r)
        if saved is not None:  # resume inside this run, at a step boundary
            from fastgraph.training.trained import check_state_matches

            # The model file may have changed since: name the first weight that differs.
            check_state_matches(module, saved["model"], ckpt.checkpoint_path(self.opts.checkpoint_dir))
            module.load_state_dict(saved["model"])
            for opt, state in zip(optimizers, saved["optimizers"], strict=True):
                opt.load_state_dict(state)
            if ema is not None:
                ema.load_state_dict(saved["ema"])
            if scaler is not None and saved.get("scaler"):
                scaler.load_state_dict(saved["scaler"])
            augmenter.load_state_dict(saved["augment"])  # the state at the start of saved["epoch"]
            ranks = saved.get("rng_ranks")  # each rank's own generators, where the ranks match
            same_ranks = self.dist is not None and ranks and len(ranks) == self.dist.world_size
            self._set_rng_state(ranks[self.dist.rank] if same_ranks else saved["rng"])
            r.epoch, r.done, r.step = saved["epoch"], saved["step_in_epoch"], saved["step"]
            r.offset, r.carry, r.partial = saved["counted_seconds"], saved["epoch_seconds"], saved["partial"]
            r.earlier = saved.get("phases")  # absent from checkpoints written before it was saved
            r.records = [EpochRecord(**e) for e in saved["epochs"]]
        r.new_epoch(r.epoch, r.done, augmenter.state_dict(), timer.total())
        return r

    def _snapshot(self, r: _Run, finished_run: bool = False) -> dict:
        """The checkpoint of run ``r`` at its current step boundary."""
        mid_epoch = r.done > 0 and not finished_run
        loss, correct = self._totals(r)
        partial = {"loss": loss, "correct": correct, "seen": r.partial["seen"] + r.steps * self.batch_size}
        rng = self._rng_state()
        rng_ranks = dp.gather(rng, self.dist) if self.dist is not None else None
        return {"settings": self.settings(), "recipe": self.recipe.to_dict(), "run": r.index,
                "completed": [asdict(c) for c in r.completed], "epoch": r.epoch, "step_in_epoch": r.done,
                "step": r.step, "finished_run": finished_run, "model": r.module.state_dict(),
                "optimizers": [o.state_dict() for o in r.optimizers],
                "ema": r.ema.state_dict() if r.ema is not None else None,
                "scaler": r.scaler.state_dict() if r.scaler is not None else None,
                "augment": r.aug_state, "rng": rng, "rng_ranks": rng_ranks,
                "counted_seconds": r.offset + r.timer.total(), "phases": self._phases(r),
                "data": self.data_digest, "model_graph": self.model_digest,
                "epoch_seconds": r.timer.total() - r.before + r.carry if mid_epoch else 0.0,
                "partial": partial if mid_epoch else {"loss": 0.0, "correct": 0, "seen": 0},
                "epochs": [asdict(e) for e in r.records]}

    @staticmethod
    def _phases(r: _Run) -> dict:
        """``r``'s timed phases (``Timer.as_dict`` form: seconds, counted, calls; totals) over
        every process that trained it: those before a resume and this one's."""
        now = r.timer.as_dict()
        if not r.earlier:
            return now
        phases = {name: dict(p) for name, p in r.earlier["phases"].items()}
        for name, p in now["phases"].items():
            total = phases.setdefault(name, {"seconds": 0.0, "counted": p["counted"], "calls": 0})
            total["seconds"] += p["seconds"]
            total["calls"] += p["calls"]
        return {**now, "phases": phases,
                "counted_seconds": sum(p["seconds"] for p in phases.values() if p["counted"]),
                "total_seconds": sum(p["seconds"] for p in phases.values())}

    def _average_running_stats(self, r: _Run) -> None:
        """Every rank's BatchNorm running statistics (the model's and its EMA's) replaced by
        their mean over the ranks: what one process training the global batch holds. Running
        statistics are a linear recurrence, so averaging mid-epoch changes nothing the
        epoch's end would not; a collective: every rank must call it."""
        ema = [r.ema.averaged.module] if r.ema is not None else []
        dp.average_running_stats([r.module, *ema], self.dist)

    def _totals(self, r: _Run) -> tuple[float, int]:
        """(sum over the steps of the global batch's mean loss, correct predictions) of ``r``'s
        epoch so far, over all ranks and the processes before a resume (``r.partial``, in the
        same units). Each rank's loss is the mean over its equal share of the batch, so the
        global batch's mean is the mean over the ranks: a sum that does not depend on the
        number of processes, which may change at a resume."""
        loss, correct = r.loss_sum.item(), int(r.correct)
        if self.dist is not None:
            loss, correct = dp.all_sum([loss, correct], self.dist)
            loss /= self.dist.world_size
        return r.partial["loss"] + loss, r.partial["correct"] + int(correct)

    def _group_lr(self, group: dict, r: _Run, epoch: int, factor: float) -> float:
        """The lr of an optimiser group at run ``r``'s current step of ``epoch``.

        ``peak_lr`` times the schedule's ``factor``. A group trained for its first
        ``train_epochs`` epochs only gets 0 from then on, which keeps it exactly as it is
        without a recompile (see the module docstring); with ``own_schedule`` its
        schedule runs over those epochs instead of the whole run (airbench94_muon's
        whitening bias: ``1 - step / whiten_bias_train_steps``).
        """
        epochs = group.get("train_epochs")
        if epochs is None:
            return group["peak_lr"] * factor
        if epoch >= epochs:
            return 0.0
        if group.get("own_schedule"):
            span = max(1, math.ceil(epochs * r.steps_per_epoch))
            return group["peak_lr"] * lr_factor(self.recipe, min(1.0, r.step / span))
        return group["peak_lr"] * factor

    def _train_epoch(self, r: _Run, epoch: int, skip: int) -> None:
        """Train epoch ``epoch`` from its step ``skip``; raise on a non-finite loss, Ctrl-C or SIGTERM."""
        recipe = self.recipe
        steps_here = min(r.steps_per_epoch, r.total_steps - epoch * r.steps_per_epoch)
        r.new_epoch(epoch, skip, r.augmenter.state_dict(), r.timer.total())
        losses, interrupted = [], False
        agreement = dp.StopAgreement(self.dist) if self.dist is not None else None
        r.module.train()
        stopped = None
        with r.timer.phase("train"):
            try:
                batches = nvtx.iterate(r.augmenter.epoch(epoch, skip, steps_here), "data")
                for i, (x, y) in enumerate(batches, start=skip):
                    requested = self.interrupt.requested
                    if agreement.should_stop(requested) if agreement is not None else requested:
                        interrupted = True
                        break
                    r.boundary = False
                    factor = lr_factor(recipe, r.step / r.total_steps)
                    for opt in r.optimizers:
                        for group in opt.param_groups:
                            group["lr"] = self._group_lr(group, r, epoch, factor)
                    out, loss = self._step(r, x, y)
                    with nvtx.range("optimizer"):
                        for opt in r.optimizers:
                            if r.scaler is not None:
                                r.scaler.step(opt)
                            else:
                                opt.step()
                        if r.scaler is not None:
                            r.scaler.update()
                        r.step += 1
                        if r.ema is not None:
                            r.ema.maybe_update(r.module, r.step, r.total_steps)
                            if r.ema.lookahead and r.step == r.total_steps:
                                r.ema.copy_back(r.module)  # airbench's final update (decay 1)
                    loss = loss.detach()
                    losses.append(loss)
                    r.loss_sum += loss
                    r.correct += (out.detach().argmax(1) == y).sum()
                    r.steps, r.done, r.boundary = r.steps + 1, i + 1, True
                    self.reporter.step(r.index, i + 1, steps_here)
                    if self.device.type == "cpu" and self.dist is None and not torch.isfinite(loss):
                        break  # on a CPU the check costs nothing: stop at once
            except KeyboardInterrupt as exc:
                # Raised between steps (by a reporter, or a second signal): leave the phase first,
                # or the timer drops the epoch's seconds so far and the checkpoint lacks them.
                if not r.boundary:
                    raise
                stopped = exc
        if stopped is not None:
            raise stopped
        if agreement is not None:
            agreement.finish()
        # on a GPU checked once per epoch: a per-step check would synchronise every step
        bad = (~torch.isfinite(torch.stack(losses))).nonzero() if losses else []
        if self.dist is not None and dp.agree(len(bad) > 0, self.dist) and not len(bad):
            raise TrainingDiverged(f"training diverged: the loss of another rank is not finite in epoch "
                                   f"{epoch + 1}; recipe {recipe.name} with peak lr {self.hyper.lr:g} is "
                                   "unstable for this model")
        if len(bad):
            k = int(bad[0])
            raise TrainingDiverged(
                f"training diverged: loss is {losses[k].item()} at epoch {epoch + 1} step "
                f"{skip + k + 1} (step {r.step - len(losses) + k + 1} of the run); recipe "
                f"{recipe.name} with peak lr {self.hyper.lr:g} is unstable for this model")
        if interrupted:
            if self.dist is not None:
                r.agreed_stop = True
                self.interrupt.request(dp.STOPPED_BY_ANOTHER_RANK)  # no-op where this rank was signalled
            self.interrupt.check()

    def _end_epoch(self, r: _Run, epoch: int, resumed_inside: bool) -> EpochRecord:
        """Evaluate (see the module docstring for what is counted) and record epoch ``epoch``."""
        timer = r.timer
        seconds = timer.total() - r.before + (r.carry if resumed_inside else 0.0)
        elapsed = r.offset + timer.total()
        final = epoch == r.n_epochs - 1
        test_acc = tta_acc = None
        tta_before = timer.total(counted_only=False)
        if self.dist is not None:  # what one process would hold: see fastgraph.training.distributed
            self._average_running_stats(r)
        loss, correct = self._totals(r)
        if (final or self.opts.progress_eval) and self.is_main:
            if self.tta_level:  # plain accuracy is progress information: not counted
                with timer.phase("eval", counted=False):
                    test_acc = self.evaluator.accuracy(r.evaluated, tta=False)
            tta_before = timer.total(counted_only=False)
            with timer.phase("tta eval" if final else "progress tta eval", counted=final):
                tta_acc = self.evaluator.accuracy(r.evaluated, tta=bool(self.tta_level))
            test_acc = tta_acc if test_acc is None else test_acc
        steps = r.partial["seen"] // self.batch_size + r.steps
        return EpochRecord(
            epoch=min(r.step / r.steps_per_epoch, self.epochs), step=r.step,
            lr=self.hyper.lr * lr_factor(self.recipe, (r.step - 1) / r.total_steps),
            train_loss=loss / max(1, steps), train_acc=correct / max(1, steps * self.batch_size),
            test_acc=test_acc, tta_acc=tta_acc, seconds=seconds, elapsed=elapsed,
            tta_seconds=timer.total(counted_only=False) - tta_before)

    def _run(self, run: int, completed: list[RunRecord], saved: dict | None) -> RunRecord:
        """Run ``run`` from its start, or from ``saved`` (a checkpoint inside it)."""
        r = self._start_run(run, completed, saved)
        self.reporter.run_start(run, self.opts.runs, r.seed, r.total_steps, r.n_epochs)
        directory = self.opts.checkpoint_dir
        try:
            skip = r.done
            for epoch in range(r.epoch, r.n_epochs):
                try:
                    self._train_epoch(r, epoch, skip)
                    record = self._end_epoch(r, epoch, resumed_inside=skip > 0)
                except CompiledInCountedPhase as exc:
                    raise CompiledInCountedPhase(f"run {run + 1} epoch {epoch + 1}: {exc}") from None
                skip = 0
                r.records.append(record)
                r.new_epoch(epoch + 1, 0, r.augmenter.state_dict(), r.timer.total())
                if directory:
                    self._save(self._snapshot(r))
                self.reporter.epoch_end(run, record)
        except KeyboardInterrupt:
            # distributed: only a stop every rank agreed on is at one step boundary everywhere
            consistent = r.boundary and (self.dist is None or r.agreed_stop)
            if consistent and self.dist is not None:  # as at an epoch's end: what one process holds
                self._average_running_stats(r)
            self._on_interrupt(self._snapshot(r) if consistent else None)
            raise
        finally:
            if hasattr(r.augmenter, "close"):  # a streamed data set's decoding workers
                r.augmenter.close()
        result = RunRecord(run=run, seed=r.seed, epochs=r.records, test_acc=r.records[-1].test_acc,
                           tta_acc=r.records[-1].tta_acc, seconds=r.offset + r.timer.total(),
                           phases=self._phases(r), passes=r.passes, compiles=r.timer.compiles())
        self.last_model = r.evaluated
        if directory:
            self._save({**self._snapshot(r, finished_run=True),
                        "completed": [asdict(c) for c in completed + [result]]})
        self.reporter.run_end(run, result)
        return result

    def _save(self, state: dict) -> None:
        """Write ``state`` as the checkpoint (rank 0 alone writes; every rank has the same state)."""
        if self.is_main:
            ckpt.save_checkpoint(self.opts.checkpoint_dir, state)

    def _on_interrupt(self, state: dict | None) -> None:
        """Write ``state`` (the run at the step boundary where it stopped) as the checkpoint."""
        directory = self.opts.checkpoint_dir
        how = "interrupted" + (f" ({self.interrupt.name})" if self.interrupt.requested
                               else "")
        if not directory:
            self.reporter.message(f"{how}; no --checkpoint folder was given, nothing saved")
        elif state is not None:
            self._save(state)
            path = ckpt.checkpoint_path(directory)
            self.reporter.message(f"{how} at run {state['run'] + 1} epoch {state['epoch'] + 1} "
                                  f"after step {state['step_in_epoch']}; checkpoint written to {path}; "
                                  "continue with --resume")
        else:
            self.reporter.message(f"{how} mid-step; the checkpoint in {directory} is of the last "
                                  "finished epoch; continue with --resume")

    # -- all runs ---------------------------------------------------------------------

    def _check_resume(self, saved: dict) -> None:
        mine, theirs = self.settings(), saved["settings"]
        # a training may resume on another number of processes (the same global batches), and
        # each rank's own GPU is another device string than rank 0's
        free = ("runs", "target", "world_size", "backend") + (("device",) if self.dist is not None else ())
        keys = [k for k in mine if k not in free and mine[k] != theirs.get(k, SETTINGS_ADDED.get(k))]
        if self.dist is not None and torch.device(mine["device"]).type != torch.device(theirs["device"]).type:
            keys.append("device")
        differences = [f"{k}: {theirs.get(k)!r} there" for k in keys]
        if "model" not in keys and saved.get("model_graph", self.model_digest) != self.model_digest:
            differences.append("model: another traced graph there (the model file or function changed)")
        begun = len(saved["completed"]) + (0 if saved["finished_run"] else 1)
        if self.opts.runs < begun:  # else the runs past --runs would vanish from the results
            differences.append(f"runs: {begun} begun there, more than {self.opts.runs}")
        if not same_recipe(saved["recipe"], self.recipe.to_dict()):
            differences.insert(0, _recipe_difference(saved["recipe"], self.recipe.to_dict()))
        if differences:
            raise UserError(f"checkpoint in {self.opts.checkpoint_dir} is of a different training "
                            f"({', '.join(differences)}); "
                            "resume with the same options or use another --checkpoint folder")

    def train(self) -> TrainResult:
        """All runs (resuming the checkpointed one with ``resume``); see :func:`train`."""
        try:
            return self._train()
        except RuntimeError as exc:
            if self.dist is None or not dp.peer_failure(exc):
                raise
            where = (f"; the checkpoint in {self.opts.checkpoint_dir} is of the last finished epoch: "
                     "continue with --resume") if self.opts.checkpoint_dir else ""
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise dp.PeerLost(f"rank {self.dist.rank}: {dp.PEER_LOST} ({first[:200]}){where}") from None
        finally:
            if self.dist is not None:
                dp.shutdown(self.dist, sys.exc_info()[1])

    def _train(self) -> TrainResult:
        opts = self.opts
        saved = None
        if opts.resume and not opts.checkpoint_dir:
            raise UserError("--resume needs --checkpoint DIR (the folder holding the checkpoint)")
        # The model and the checkpoint are checked before the data is looked for: it may
        # be absent, or take seconds to decode.
        self.model_digest = check_model(opts)
        if opts.checkpoint_dir:
            exists = ckpt.checkpoint_path(opts.checkpoint_dir).exists()
            if opts.resume:
                saved = ckpt.load_checkpoint(opts.checkpoint_dir)
                self._check_resume(saved)
            elif exists:
                raise UserError(f"{ckpt.checkpoint_path(opts.checkpoint_dir)} exists: pass --resume to "
                                "continue that training, or choose an empty --checkpoint folder")
            ckpt.check_writable(opts.checkpoint_dir)
        setup = Timer(self.device)
        self._load_data(setup)
        if opts.checkpoint_dir:  # only a checkpoint needs it: hashing the data costs a fraction of a second
            self.data_digest = self.data.fingerprint()
            if saved is not None and saved.get("data", self.data_digest) != self.data_digest:
                raise UserError(f"checkpoint in {opts.checkpoint_dir} was trained on other data than "
                                f"{opts.data or 'the default data'} holds (other images, labels or "
                                "classes); resume with its data or use another --checkpoint folder")
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        completed = [RunRecord.from_dict(r) for r in saved["completed"]] if saved else []
        first = len(completed)
        in_run = saved if saved is not None and not saved["finished_run"] else None
        if in_run is not None:
            first = saved["run"]
        if saved is not None and first >= opts.runs:
            self.reporter.message(f"all {first} run(s) of the checkpoint in {opts.checkpoint_dir} are "
                                  "finished: nothing to train (raise --runs for more)")
        self.last_model = None
        with self.interrupt:
            for run in range(first, opts.runs):
                requested = self.interrupt.requested
                if self.dist is not None and dp.agree(requested, self.dist) and not requested:
                    self.interrupt.request(dp.STOPPED_BY_ANOTHER_RANK)
                if self.interrupt.requested:  # between runs: the finished run's checkpoint is written
                    how = f"interrupted ({self.interrupt.name}) before run {run + 1}"
                    self.reporter.message(f"{how}; continue with --resume" if opts.checkpoint_dir
                                          else f"{how}; no --checkpoint folder was given")
                    self.interrupt.check()
                completed.append(self._run(run, list(completed), in_run if run == first else None))
        return TrainResult(recipe=self.recipe.to_dict(), hyperparameters=asdict(self.hyper),
                           settings=self.settings(), runs=completed, timing_method=setup.method,
                           target=opts.target, setup=setup.as_dict(), model=self.last_model)


def train(opts: TrainOptions, reporter: Reporter | None = None) -> TrainResult:
    """Train ``opts.model_path`` (or what ``opts.model()`` builds) with ``opts.recipe`` for
    ``opts.runs`` runs (see the module docstring).

    Returns:
        :class:`TrainResult` with every run's per-epoch records, final plain and TTA
        accuracy (fractions) and counted seconds.

    Raises:
        UserError: bad options (neither or both of ``model_path`` and ``model``...), model
            file or factory, data, recipe passes, or checkpoint.
        PeerLost: (a ``UserError``) in a distributed training, another process went away.
        TrainingDiverged: a NaN or infinite loss (names the epoch and step).
        Interrupted: Ctrl-C or SIGTERM (``signum`` says which), after writing a checkpoint
            when ``opts.checkpoint_dir`` is set.
        KeyboardInterrupt: a reporter callback raised it (a checkpoint is written alike).
    """
    return Trainer(opts, reporter).train()
