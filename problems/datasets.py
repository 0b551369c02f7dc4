"""Small image-classification data sets, read from local files only (never downloaded).

* :func:`load_digits` -- scikit-learn's bundled 8x8 digits (1797 images, 10 classes),
  standardised with the training split's statistics, a fixed 80/20 split.
* :func:`load_fashion_mnist` -- Fashion-MNIST from its four IDX files (``.gz`` or plain),
  with strict header validation: a wrong magic number, dimension count, size or a length
  that does not match the header raises ``ValueError`` naming the file.

Both return a :class:`Split` of torch tensors: inputs ``float32``, labels ``int64``.

>>> data = load_digits()
>>> data.train_inputs.shape, data.test_inputs.shape, data.n_classes
(torch.Size([1437, 64]), torch.Size([360, 64]), 10)
"""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["Split", "load_digits", "load_fashion_mnist", "read_idx", "FASHION_MNIST_PATH"]

#: Where :func:`load_fashion_mnist` looks by default.
FASHION_MNIST_PATH = "/usr/share/datasets/fashion-mnist"
_FASHION_FILES = {
    "train_inputs": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_inputs": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


class Split(NamedTuple):
    """A fixed train/test split."""

    train_inputs: torch.Tensor
    train_labels: torch.Tensor
    test_inputs: torch.Tensor
    test_labels: torch.Tensor
    n_classes: int


def load_digits(*, test_fraction: float = 0.2, seed: int = 0) -> Split:
    """scikit-learn's bundled digits: inputs ``(n, 64)`` standardised per pixel with the
    training split's mean and standard deviation (constant pixels: std 1), labels 0-9.

    The split is a fixed permutation (``seed``) with ``test_fraction`` of the images held
    out: 1437 training and 360 test images by default.
    """
    try:
        from sklearn.datasets import load_digits as _sk_digits
    except ImportError as err:  # scikit-learn is in the "bench" and "dev" extras
        raise ImportError(
            f"load_digits needs scikit-learn ({err}); install it with "
            'pip install "enkal[bench]"'
        ) from err
    if not (0 < test_fraction < 1):
        raise ValueError(f"test_fraction: expected a float in (0, 1), got {test_fraction}")
    raw = _sk_digits()
    x = torch.as_tensor(raw.data, dtype=torch.float64)
    y = torch.as_tensor(raw.target, dtype=torch.int64)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    n_test = math.ceil(test_fraction * x.shape[0])  # as sklearn's train_test_split
    test, train = perm[:n_test], perm[n_test:]
    mean = x[train].mean(dim=0)
    std = x[train].std(dim=0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    xs = ((x - mean) / std).to(torch.float32)
    return Split(xs[train], y[train], xs[test], y[test], 10)


def _open(path: Path):
    with open(path, "rb") as fh:
        head = fh.read(2)
    return gzip.open(path, "rb") if head == b"\x1f\x8b" else open(path, "rb")


def read_idx(path: str | os.PathLike, *, expected_dims: int | None = None) -> np.ndarray:
    """Read one IDX file of unsigned bytes (``.gz`` or plain) into a ``uint8`` array.

    The header is validated strictly: two zero bytes, type code ``0x08`` (unsigned byte),
    the number of dimensions (``expected_dims`` if given), positive sizes, and a payload of
    exactly ``prod(sizes)`` bytes. Any mismatch raises ``ValueError`` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such IDX file")
    try:
        with _open(path) as fh:
            data = fh.read()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise ValueError(f"{path}: cannot read as an IDX(.gz) file: {err}") from None
    if len(data) < 4:
        raise ValueError(f"{path}: IDX header truncated ({len(data)} bytes)")
    if data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (magic starts {data[:2].hex()}, "
                         "expected 0000)")
    if data[2] != 0x08:
        raise ValueError(f"{path}: expected IDX type 0x08 (unsigned byte), got "
                         f"0x{data[2]:02x}")
    ndim = data[3]
    if ndim == 0 or (expected_dims is not None and ndim != expected_dims):
        want = expected_dims if expected_dims is not None else ">= 1"
        raise ValueError(f"{path}: expected {want} dimensions in the IDX header, got {ndim}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: IDX header truncated ({len(data)} bytes, {ndim} dims)")
    sizes = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if any(s <= 0 for s in sizes):
        raise ValueError(f"{path}: expected positive sizes in the IDX header, got {sizes}")
    count = int(np.prod(sizes))
    if len(data) - header != count:
        raise ValueError(
            f"{path}: the header declares {sizes} = {count} bytes of data, the file has "
            f"{len(data) - header}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(sizes)


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"{root}: Fashion-MNIST file {stem}(.gz) not found; expected the four IDX files "
        f"{sorted(_FASHION_FILES.values())} (enkal never downloads data)"
    )


def load_fashion_mnist(path: str | os.PathLike = FASHION_MNIST_PATH, *,
                       standardize: bool = True) -> Split:
    """Fashion-MNIST from the four IDX files in ``path``: inputs ``(n, 1, 28, 28)`` float32,
    labels int64, 60000 training and 10000 test images.

    With ``standardize`` pixels are scaled to ``[0, 1]`` and then standardised with the
    training set's mean and standard deviation (one scalar each); otherwise only scaled.
    Raises ``FileNotFoundError`` when a file is missing and ``ValueError`` for a malformed
    one (naming it), or when images and labels disagree.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"path: {root} is not a directory with the Fashion-MNIST "
                                "IDX files (enkal never downloads data)")
    arrays = {}
    for key, stem in _FASHION_FILES.items():
        f = _find(root, stem)
        arr = read_idx(f, expected_dims=3 if key.endswith("inputs") else 1)
        if key.endswith("inputs") and arr.shape[1:] != (28, 28):
            raise ValueError(f"{f}: expected 28x28 images, got {arr.shape[1:]}")
        if key.endswith("labels") and int(arr.max()) > 9:
            raise ValueError(f"{f}: expected labels 0-9, got a maximum of {int(arr.max())}")
        arrays[key] = (f, arr)
    for split in ("train", "test"):
        (fi, xi), (fl, yl) = arrays[f"{split}_inputs"], arrays[f"{split}_labels"]
        if xi.shape[0] != yl.shape[0]:
            raise ValueError(f"{fi} has {xi.shape[0]} images but {fl} has {yl.shape[0]} "
                             "labels")
    x_train = torch.from_numpy(arrays["train_inputs"][1].astype(np.float32) / 255.0)
    x_test = torch.from_numpy(arrays["test_inputs"][1].astype(np.float32) / 255.0)
    if standardize:
        mean, std = x_train.mean(), x_train.std()
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    y_train = torch.from_numpy(arrays["train_labels"][1].astype(np.int64))
    y_test = torch.from_numpy(arrays["test_labels"][1].astype(np.int64))
    return Split(x_train[:, None], y_train, x_test[:, None], y_test, 10)
