"""CIFAR-10 in its original python format: ``cifar-10-batches-py/`` or ``cifar-10-python.tar.gz``.

Krizhevsky's release (https://www.cs.toronto.edu/~kriz/cifar.html) pickles one dict per
batch file: ``b'data'`` uint8 (10000, 3072), each row the 1024 red, then green, then
blue values of a 32x32 image (so a reshape gives NCHW), and ``b'labels'`` a list of
ints; ``batches.meta`` holds ``b'label_names'`` (str keys, as batches re-saved after
loading with ``encoding="latin1"`` carry them, are read too). Every file is md5-checked
before it is unpickled, against the published checksums (the same table torchvision's
CIFAR10 uses). Unpickling only admits numpy's array-reconstruction functions, so a substituted
file cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

import numpy as np

from fastgraph.core.console import progress
from fastgraph.core.errors import DataError
from fastgraph.data.cache import Arrays
from fastgraph.data.imagefolder import ARCHIVE_ERRORS

FOLDER = "cifar-10-batches-py"
ARCHIVE = "cifar-10-python.tar.gz"
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
TRAIN_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5")
TEST_FILES = ("test_batch",)
META_FILE = "batches.meta"
FILES = (*TRAIN_FILES, *TEST_FILES, META_FILE)
# md5 of each file of the official release (as published with torchvision's CIFAR10).
PUBLISHED_MD5: dict[str, str] = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
# Names a numpy array pickle refers to: numpy 1.x writes numpy.core.*, 2.x numpy._core.*;
# Python 3 writes bytes under protocol 2 as _codecs.encode(str, "latin1").
_ALLOWED = {
    (mod, name)
    for core in ("numpy.core", "numpy._core")
    for mod, name in ((f"{core}.multiarray", "_reconstruct"), (f"{core}.multiarray", "scalar"),
                      (f"{core}.numeric", "_frombuffer"))
} | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _unpickle(data: bytes, where: str) -> dict:
    try:
        obj = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # noqa: BLE001 - a corrupt pickle fails in many ways (EOF, opcode, class)
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"{where}: not a readable CIFAR-10 batch ({reason}); re-download it "
                        "with `fastgraph data download`") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: not a CIFAR-10 batch (holds {type(obj).__name__}, not a dict); "
                        "re-download it with `fastgraph data download`")
    return obj


def _field(obj: dict, name: str):
    # The release pickles bytes keys (b'data'); batches re-saved after loading with
    # encoding="latin1" (as torchvision loads them) carry the same fields under str keys.
    return obj.get(name.encode(), obj.get(name))


def _batch(obj: dict, where: str, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    data, labels = _field(obj, "data"), _field(obj, "labels")
    if data is None or labels is None:
        keys = ", ".join(repr(k) for k in obj)
        hint = "; a CIFAR-100 batch?" if _field(obj, "fine_labels") is not None else ""
        raise DataError(f"{where}: not a CIFAR-10 batch (keys {keys}; expected b'data' and "
                        f"b'labels'{hint}); pass CIFAR-10's batches")
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3 * 32 * 32):
        got = (f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__)
        raise DataError(f"{where}: b'data' is {got}, expected uint8 (N, 3072); re-download it")
    try:
        values = np.asarray(labels)
    except (ValueError, TypeError):  # ragged nesting
        values = np.asarray(None)
    # Integers only: casting float or str labels to int64 would truncate or mislabel silently.
    if values.dtype.kind not in "iu" or values.shape != (len(data),):
        raise DataError(f"{where}: b'labels' is not {len(data)} integers, one per image of b'data' "
                        f"(got {values.dtype} {values.shape}); re-download it")
    if values.size and (values.min() < 0 or values.max() >= n_classes):
        raise DataError(f"{where}: b'labels' run from {values.min()} to {values.max()}, outside the "
                        f"{n_classes} classes of batches.meta (0..{n_classes - 1}); re-download it")
    return data.reshape(-1, 3, 32, 32), values.astype(np.int64)


def decode(files: Mapping[str, bytes], where: Mapping[str, str],
           checksums: Mapping[str, str] | None = None) -> Arrays:
    """Check md5s and decode the seven python-format files.

    Args:
        files: file name (``data_batch_1`` ... ``batches.meta``) -> its bytes.
        where: file name -> how to name it in errors (its path).
        checksums: file name -> expected md5 hex; default the published ones. Files not
            in the mapping are not checked.
    Raises:
        DataError: md5 mismatch, unreadable pickle, wrong array shapes (naming the file).
    """
    checksums = PUBLISHED_MD5 if checksums is None else checksums
    for name in FILES:
        want = checksums.get(name)
        if want is not None:
            got = hashlib.md5(files[name]).hexdigest()
            if got != want.lower():
                raise DataError(f"{where[name]}: md5 {got} does not match the expected {want} "
                                "(truncated, corrupt or not the original file); re-download with "
                                "`fastgraph data download`")
    meta = _unpickle(files[META_FILE], where[META_FILE])
    names = _field(meta, "label_names")
    if not (isinstance(names, list) and names):
        raise DataError(f"{where[META_FILE]}: no b'label_names' list; re-download it")
    classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    out = []
    with progress("decoding python-format batches", total=len(TRAIN_FILES) + len(TEST_FILES)) as update:
        for group in (TRAIN_FILES, TEST_FILES):
            batches = []
            for name in group:
                update(note=name)
                batches.append(_batch(_unpickle(files[name], where[name]), where[name], len(classes)))
                update(advance=1)
            out += [np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])]
    return Arrays(*out, classes)


def read_folder(folder: Path, checksums: Mapping[str, str] | None = None) -> Arrays:
    """Decode ``cifar-10-batches-py/`` (the folder itself). Raises DataError (see ``decode``)."""
    files, where = {}, {}
    for name in FILES:
        path = folder / name
        where[name] = str(path)
        try:
            files[name] = path.read_bytes()
        except FileNotFoundError:
            raise DataError(f"{path}: missing; run `fastgraph data download` to fetch CIFAR-10") from None
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror}); re-download it") from None
    return decode(files, where, checksums)


def read_archive(path: Path, checksums: Mapping[str, str] | None = None) -> Arrays:
    """Decode ``cifar-10-python.tar.gz`` without extracting it. Raises DataError."""
    files, where = {}, {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                name = PurePosixPath(member.name).name
                if member.isfile() and name in FILES:
                    files[name] = tar.extractfile(member).read()
                    where[name] = f"{path}:{member.name}"
    except ARCHIVE_ERRORS as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"{path}: truncated or corrupt archive ({reason}); re-download it with "
                        "`fastgraph data download`") from None
    missing = [n for n in FILES if n not in files]
    if missing:
        raise DataError(f"{path}: archive lacks {', '.join(missing)}; re-download it with "
                        "`fastgraph data download`")
    return decode(files, where, checksums)


def is_pickled_member(name: str) -> bool:
    """Whether an archive member path belongs to the python-format release."""
    p = PurePosixPath(name)
    return p.name in FILES or p.parent.name == FOLDER
