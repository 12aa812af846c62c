import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from probvq.data import load, read_cifar_batch, read_idx, synthetic, to_images


def binary_rows(n, seed=0):
    return np.random.default_rng(seed).integers(0, 2, (n, 784)).astype(np.uint8)


def write_idx(path, array, compress):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_amat_directory_gives_binary_train_and_valid(tmp_path):
    np.savetxt(tmp_path / "binarized_mnist_train.amat", binary_rows(30), fmt="%d")
    np.savetxt(tmp_path / "binarized_mnist_valid.amat", binary_rows(10, 1), fmt="%d")
    data = load(tmp_path)
    assert data.kind == "binary"
    assert data.train.shape == (30, 1, 28, 28) and data.valid.shape == (10, 1, 28, 28)
    assert torch.equal(data.train.reshape(30, -1), torch.from_numpy(binary_rows(30)))


def test_npz_directory_like_the_shared_binarized_mnist(tmp_path):
    np.savez_compressed(tmp_path / "train.npz", x=binary_rows(20))
    np.savez_compressed(tmp_path / "valid.npz", x=binary_rows(5))
    data = load(tmp_path)
    assert (data.train.shape[0], data.valid.shape[0], data.kind) == (20, 5, "binary")


def test_single_arrays_hold_out_the_last_tenth(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3)).astype(np.uint8)
    np.save(tmp_path / "images.npy", images)
    data = load(tmp_path / "images.npy")
    assert data.kind == "8bit" and data.image_shape == (3, 32, 32)
    assert data.train.shape[0] == 36 and data.valid.shape[0] == 4
    assert torch.equal(data.valid[0], torch.from_numpy(images[36]).permute(2, 0, 1))
    np.savez(tmp_path / "split.npz", train=images[:30], valid=images[30:])
    assert load(tmp_path / "split.npz").valid.shape[0] == 10


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_idx_gzipped_or_raw(tmp_path, compress):
    images = np.random.default_rng(0).integers(0, 256, (12, 28, 28)).astype(np.uint8)
    name = "t10k-images-idx3-ubyte" + (".gz" if compress else "")
    write_idx(tmp_path / name, images, compress)
    np.testing.assert_array_equal(read_idx(tmp_path / name), images)
    data = load(tmp_path)
    assert data.kind == "8bit" and data.train.shape == (11, 1, 28, 28)


def test_corrupt_idx_is_refused(tmp_path):
    (tmp_path / "bad-idx3-ubyte").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad-idx3-ubyte")
    truncated = struct.pack(">HBB", 0, 8, 2) + struct.pack(">2I", 10, 10) + bytes(5)
    (tmp_path / "short-idx3-ubyte").write_bytes(truncated)
    with pytest.raises(ValueError, match="promises"):
        read_idx(tmp_path / "short-idx3-ubyte")


def test_cifar_batches(tmp_path):
    rng = np.random.default_rng(0)
    for name, n in [("data_batch_1", 6), ("data_batch_2", 4), ("test_batch", 3)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), b"labels": [0] * n}
        (tmp_path / name).write_bytes(pickle.dumps(batch))
    data = load(tmp_path)
    assert data.train.shape == (10, 3, 32, 32) and data.valid.shape == (3, 3, 32, 32)
    assert data.kind == "8bit"


class Payload:
    def __reduce__(self):
        return (os.system, ("echo owned",))


def test_cifar_reader_refuses_pickled_code(tmp_path):
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": Payload()}))
    with pytest.raises(ValueError, match="refusing"):
        read_cifar_batch(tmp_path / "data_batch_1")


def test_synthetic_is_deterministic_and_structured():
    a, b = synthetic(n_train=50, n_valid=10), synthetic(n_train=50, n_valid=10)
    assert torch.equal(a.train, b.train) and torch.equal(a.valid, b.valid)
    assert not torch.equal(a.train, synthetic(n_train=50, n_valid=10, seed=1).train)
    assert a.kind == "binary" and a.image_shape == (1, 28, 28)
    assert 0.02 < a.train.float().mean() < 0.4
    rgb = synthetic("synthetic-rgb", n_train=20, n_valid=5)
    assert rgb.kind == "8bit" and rgb.image_shape == (3, 32, 32)


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.zeros((0, 784)), "empty"),
        (np.zeros((4, 100, 3)), "square|expected"),
        (np.zeros((4, 30)), "square"),
        (np.full((4, 784), np.nan), "NaN"),
        (np.zeros((4, 5, 28, 28)), "expected"),
    ],
)
def test_bad_arrays_are_refused(array, match):
    with pytest.raises(ValueError, match=match):
        to_images(array, "data")


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load(tmp_path / "nothing.npz")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="unrecognised"):
        load(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="holds no"):
        load(tmp_path)
    np.savez(tmp_path / "many.npz", a=np.zeros(3), b=np.zeros(3))
    with pytest.raises(ValueError, match="expected key"):
        load(tmp_path / "many.npz")


@pytest.mark.skipif(not os.path.isdir("../shared/data/binarized_mnist"), reason="shared data absent")
def test_the_shared_binarized_mnist_loads_as_documented():
    data = load("../shared/data/binarized_mnist")
    assert data.train.shape == (50000, 1, 28, 28) and data.valid.shape == (10000, 1, 28, 28)
    assert data.kind == "binary"
    assert float(data.train.float().mean()) == pytest.approx(0.1306, abs=1e-4)


def test_the_kind_is_decided_on_every_value_of_both_splits(tmp_path):
    train = np.random.default_rng(0).integers(0, 256, (20, 28, 28)).astype(np.float32)
    valid = train[:5].copy()
    valid[-1, -1, -1] = 300.0  # past any prefix a sampled check would read
    np.savez(tmp_path / "d.npz", train=train, valid=valid)
    data = load(tmp_path / "d.npz")
    assert data.kind == "real" and float(data.valid.max()) == 300.0
    binary_train = (train > 128).astype(np.float32)
    binary_valid = binary_train[:5].copy()
    binary_valid[-1, -1, -1] = 0.5
    np.savez(tmp_path / "b.npz", train=binary_train, valid=binary_valid)
    assert load(tmp_path / "b.npz").kind == "real"


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("short-idx3-ubyte", struct.pack(">HBB", 0, 8, 3) + b"\x00\x00"),
        ("t10k-images-idx3-ubyte.gz", b"this is not gzip"),
        ("train.npz", b"PK\x03\x04 truncated zip"),
        ("rows.amat", b"0 1 0\n\xff\xfe\n"),
        ("data_batch_1", b"\x80\x04 not a pickle"),
    ],
)
def test_unreadable_files_raise_a_value_error_naming_them(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=name):
        load(tmp_path / name)


def test_an_npy_file_named_npz_still_loads(tmp_path):
    np.save(tmp_path / "x.npy", binary_rows(10))
    (tmp_path / "x.npy").rename(tmp_path / "x.npz")
    assert load(tmp_path / "x.npz").train.shape == (9, 1, 28, 28)
