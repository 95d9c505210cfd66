"""Per-epoch training augmentation over a dataset resident on the device as uint8.

The whole training set stays on the device as uint8 (50,000 x 3 x 32 x 32 = 147 MiB)
and every batch is made in one pass of ``fastgraph.kernels.augment`` (gather by index,
pad/translate, flip, cutout, normalise, cast, channels-last): Page's "preprocessing on
the GPU" and airbench's loader, without a host round trip. Randomness comes from one
seeded ``torch.Generator`` on the device, so a run is reproducible and its state can be
checkpointed and restored exactly. On CUDA the Triton kernel runs; elsewhere its
plain-PyTorch reference (same signature, same results).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class DeviceAugmenter:
    """Yields augmented, shuffled batches of a device-resident uint8 training set.

    Args:
        images: uint8 (N, 3, H, W) training images, already on ``device``.
        labels: int64 (N,) on ``device``.
        batch_size: images per batch; the last incomplete batch of an epoch is dropped
            (ghost batch norm and torch.compile want one batch shape).
        pad: translation range in pixels (shift (dy, dx) drawn in [-pad, pad]).
        pad_mode: "reflect" or "zeros", how the border is filled.
        flip: "random" (each image with probability 1/2), "alternate" (airbench: a
            random half in the first epoch, every image the other way the next), "none".
        cutout: side in pixels of a square zeroed at a random place (0: none).
        mean, std: per-channel normalisation in 0..255 units (``fastgraph.data.CIFAR10_MEAN``).
        seed: seed of the augmentation generator (shuffling and augmentation draws).
        out_dtype: dtype of the batches: float32, or the autocast dtype the training runs
            in (bf16 or fp16, on a GPU and a CPU alike, so a compiled step sees one dtype).
        channels_last: return batches in channels-last memory format.
        positions: int64 (b,) positions in each batch of ``batch_size`` that this process
            trains on (a rank of a data-parallel training:
            ``fastgraph.training.distributed.batch_positions``); None: the whole batch. The
            permutation and the draws stay those of the whole batch, so the ranks together
            see exactly what one process would.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int, pad: int,
                 pad_mode: str, flip: str, cutout: int, mean, std, seed: int,
                 out_dtype: torch.dtype = torch.float32, channels_last: bool = False,
                 positions: torch.Tensor | None = None):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) < batch_size:
            raise ValueError(f"{len(images)} training images are fewer than one batch of {batch_size}")
        self.images, self.labels = images, labels
        self.device = images.device
        self.batch_size, self.pad, self.pad_mode = batch_size, pad, pad_mode
        self.flip, self.cutout = flip, cutout
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.out_dtype, self.channels_last = out_dtype, channels_last
        self.positions = None if positions is None else positions.to(self.device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        from fastgraph.kernels import augment as kernel  # deferred: Triton imports are slow

        self._draw = kernel.draw_augmentation
        self._augment = kernel.augment if self.device.type == "cuda" else kernel.augment_reference

    @property
    def steps_per_epoch(self) -> int:
        """Full batches per epoch: ``N // batch_size``."""
        return len(self.images) // self.batch_size

    def state_dict(self) -> dict:
        """The generator state (a uint8 CPU tensor), for checkpoints."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def epoch(self, epoch: int, skip: int = 0,
              steps: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of epoch ``epoch`` (0-based): (float (B, 3, H, W) normalised, int64 (B,)).

        The epoch's permutation and all its augmentation draws are taken from the
        generator up front, so ``skip`` (batches already trained, when resuming inside
        an epoch) leaves the generator exactly where an uninterrupted epoch leaves it.
        ``steps`` limits the epoch to its first batches (a fractional last epoch).
        """
        n_steps = self.steps_per_epoch if steps is None else min(steps, self.steps_per_epoch)
        order = torch.randperm(len(self.images), generator=self.generator, device=self.device)
        # Draw for every image, then drop the last partial batch: the generator then advances
        # by the same amount at any batch size, so a seed gives the same permutations and
        # draws whatever the batch (airbench94.py CifarLoader.__iter__ and Page's
        # core.py Transform.set_random_choices also draw for the whole dataset each epoch).
        shift, flip, corner = self._draw(len(order), self.generator, pad=self.pad,
                                         cutout_size=self.cutout, flip=self.flip, epoch=epoch,
                                         index=order, device=self.device)
        kept = self.steps_per_epoch * self.batch_size
        order, shift, flip = order[:kept], shift[:kept], flip[:kept]
        corner = None if corner is None else corner[:kept]
        for i in range(skip, n_steps):
            rows = slice(i * self.batch_size, (i + 1) * self.batch_size)
            if self.positions is not None:  # this rank's images of the global batch
                rows = self.positions + i * self.batch_size
            index = order[rows]
            x = self._augment(self.images, index, shift[rows], flip[rows],
                              corner[rows] if self.cutout else None,
                              mean=self.mean, std=self.std, pad=self.pad, pad_mode=self.pad_mode,
                              cutout_size=self.cutout, out_dtype=self.out_dtype,
                              channels_last=self.channels_last)
            yield x, self.labels[index]
