"""A dataset's files on disk: where they live, getting them there once, and checking them.

Files on disk follow torchvision's layouts under one data root (`default_data_root()`):

    ROOT/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
    ROOT/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    ROOT/celeba/img_align_celeba/*.jpg + list_eval_partition.txt and the other list files

Several processes may load one dataset at once (a node's Ray trials): whatever writes into a dataset's
folder (unpacking MNIST's .gz files, torchvision's downloads, CelebA's decoded cache) runs under one
inter-process file lock per dataset, ROOT/.stawm-<dataset>.lock (see `dataset_lock`), so each node
downloads and unpacks once; a folder that already holds every file is read without taking the lock.
`ensure_files` is that logic; the readers that turn the files into tensors are in `data`.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import os
import shutil
import socket
import struct
import sys
from pathlib import Path
from typing import Callable, Iterator, Sequence

import filelock  # a dependency of torch

# The files each dataset needs, relative to its folder under the data root.
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")
CELEBA_FILES = ("list_attr_celeba.txt", "identity_CelebA.txt", "list_bbox_celeba.txt",
                "list_landmarks_align_celeba.txt", "list_eval_partition.txt")
CELEBA_IMAGE_FOLDER = "img_align_celeba"
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
def dataset_lock(dataset: str, root: Path, folder: Path) -> Iterator[None]:
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


def ensure_files(dataset: str, root: Path, folder: Path, find_missing: Callable[[], list[str]], how: str,
                  download: bool, try_download: Callable[[Path], object], *,
                  unpackable: Callable[[], bool] | None = None, unpack: Callable[[], None] | None = None,
                  reuse: Sequence[str] = (), staged: bool = True, locked: bool = False) -> None:
    """Return if nothing is missing; otherwise unpack and try torchvision's download once, then raise MissingDataError.

    A folder holding every file returns at once, without the lock. Otherwise, when there is something to
    write (download=True, or unpackable() says so), it is done under the dataset's lock (`dataset_lock`;
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
        with contextlib.nullcontext() if locked else dataset_lock(dataset, root, folder):
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


def missing_in(folder: Path, names: Sequence[str]) -> list[str]:
    return [name for name in names if not (folder / name).exists()]


# --------------------------------------------------------------------------------------------------
# MNIST's IDX files: unpacked from their .gz once, checked before torchvision reads them
# --------------------------------------------------------------------------------------------------

def packed_only_idx_files(raw_folder: Path) -> list[str]:
    """The MNIST files X of which only X.gz is in raw_folder."""
    return [name for name in MNIST_FILES if (raw_folder / f"{name}.gz").exists() and not (raw_folder / name).exists()]


def gunzip_missing_idx_files(raw_folder: Path) -> None:
    """Unpack X.gz next to itself where X is absent (like `gunzip -k`): torchvision reads the unpacked files only.

    Writes into the dataset folder: call it under the dataset's lock (`ensure_files` does).
    """
    for name in packed_only_idx_files(raw_folder):
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


def check_mnist_idx_files(raw_folder: Path) -> None:
    """Check each MNIST IDX file's header against its size, and that each images file has one label per image."""
    for images, labels in (MNIST_FILES[:2], MNIST_FILES[2:]):
        counts = [_check_idx_file(raw_folder / name) for name in (images, labels)]
        if counts[0] != counts[1]:
            raise CorruptDataError(f"mnist: {raw_folder / images} holds {counts[0]} images but {raw_folder / labels} "
                                   f"{counts[1]} labels; put back the original pair")
