"""Datasets: the formats users download, and a deterministic synthetic default.

Readers (each returns a numpy array of images or flat rows):

* Larochelle's binarized MNIST ``.amat`` text files (rows of 784 zeros and ones);
* ``.npz`` (key ``x``, or keys ``train``/``valid``, or a single array) and ``.npy`` arrays;
* MNIST idx files, gzipped or raw;
* CIFAR-10 python batches (read with an unpickler that admits only numpy arrays and builtins).

:func:`load` accepts a file or a directory (train/valid files of one of these formats) and returns a
:class:`Dataset` of raw images ``(n, C, H, W)`` with a validation split and a *kind* (``binary``,
``8bit`` or ``real``) that picks the default likelihood. :func:`synthetic` generates the built-in
default: images of simple shapes placed on a coarse grid, so the data has discrete structure.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

SYNTHETIC = ("synthetic", "synthetic-rgb")


@dataclass(frozen=True)
class Dataset:
    """Raw images ``(n, C, H, W)`` for training and validation, and what kind of values they hold."""

    name: str
    train: Tensor
    valid: Tensor
    kind: str

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.shape[1:])  # type: ignore[return-value]


# -- readers -----------------------------------------------------------------------------------


@contextmanager
def _readable(path: Path, what: str) -> Iterator[None]:
    """Turn any failure to parse ``path`` into a ``ValueError`` that names the file."""
    try:
        yield
    except ValueError as err:
        if str(path) in str(err):
            raise
        raise ValueError(f"{path}: not {what} ({err})") from err
    except (OSError, EOFError, struct.error, zipfile.BadZipFile, pickle.UnpicklingError) as err:
        raise ValueError(f"{path}: not {what} ({type(err).__name__}: {err})") from err


def _open(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_amat(path: str | Path) -> np.ndarray:
    """Rows of whitespace-separated numbers, as in Larochelle's ``binarized_mnist_*.amat``."""
    path = _existing(path)
    with _readable(path, "an .amat text file"):
        rows = np.loadtxt(path, dtype=np.float32, ndmin=2)
    if rows.size == 0:
        raise ValueError(f"{path}: the .amat file holds no rows")
    return rows.astype(np.uint8) if np.all((rows == 0) | (rows == 1)) else rows


def read_idx(path: str | Path) -> np.ndarray:
    """An idx file (MNIST), gzipped or raw: big-endian header, then the array."""
    path = _existing(path)
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    with _readable(path, "an idx file"), _open(path) as f:
        header = f.read(4)
        if len(header) != 4 or header[:2] != b"\x00\x00" or header[2] not in dtypes:
            raise ValueError(f"{path}: not an idx file (bad magic number)")
        ndim = header[3]
        shape = struct.unpack(f">{ndim}I", f.read(4 * ndim))
        data = np.frombuffer(f.read(), dtype=dtypes[header[2]])
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: idx header promises shape {shape} but holds {data.size} values")
    return data.reshape(shape).astype(data.dtype.newbyteorder("="))


class _ArrayUnpickler(pickle.Unpickler):
    """Admits numpy array reconstruction and builtins; refuses any other global."""

    allowed = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("builtins", "bytes"),
    }

    def find_class(self, module: str, name: str):  # type: ignore[override]
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data batch")
        return super().find_class(module, name)


def read_cifar_batch(path: str | Path) -> np.ndarray:
    """A CIFAR-10 python batch: a pickled dict whose ``data`` is ``(n, 3072)`` uint8, channel-first."""
    path = _existing(path)
    with _readable(path, "a CIFAR-10 python batch"), _open(path) as f:
        batch = _ArrayUnpickler(f, encoding="bytes").load()
    data = batch.get(b"data", batch.get("data")) if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{path}: a CIFAR-10 batch needs a 'data' array of shape (n, 3072)")
    return data.reshape(-1, 3, 32, 32)


def read_array(path: str | Path) -> np.ndarray | dict[str, np.ndarray]:
    """``.npy`` gives its array; ``.npz`` gives its arrays by key (pickled objects refused)."""
    path = _existing(path)
    try:
        with _readable(path, "a numpy .npy/.npz file"):
            loaded = np.load(path, allow_pickle=False)
            if isinstance(loaded, np.ndarray):
                return loaded
            with loaded as archive:
                return {key: archive[key] for key in archive.files}
    except ValueError as err:
        if "allow_pickle" not in str(err):
            raise
        raise ValueError(
            f"{path}: holds pickled Python objects, which probvq never loads (unpickling can run "
            "code); save plain numeric arrays"
        ) from None


