"""Decode + augment throughput (images/s) of fastgraph's ImageNet-format streams.

What is timed: ``fastgraph.data.imagenet_stream.TrainStream`` batches (read the JPEGs,
RandomResizedCrop, flip, resize to r x r, upload, normalise to float32 on the device) at
r = 160, 192, 224 (the FFCV ResNet-50 recipe's training resolutions) with N worker
processes, and ``TestStream`` batches (centre crop 224/256, resized to 224, uint8). Each
measurement builds a fresh stream, makes one whole pass untimed (worker start-up, page
cache, nvJPEG and allocator warm-up), then times a second whole pass with
``time.perf_counter``, from asking for the first batch to receiving the last (the
persistent workers refill their pipeline inside the timed pass, as in every training
epoch; ``torch.cuda.synchronize()`` before the clock stops on CUDA): images / seconds.

Decoders: "cpu" (Pillow in the workers, JPEG draft mode when the crop shrinks 2x or
more) everywhere; "gpu" (nvJPEG through ``torchvision.io.decode_jpeg`` on the device,
crop and resize there; the workers only read bytes and headers) when CUDA and
torchvision are present.

Input: ``--data ROOT`` (an ImageNet-format folder or tar shards), else a folder built
like the tests build theirs (``tests/data/imagenet_builders.py``): real CIFAR-10 images
(``$FASTGRAPH_DATA``) upscaled to 320..480 pixels a side (ImageNet's are ~400 x 350 on
average), JPEG quality 90, in a temporary folder. The files are read from the page
cache after the first pass: the figures are decode + augment, not disk, throughput.

Writes ``bench/results/imagenet-loader-<device>-<date>.json`` (device, torch version,
commit, date, method, every measurement, and the published FFCV figures to hold them
against, with their source) and prints a table. Run::

    python bench/imagenet_loader.py [--workers 2] [--images 512] [--data ROOT]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
RESOLUTIONS = (160, 192, 224)
EVAL_RES, CROP_RATIO = 224, 224 / 256
MEAN = (123.675, 116.28, 103.53)  # ImageNet's per-channel mean and std in 0..255 units
STD = (58.395, 57.12, 57.375)

METHOD = ("per (decoder, stage, resolution, workers): a fresh stream with persistent workers; one whole "
          "pass untimed (worker start-up, page cache, warm-up); then time.perf_counter around a second whole "
          "pass, first request to last batch (torch.cuda.synchronize before the clock stops on CUDA); "
          "images/s = images of that pass / seconds. Files come from the page cache.")

# Published data-loading rates, quoted as found. FFCV's ImageNet benchmark page: "Data loading
# benchmark results (ImageNet)", all cores of an AWS p3dn.24xlarge, pipeline = load images,
# RandomResizedCrop to 224x224, random horizontal flip.
FFCV_SOURCE = "https://docs.ffcv.io/benchmarks.html (libffcv/ffcv docs/benchmarks.rst)"
_P3DN = "all cores of an AWS p3dn.24xlarge, RandomResizedCrop 224 + flip"
PUBLISHED = [
    {"system": "FFCV", "images_per_s": 31278, "source": FFCV_SOURCE,
     "setting": f"RAM, max side 512 px, JPEG quality 90, {_P3DN}"},
    {"system": "FFCV", "images_per_s": 16631, "source": FFCV_SOURCE,
     "setting": f"EBS (network disk), max side 512 px, JPEG quality 90, {_P3DN}"},
    {"system": "FFCV", "images_per_s": 172801, "source": FFCV_SOURCE,
     "setting": f"RAM, 256 px stored RAW (no JPEG decode), {_P3DN}"},
]
DALI_NOTE = ("NVIDIA DALI: no images/s figure was found in text; FFCV's benchmark page and NVIDIA's DALI "
             "page (developer.nvidia.com/dali) show DALI's rates only in plots, so none is quoted.")


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def build_input(folder: Path, images: int) -> Path:
    """An ImageNet-format folder of ``images`` training images (10 classes) of 320..480 px."""
    sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "data")]
    from imagenet_builders import write_imagenet_folder

    per_class = max(1, images // 10)
    return write_imagenet_folder(folder, classes=10, per_class_train=per_class,
                                 per_class_val=max(1, per_class // 2), sizes=(320, 480))


def measure(passes, sync) -> tuple[int, float]:
    """(images, seconds) of the second of two passes; ``passes()`` starts one (an iterator of batches)."""
    for _ in passes():  # warm-up pass, untimed
        pass
    sync()
    n, t0 = 0, time.perf_counter()
    for x, _ in passes():
        n += len(x)
    sync()
    return n, time.perf_counter() - t0


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, help="an ImageNet-format ROOT (train/ and val/); default: built")
    p.add_argument("--images", type=int, default=512, help="training images of the built input (default 512)")
    p.add_argument("--workers", type=int, nargs="+", default=None,
                   help="worker counts to measure (default: min(8, cpu count))")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--resolutions", type=int, nargs="+", default=list(RESOLUTIONS))
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder (default bench/results)")
    p.add_argument("--keep-input", type=Path, metavar="DIR",
                   help="build the input into DIR and keep it (for a training run after this one)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from rich.console import Console

    from fastgraph.core.console import fitting_table
    from fastgraph.core.errors import UserError
    from fastgraph.core.outputs import check_outputs, environment, write_json
    from fastgraph.data.imagenet import image_header, scan_imagenet
    from fastgraph.data.imagenet_stream import TestStream, TrainStream, default_workers, gpu_decode_available

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    decoders = ["cpu"] + (["gpu"] if cuda and gpu_decode_available() else [])
    workers = args.workers or [default_workers()]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    env = environment(str(device))
    out = args.out / f"imagenet-loader-{_slug(env['device']) if cuda else 'cpu'}-{env['date'][:10]}.json"
    try:  # before the slow work: the results folder, made as the other benchmarks make theirs
        args.out.mkdir(parents=True, exist_ok=True)
        check_outputs({"--out": out})
    except (OSError, UserError) as exc:
        print(f"bench/imagenet_loader.py: {exc}", file=sys.stderr)
        return 2
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            root = args.data or build_input(args.keep_input or Path(tmp) / "imagenet", args.images)
            train, val = scan_imagenet(root, "train"), scan_imagenet(root, "val")
        except UserError as exc:
            print(f"bench/imagenet_loader.py: {exc}", file=sys.stderr)
            return 2
        sizes = [image_header(train.read(i), train.name(i))[:2] for i in range(min(len(train), 200))]
        mean_w = sum(w for w, _ in sizes) / len(sizes)
        mean_h = sum(h for _, h in sizes) / len(sizes)
        mean_bytes = sum(len(train.read(i)) for i in range(min(len(train), 200))) / min(len(train), 200)
        rows = []
        for decode in decoders:
            for n_workers in workers:
                for res in args.resolutions:
                    with TrainStream(train, batch_size=args.batch_size, device=device, seed=0,
                                     resolution=lambda _e, r=res: r, mean=MEAN, std=STD, workers=n_workers,
                                     decode=decode) as s:
                        n, sec = measure(lambda s=s: s.epoch(0), sync)
                    rows.append({"decoder": decode, "stage": "train", "res": res, "workers": n_workers,
                                 "batch_size": args.batch_size, "images": n, "seconds": sec,
                                 "images_per_s": n / sec})
                with TestStream(val, batch_size=args.batch_size, device=device, res=EVAL_RES,
                                crop_ratio=CROP_RATIO, workers=n_workers, decode=decode) as s:
                    n, sec = measure(lambda s=s: iter(s), sync)
                rows.append({"decoder": decode, "stage": "eval", "res": EVAL_RES, "workers": n_workers,
                             "batch_size": args.batch_size, "images": n, "seconds": sec,
                             "images_per_s": n / sec})
    record = {
        **env, "benchmark": "imagenet_loader", "method": METHOD,
        "cpu_count": os.cpu_count(),
        # other processes on the machine take CPU from the workers: above cpu_count, the
        # figures are lower bounds of what the loader does on a quiet machine
        "load_average_1min": {"before": load_before,
                              "after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
        "data": {"root": str(args.data) if args.data else "built: CIFAR-10 upscaled to 320..480 px, JPEG q90",
                 "train_images": len(train), "val_images": len(val), "classes": len(train.classes),
                 "mean_width": round(mean_w, 1), "mean_height": round(mean_h, 1),
                 "mean_jpeg_bytes": round(mean_bytes)},
        "results": rows, "published": PUBLISHED, "published_note": DALI_NOTE,
    }
    write_json(out, record, "--out")
    table = fitting_table(
        f"ImageNet-format loader, {env['device']}, {len(train)} train images "
        f"of ~{mean_w:.0f}x{mean_h:.0f} px",
        {"decoder": "left", "stage": "left", "res": "right", "workers": "right", "images/s": "right",
         "per worker": "right"},
        [[r["decoder"], r["stage"], str(r["res"]), str(r["workers"]), f"{r['images_per_s']:.0f}",
          f"{r['images_per_s'] / max(1, r['workers']):.0f}"] for r in rows])
    console = Console()
    console.print(table)
    for p in PUBLISHED:
        console.print(f"published: {p['system']} {p['images_per_s']:,} images/s "
                      f"({p['setting']}; {p['source']})")
    console.print(DALI_NOTE)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
