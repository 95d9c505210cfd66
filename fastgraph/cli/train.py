"""Train a model file on CIFAR-10 with a recipe and report accuracy (plain and TTA) and time.

``fastgraph train MODEL.py --recipe NAME`` loads the file, traces it, applies the
recipe's passes and trains on the device-resident dataset; it prints a per-epoch table
with a progress bar and, over ``--runs``, mean +/- std of the accuracies and of the
counted time (see ``fastgraph.training.loop`` for what is counted), and writes a JSON record with
``--json``. Ctrl-C or SIGTERM writes a checkpoint when ``--checkpoint DIR`` is given (exit
130 for Ctrl-C, 143 = 128 + SIGTERM, as a shell reports a process that SIGTERM ended);
``--resume`` continues it. ``--plot FILE`` draws the plain and TTA accuracy of every epoch
against counted seconds and against epochs (``fastgraph.training.curves``);
``--tensorboard DIR`` logs every run's per-epoch scalars and hyperparameters for
TensorBoard (``fastgraph.training.tensorboard``, extra ``tensorboard``). The output paths,
the tensorboard package and the model file are checked before the data is looked for.

Data parallel: ``torchrun --nproc-per-node N -m fastgraph train ...`` (or ``--nproc N``,
which starts torchrun on this machine) trains in N processes
(``fastgraph.training.distributed``); rank 0 alone prints and writes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys

from fastgraph.cli.common import data_input, positive
from fastgraph.core.errors import UserError
from fastgraph.core.outputs import check_outputs, environment, write_json


def _accuracy(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    value = value / 100 if value > 1 else value  # 94 and 0.94 both mean 94%
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"accuracy must be in (0, 1] or (0, 100]%, got {text}")
    return value


def _seed(text: str) -> int:
    """``--seed``: an integer in [0, 2**64 - 1] (argparse's one-line usage error, exit 2, else)."""
    from fastgraph.training.options import MAX_SEED  # here: importing the command stays free of torch

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an int: {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**64 - 1], got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``fastgraph train`` options to its subparser."""
    from fastgraph.training.recipes import shipped_recipes  # no torch import: help stays quick

    parser.add_argument("model", help="plain PyTorch model file (.py)")
    parser.add_argument("--recipe", required=True,
                        help=f"shipped recipe ({', '.join(shipped_recipes())}) or a .toml file")
    parser.add_argument("--entry", help="function or class in the model file that builds the model")
    parser.add_argument("--epochs", type=positive(float), help="override the recipe's epochs "
                        "(the lr schedule stretches with it)")
    parser.add_argument("--batch-size", type=positive(int),
                        help="override the recipe's batch size (a recipe in decoupled units scales "
                             "its lr with it, as airbench does; one in torch units keeps its lr)")
    parser.add_argument("--runs", type=positive(int), default=1,
                        help="independent runs (seeds seed, seed+1, ...)")
    parser.add_argument("--seed", type=_seed, default=0,
                        help="seed of the first run, 0 to 2**64 - 1 (default 0)")
    parser.add_argument("--target", type=_accuracy, metavar="ACC",
                        help="report the time at which the mean TTA accuracy first reaches ACC "
                             "(e.g. 0.94 or 94)")
    parser.add_argument("--subset", type=positive(int), metavar="N",
                        help="train on N training images (class-balanced, first of each class)")
    parser.add_argument("--test-subset", type=positive(int), metavar="N",
                        help="evaluate on N test images (class-balanced; for quick checks only)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--precision", choices=("fp32", "fp16", "bf16"),
                        help="autocast precision (default: the recipe's on CUDA, fp32 on CPU)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the training module (default: the recipe's, on CUDA only)")
    parser.add_argument("--checkpoint", metavar="DIR", help="write a checkpoint there after every epoch")
    parser.add_argument("--resume", action="store_true",
                        help="continue the training checkpointed in --checkpoint DIR")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--plot", metavar="FILE",
                        help="draw test and TTA accuracy against counted seconds and epochs (PNG; "
                             "needs the per-epoch evaluation)")
    parser.add_argument("--tensorboard", metavar="DIR",
                        help="log per-epoch scalars and hyperparameters of every run for TensorBoard "
                             "(DIR/run-1, ...; pip install 'fastgraph[tensorboard]')")
    parser.add_argument("--data", metavar="PATH", help="CIFAR-10 (folder, archive; default $FASTGRAPH_DATA)")
    parser.add_argument("--no-progress-eval", dest="progress_eval", action="store_false",
                        help="evaluate after the last epoch only (faster; no per-epoch accuracy)")
    parser.add_argument("--stochastic-depth", action="store_true",
                        help="train with the stochastic_depth pass (the recipe's [stochastic_depth] options)")
    parser.add_argument("--nproc", type=positive(int), metavar="N",
                        help="train data-parallel in N processes on this machine (one per GPU; gloo on "
                             "CPUs), started through torchrun; the recipe's batch is the global batch")
    parser.add_argument("--sync-bn", action="store_true",
                        help="data parallel on GPUs: BatchNorm statistics over the global batch "
                             "(torch.nn.SyncBatchNorm) instead of each process's share")
    parser.add_argument("--no-fused-kernels", dest="fused_kernels", action="store_false",
                        help="drop the recipe's fused-kernel passes (fuse_bn_activation): the same "
                             "model on unfused PyTorch ops, for A/B timing")


def run(args: argparse.Namespace) -> int:
    """Run ``fastgraph train``; returns the exit code (a ``UserError`` is one line, exit 2)."""
    from fastgraph.training import distributed
    from fastgraph.training.loop import Interrupted, Reporter, TrainOptions, train
    from fastgraph.training.options import MAX_SEED
    from fastgraph.training.recipes import load_recipe
    from fastgraph.training.report import RichReporter, print_summary

    # TrainOptions checks this too; here it comes before torchrun starts any process.
    if args.seed + args.runs - 1 > MAX_SEED:
        raise UserError(f"--seed {args.seed} with --runs {args.runs}: the last run's seed "
                        f"{args.seed + args.runs - 1} is above 2**64 - 1, the largest torch accepts")
    started = distributed.from_environment()
    if args.nproc and args.nproc > 1 and started is None:
        return distributed.launch(args.nproc, args._argv)
    main = started is None or started[0] == 0  # rank 0 prints and writes; the others only train

    if args.resume and not args.checkpoint:
        raise UserError("--resume needs --checkpoint DIR (the folder holding the checkpoint)")
    if args.plot and not args.progress_eval:
        raise UserError("--plot draws the accuracy of every epoch: drop --no-progress-eval")
    # Before the training, not after it: the results of hours must have somewhere to go.
    check_outputs({"--json": args.json, "--plot": args.plot, "--tensorboard": args.tensorboard},
                  inputs={"model file": args.model, "data": data_input(args.data)},
                  folders=("--tensorboard",))
    if args.plot:
        from fastgraph.core.figures import check_figure_path

        check_figure_path(args.plot, "--plot")
    tensorboard = None
    if args.tensorboard and main:
        from fastgraph.training.tensorboard import Reporters, TensorBoardReporter

        tensorboard = TensorBoardReporter(args.tensorboard, resume=args.resume)
    recipe = load_recipe(args.recipe)
    opts = TrainOptions(model_path=args.model, recipe=recipe, entry=args.entry, epochs=args.epochs,
                        batch_size=args.batch_size, runs=args.runs, seed=args.seed, target=args.target,
                        subset=args.subset, test_subset=args.test_subset, device=args.device,
                        precision=args.precision, compile=args.compile, checkpoint_dir=args.checkpoint,
                        resume=args.resume, stochastic_depth=args.stochastic_depth, data=args.data,
                        progress_eval=args.progress_eval, fused_kernels=args.fused_kernels,
                        sync_bn=args.sync_bn)
    reporter = RichReporter(recipe) if main else Reporter()
    try:
        with reporter if main else contextlib.nullcontext(), tensorboard or contextlib.nullcontext():
            result = train(opts, reporter if tensorboard is None else Reporters(reporter, tensorboard))
            if tensorboard is not None:
                tensorboard.finish(result)
    except distributed.PeerLost as exc:
        # one line and out, past the destructors: a broken process group's destructor
        # waits for collectives the lost process never joins (see distributed.shutdown)
        distributed.say_error(f"fastgraph: error: {exc}", peer_lost=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)
    except Interrupted as exc:
        if exc.signum != signal.SIGTERM:
            raise  # Ctrl-C: the CLI's KeyboardInterrupt exit, 130
        print("fastgraph: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    if not main:
        return 0
    print_summary(result, reporter.console)
    env = environment(result.settings["device"])
    if args.json:
        path = write_json(args.json, {**env, **result.to_dict()})
        reporter.console.print(f"results written to {path}")
    if args.plot:
        from fastgraph.training.curves import plot_curves

        path = plot_curves(result, args.plot, device=env["device"])
        reporter.console.print(f"accuracy curves drawn in {path}")
    if tensorboard is not None:
        reporter.console.print(f"TensorBoard logs written to {tensorboard.log_dir}: "
                               f"tensorboard --logdir {tensorboard.log_dir}")
    return 0
