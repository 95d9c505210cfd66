"""Training a model file on CIFAR-10 with a recipe, as the fast-CIFAR-10 records do.

Owns: ``loop`` (the trainer: runs, epochs, steps, lr per group, warm-up, snapshots
and resume), ``options`` (``TrainOptions``, precision, the timing rule), ``records``
(epoch and run records, ``TrainResult``, the ``Reporter`` interface), ``build`` (load,
trace, the recipe's passes, the compiled module reused across runs), ``batches``
(device-resident data, balanced subsets, warm-up batches), ``evaluation`` (accuracy,
the TTA module), ``signals`` (SIGINT/SIGTERM to a checkpoint), ``recipes`` (TOML
recipes and their sources), ``optim`` (SGD groups, Muon for conv filters, EMA),
``augmentation`` (on-device crops, flips, cutout), ``checkpoint`` (atomic, resumable),
``trained`` (the recipe's training graph, trained weights read back for export and
profiling), ``report`` (the per-epoch table and summary), ``curves`` (accuracy against
time and epochs), ``tensorboard`` (scalars and hparams).

May import: ``core``, ``passes``, ``kernels``, ``data``, ``profiles``.
"""