# -- shaping and checking ------------------------------------------------------------------------


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data: no such file or directory: {path}")
    return path


def to_images(array: np.ndarray, name: str) -> Tensor:
    """Rows or images to a ``(n, C, H, W)`` tensor of square images; ``name`` labels errors."""
    a = np.asarray(array)
    if a.size == 0 or a.shape[0] == 0:
        raise ValueError(f"{name}: the data is empty")
    if a.ndim == 2:
        side = round(np.sqrt(a.shape[1]))
        if a.shape[1] == 3072:
            a = a.reshape(-1, 3, 32, 32)
        elif side * side == a.shape[1]:
            a = a.reshape(-1, 1, side, side)
        else:
            raise ValueError(f"{name}: rows of {a.shape[1]} values are not square images")
    elif a.ndim == 3:
        a = a[:, None]
    elif a.ndim == 4 and a.shape[1] not in (1, 3) and a.shape[3] in (1, 3):
        a = a.transpose(0, 3, 1, 2)
    if a.ndim != 4 or a.shape[1] not in (1, 3) or a.shape[2] != a.shape[3]:
        raise ValueError(
            f"{name}: expected square images (n, C, H, H) with C in (1, 3), flat rows, or (n, H, H); "
            f"got shape {tuple(np.shape(array))}"
        )
    if a.dtype.kind not in "uif" and a.dtype != np.bool_:
        raise ValueError(f"{name}: expected numeric pixel values, got dtype {a.dtype}")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ValueError(f"{name}: the data contains NaN or infinite values")
    return torch.from_numpy(np.ascontiguousarray(a))


KINDS = ("binary", "8bit", "real")


def data_kind(x: Tensor) -> str:
    """``binary`` (only 0/1), ``8bit`` (integers 0..255) or ``real``."""
    if ((x == 0) | (x == 1)).all():
        return "binary"
    integral = not x.is_floating_point() or bool((x == x.round()).all())
    if integral and float(x.min()) >= 0 and float(x.max()) <= 255:
        return "8bit"
    return "real"


def _as_kind(x: Tensor, kind: str) -> Tensor:
    """Store binary and 8-bit data as uint8 (a lossless cast for these kinds), real data as float."""
    return x.to(torch.uint8) if kind in ("binary", "8bit") else x.float()


