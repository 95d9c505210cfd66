"""Download CIFAR-10 or show what a data location holds (`fastgraph data download|info`).

``download [DIR] [--url URL] [--md5 MD5]`` fetches the official python-format archive
into DIR (default ``$FASTGRAPH_DATA``, else ``~/.cache/fastgraph/cifar10``), checks
its md5 and extracts it. ``info [--data PATH]`` loads the data (decoding and caching
it the first time) and prints counts per split and class, the source, the cache and
the load time. On an ImageNet-format folder (``train/`` and ``val/`` class folders or tar
shards) it indexes both splits without decoding and prints their image and class counts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fastgraph.data import pickled


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``download`` and ``info`` actions to the ``data`` subcommand's parser."""
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    dl = actions.add_parser("download", help="download, md5-check and extract CIFAR-10")
    dl.add_argument("dir", nargs="?", type=Path, metavar="DIR",
                    help="folder to extract into (default $FASTGRAPH_DATA, else ~/.cache/fastgraph/cifar10)")
    dl.add_argument("--url", default=pickled.URL, help="archive URL (default: the official one)")
    dl.add_argument("--md5", default=pickled.ARCHIVE_MD5, help="expected md5 of the archive")
    info = actions.add_parser("info", help="load CIFAR-10 (or index an ImageNet-format folder) and print "
                                           "what it holds")
    info.add_argument("--data", type=Path, default=None,
                      help="folder or archive (default $FASTGRAPH_DATA, else ~/.cache/fastgraph/cifar10)")


def _download(args: argparse.Namespace) -> int:
    from rich.console import Console

    from fastgraph.core.errors import DataError
    from fastgraph.data import default_data_dir
    from fastgraph.data.download import download

    dest = args.dir if args.dir is not None else default_data_dir()
    if dest.is_file():
        raise DataError(f"{dest}: is a file, not a folder to download into; pass DIR")
    placed = download(dest, url=args.url, md5=args.md5, console=Console(stderr=True))
    names = ", ".join(str(p) for p in placed) or "(the archive was empty)"
    print(f"CIFAR-10 downloaded (md5 {args.md5} verified) and extracted to {names}")
    print(f"load it with load_cifar10({str(dest)!r}) or `fastgraph data info --data {dest}`")
    return 0


def _imagenet_info(root: Path) -> int:
    from rich.console import Console

    from fastgraph.core.console import fitting_table
    from fastgraph.data.imagenet import SPLITS, scan_imagenet

    rows = []
    for split in SPLITS:
        images = scan_imagenet(root, split)
        rows.append([split, str(len(images)), str(len(images.classes)),
                     f"{len(images) / max(1, len(images.classes)):.0f}",
                     "tar shards" if images.shards else "folders",
                     str(images.source)])
    Console().print(fitting_table(f"ImageNet-format data in {root} (indexed, not decoded)",
                                  {"split": "left", "images": "right", "classes": "right",
                                   "per class": "right", "layout": "left", "source": "left"}, rows))
    return 0


def _info(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from fastgraph.data import is_imagenet_layout, load_cifar10

    if args.data is not None and is_imagenet_layout(args.data):
        return _imagenet_info(args.data)
    ds = load_cifar10(args.data)
    table = Table(title="CIFAR-10")
    table.add_column("class")
    table.add_column("train", justify="right")
    table.add_column("test", justify="right")
    train_counts = ds.train_labels.bincount(minlength=len(ds.classes)).tolist()
    test_counts = ds.test_labels.bincount(minlength=len(ds.classes)).tolist()
    for name, n_train, n_test in zip(ds.classes, train_counts, test_counts, strict=True):
        table.add_row(name, str(n_train), str(n_test))
    table.add_row("[bold]total", f"[bold]{len(ds.train_labels)}", f"[bold]{len(ds.test_labels)}")
    console = Console()
    console.print(table)
    how = "read from cache" if ds.from_cache else "decoded, cache written"
    console.print(f"images: uint8 {tuple(ds.train_images.shape)} train, {tuple(ds.test_images.shape)} test")
    console.print(f"source: {ds.source}")
    console.print(f"cache:  {ds.cache_path or '(none: no writable cache location)'}")
    console.print(f"load:   {ds.load_seconds:.3f} s ({how})")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run ``fastgraph data ACTION``; returns the exit code (errors raise DataError)."""
    return _download(args) if args.action == "download" else _info(args)
