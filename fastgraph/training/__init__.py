"""Training a model file on CIFAR-10 with a recipe, as the fast-CIFAR-10 records do.

Owns: ``loop`` (the trainer: runs, epochs, steps, warm-up, checkpoints at step
boundaries, signals), ``recipes`` (TOML recipes and their sources), ``optim`` (SGD
groups, Muon for conv filters, EMA/weight averaging), ``augmentation`` (on-device crops,
flips, cutout), ``checkpoint`` (atomic, resumable), ``trained`` (the recipe's training
graph, and trained weights read back for export and profiling), ``report`` (the
per-epoch table and summary).

May import: ``core``, ``passes``, ``kernels``, ``data``, ``profiles``.
"""