def make_dataset(
    name: str, train: np.ndarray, valid: np.ndarray | None, holdout: int | None = None
) -> Dataset:
    """Shape, check and split raw arrays; without ``valid`` the last ``holdout`` examples of
    ``train`` (default: the last tenth) are held out.

    The kind is the most general of the two splits' kinds, decided on every value.
    """
    train_t = to_images(train, f"{name} (train)")
    if valid is None:
        n = train_t.shape[0]
        held = max(1, n // 10) if holdout is None else holdout
        if not 1 <= held < n:
            raise ValueError(
                f"holdout: {name} holds {n} examples; expected 1 to {n - 1} to hold out, got {held}"
            )
        train_t, valid_t = train_t[: n - held], train_t[n - held :]
    else:
        if holdout is not None:
            raise ValueError(f"holdout: {name} has its own validation split; leave --holdout unset")
        valid_t = to_images(valid, f"{name} (valid)")
        if valid_t.shape[1:] != train_t.shape[1:]:
            raise ValueError(
                f"{name}: train images {tuple(train_t.shape[1:])} and valid images "
                f"{tuple(valid_t.shape[1:])} differ in shape"
            )
    kind = max(data_kind(train_t), data_kind(valid_t), key=KINDS.index)
    return Dataset(name, _as_kind(train_t, kind), _as_kind(valid_t, kind), kind)


# -- files and directories -----------------------------------------------------------------------


def _read_file(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    suffixes = "".join(path.suffixes)
    if path.suffix == ".amat":
        return read_amat(path), None
    if path.suffix in (".npy", ".npz"):
        arrays = read_array(path)
        if isinstance(arrays, np.ndarray):
            return arrays, None
        if "train" in arrays:
            return arrays["train"], arrays.get("valid")
        if "x" in arrays:
            return arrays["x"], None
        if len(arrays) == 1:
            return next(iter(arrays.values())), None
        raise ValueError(f"{path}: expected key 'x' or keys 'train'/'valid', found {sorted(arrays)}")
    if "idx" in suffixes or "-ubyte" in path.name:
        return read_idx(path), None
    if path.name.startswith(("data_batch", "test_batch")):
        return read_cifar_batch(path), None
    raise ValueError(
        f"data: unrecognised file {path} (expected .amat, .npz, .npy, MNIST idx or a CIFAR-10 batch)"
    )


def _find(directory: Path, *patterns: str) -> list[Path]:
    return sorted(p for pattern in patterns for p in directory.glob(pattern))


def _read_directory(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    npz_train, npz_valid = _find(path, "train.np[zy]"), _find(path, "valid.np[zy]")
    amat_train, amat_valid = _find(path, "*train*.amat"), _find(path, "*valid*.amat")
    idx_train = _find(path, "train-images*ubyte*")
    idx_test = _find(path, "t10k-images*ubyte*")
    cifar_train, cifar_test = _find(path, "data_batch_*"), _find(path, "test_batch*")
    if npz_train:
        return _read_file(npz_train[0])[0], _read_file(npz_valid[0])[0] if npz_valid else None
    if amat_train:
        return read_amat(amat_train[0]), read_amat(amat_valid[0]) if amat_valid else None
    if idx_train or idx_test:
        if idx_train:
            return read_idx(idx_train[0]), read_idx(idx_test[0]) if idx_test else None
        return read_idx(idx_test[0]), None
    if cifar_train:
        train = np.concatenate([read_cifar_batch(p) for p in cifar_train])
        return train, read_cifar_batch(cifar_test[0]) if cifar_test else None
    raise ValueError(
        f"data: {path} holds no train.npz/.npy, *train*.amat, MNIST idx images or CIFAR-10 batches"
    )


def load(path: str | Path, holdout: int | None = None) -> Dataset:
    """Load a dataset from a file or a directory (see the module docstring for the formats).

    Data without a validation split keeps its last ``holdout`` examples (default: a tenth) apart.
    """
    path = _existing(path)
    train, valid = _read_directory(path) if path.is_dir() else _read_file(path)
    return make_dataset(path.name, train, valid, holdout)


# -- the synthetic default -----------------------------------------------------------------------


def _shape_library(size: int) -> list[np.ndarray]:
    r = np.arange(size) - (size - 1) / 2
    yy, xx = np.meshgrid(r, r, indexing="ij")
    radius = np.hypot(yy, xx)
    half = size / 2
    edge = (np.abs(yy) > half - 2) | (np.abs(xx) > half - 2)
    return [
        np.ones((size, size), bool),
        edge,
        radius <= half,
        (radius <= half) & (radius > half - 2),
        np.abs(yy) < 1.5,
        np.abs(xx) < 1.5,
        (np.abs(yy) < 1.5) | (np.abs(xx) < 1.5),
        np.abs(yy - xx) < 1.5,
    ]


def synthetic(
    name: str = "synthetic", n_train: int = 6000, n_valid: int = 1000, seed: int = 0
) -> Dataset:
    """Deterministic images of 1 to 3 shapes (8 kinds, 2 sizes) on a 4 x 4 grid of anchors.

    ``synthetic``: binary 28 x 28 x 1. ``synthetic-rgb``: 8-bit 32 x 32 x 3 on a grey background,
    each shape in one of 6 colours. The same ``seed`` always gives the same arrays.
    """
    if name not in SYNTHETIC:
        raise ValueError(f"dataset: expected one of {SYNTHETIC}, got {name!r}")
    if n_train < 1 or n_valid < 1:
        raise ValueError("n_train, n_valid: the synthetic dataset needs at least one example each")
    rgb = name == "synthetic-rgb"
    side = 32 if rgb else 28
    rng = np.random.default_rng(seed)
    shapes = _shape_library(8) + _shape_library(12)
    palette = np.array([[230, 40, 40], [40, 200, 60], [50, 80, 230], [240, 220, 40],
                        [200, 60, 220], [40, 210, 220]], dtype=np.uint8)  # fmt: skip
    n = n_train + n_valid
    images = np.zeros((n, 3 if rgb else 1, side, side), np.uint8)
    if rgb:
        images[:] = 128
    step = (side - 12) // 3
    for i in range(n):
        for _ in range(rng.integers(1, 4)):
            mask = shapes[rng.integers(len(shapes))]
            top = step * rng.integers(4) + rng.integers(0, 12 - mask.shape[0] + 1)
            left = step * rng.integers(4) + rng.integers(0, 12 - mask.shape[1] + 1)
            window = images[i, :, top : top + mask.shape[0], left : left + mask.shape[1]]
            colour = palette[rng.integers(len(palette))] if rgb else np.array([1], np.uint8)
            window[:, mask] = colour[:, None]
    return Dataset(name, torch.from_numpy(images[:n_train]), torch.from_numpy(images[n_train:]),
                   "8bit" if rgb else "binary")  # fmt: skip
