"""Issue 3: data sets from the package and from local folders (never downloaded)."""

from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hil.data import DataError, SafeUnpickler, batches, hold_out, load_dataset, read_idx, safe_load


def test_digits_split_is_fixed_and_scaled() -> None:
    a = load_dataset("digits")
    b = load_dataset("digits")
    assert a.x_train.shape == (1437, 64) and a.x_test.shape == (360, 64)
    assert a.x_train.dtype == torch.float32 and a.y_train.dtype == torch.int64
    assert float(a.x_train.min()) == 0.0 and float(a.x_train.max()) == 1.0
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_train, b.y_train)
    # stratified: every class is in the test set 35-37 times
    counts = torch.bincount(a.y_test, minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37
    img = load_dataset("digits", flatten=False)
    assert img.x_train.shape == (1437, 1, 8, 8)


def _write_idx(path: str, arr: np.ndarray, gz: bool = False) -> None:
    code = {np.dtype(np.uint8): 0x08}[arr.dtype]
    head = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", n) for n in arr.shape)
    data = head + arr.tobytes()
    if gz:
        path += ".gz"
        data = gzip.compress(data)
    with open(path, "wb") as fh:
        fh.write(data)


def _mnist_folder(root: str, n_train: int = 12, n_test: int = 5, gz: bool = False) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(0)
    xtr = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    ytr = rng.integers(0, 10, n_train, dtype=np.uint8)
    xte = rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)
    yte = rng.integers(0, 10, n_test, dtype=np.uint8)
    _write_idx(os.path.join(root, "train-images-idx3-ubyte"), xtr, gz)
    _write_idx(os.path.join(root, "train-labels-idx1-ubyte"), ytr, gz)
    _write_idx(os.path.join(root, "t10k-images-idx3-ubyte"), xte, gz)
    _write_idx(os.path.join(root, "t10k-labels-idx1-ubyte"), yte, gz)
    return xtr, ytr, xte, yte


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_files(tmp_path, gz: bool) -> None:
    xtr, _, _, yte = _mnist_folder(str(tmp_path), gz=gz)
    ds = load_dataset("mnist", tmp_path)
    assert ds.x_train.shape == (12, 784) and ds.x_test.shape == (5, 784)
    assert np.allclose(ds.x_train.numpy(), xtr.reshape(12, -1) / 255.0)
    assert np.array_equal(ds.y_test.numpy(), yte.astype(np.int64))
    fm = load_dataset("fashion-mnist", tmp_path, flatten=False)
    assert fm.name == "fashion-mnist" and fm.x_train.shape == (12, 1, 28, 28)


def test_missing_files_are_named(tmp_path) -> None:
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        _mnist_folder(str(tmp_path))
        os.remove(tmp_path / "t10k-labels-idx1-ubyte")
        load_dataset("mnist", tmp_path)
    with pytest.raises(DataError, match="data_batch_1"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(DataError, match=r"data\.root"):
        load_dataset("mnist")
    with pytest.raises(DataError, match="unknown data set"):
        load_dataset("imagenet")


def test_truncated_idx_is_an_error(tmp_path) -> None:
    p = tmp_path / "x"
    _write_idx(str(p), np.zeros((3, 4, 4), np.uint8))
    p.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(DataError, match="IDX header"):
        read_idx(p)


def _write_typed_idx(path, arr: np.ndarray, code: int) -> None:
    head = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", n) for n in arr.shape)
    path.write_bytes(head + arr.tobytes())


@pytest.mark.parametrize(
    ("code", "dtype", "lo", "hi", "named"),
    [(0x0B, ">i2", 0, 1000, "int16"), (0x09, "i1", -128, 127, "int8"), (0x0D, ">f4", 0, 65535, "float32")],
)
def test_idx_images_other_than_bytes_are_refused_naming_the_file(
    tmp_path, code, dtype, lo, hi, named
) -> None:
    """The safety audit: int16 images loaded as x in [0, 3.92], float32 [0, 257] and int8
    [-0.5, 0.49] (a negative clamp is a legal read voltage: trained on silently). Images that
    are not unsigned bytes are refused, naming the file, its type and the fix."""
    from hil.data import IDX_FILES

    rng = np.random.default_rng(0)
    for img, lab in IDX_FILES.values():
        _write_typed_idx(tmp_path / img, rng.integers(lo, hi, (6, 28, 28)).astype(dtype), code)
        _write_typed_idx(tmp_path / lab, rng.integers(0, 10, 6).astype("u1"), 0x08)
    says = rf"train-images-idx3-ubyte holds {named} pixels \(IDX type 0x{code:02x}\).*type 0x08"
    with pytest.raises(DataError, match=says):
        load_dataset("mnist", tmp_path)


@pytest.mark.parametrize("values", [np.full((4, 3072), 300, np.int64), np.full((4, 3072), -1, np.int16)])
def test_cifar_batches_that_are_not_bytes_are_refused_not_wrapped(tmp_path, values) -> None:
    """``np.asarray(data, dtype=np.uint8)`` wrapped 300 to 44 and -1 to 255 without a word."""
    _cifar_folder(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": values, b"labels": [0, 1, 2, 3]}, fh, protocol=2)
    with pytest.raises(DataError, match=rf"data_batch_3: 'data' holds {values.dtype} values.*uint8"):
        load_dataset("cifar10", tmp_path)


def test_images_outside_the_unit_range_are_refused() -> None:
    from hil.data import Dataset, check_unit_range

    x = np.zeros((2, 4), np.float32)
    ok = Dataset.from_arrays("t", x, np.zeros(2, np.int64), x, np.zeros(2, np.int64), (1, 2, 2))
    check_unit_range(ok)
    for bad in (-0.5, 1.5, np.nan):
        xb = x.copy()
        xb[1, 2] = bad
        ds = Dataset.from_arrays("t", x, np.zeros(2, np.int64), xb, np.zeros(2, np.int64), (1, 2, 2))
        with pytest.raises(DataError, match=r"the test images span .* not \[0, 1\]"):
            check_unit_range(ds)


def _cifar_folder(root) -> dict[str, tuple[np.ndarray, list[int]]]:
    rng = np.random.default_rng(1)
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    out = {}
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, 4)]
        # the format of the python batches: a dict with byte-string keys, protocol 2
        with open(folder / name, "wb") as fh:
            pickle.dump({b"batch_label": b"x", b"data": x, b"labels": y}, fh, protocol=2)
        out[name] = (x, y)
    return out


def test_cifar10_python_batches(tmp_path) -> None:
    written = _cifar_folder(tmp_path)
    ds = load_dataset("cifar10", tmp_path, flatten=False)
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
    x, y = written["test_batch"]
    assert np.allclose(ds.x_test.numpy().reshape(4, -1), x / 255.0)
    assert ds.y_test.tolist() == y


class _Evil:
    def __reduce__(self) -> tuple:
        return (os.system, ("echo pwned > /dev/null",))


def test_unpickler_refuses_code(tmp_path) -> None:
    p = tmp_path / "data_batch_1"
    p.write_bytes(pickle.dumps({b"data": _Evil()}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        safe_load(p)
    # plain containers and arrays load
    import io

    blob = pickle.dumps({"a": [1, 2.0, "s"], "b": np.arange(3)}, protocol=4)
    obj = SafeUnpickler(io.BytesIO(blob)).load()
    assert obj["a"] == [1, 2.0, "s"] and obj["b"].tolist() == [0, 1, 2]


def test_batches_cover_the_data_once() -> None:
    x = torch.arange(10).float()[:, None]
    y = torch.arange(10)
    seen = torch.cat([b for _, b in batches(x, y, 3, generator=torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == list(range(10))
    assert [len(b) for _, b in batches(x, y, 3, shuffle=False, drop_last=True)] == [3, 3, 3]


@settings(max_examples=25, deadline=None)
@given(n=st.integers(min_value=-3, max_value=1440))
def test_hold_out_splits_the_training_images_by_class(n: int) -> None:
    """Any count: either an error naming data.validation and the range it takes, or a split
    whose two sides partition the training images (nothing lost, nothing twice, order kept),
    every class on each side in proportion (within one image of it), the same split on every
    call, the test images untouched."""
    ds = load_dataset("digits")
    if n == 0:
        assert hold_out(ds, 0) is ds
        return
    if not 10 <= n <= len(ds.y_train) - 10:
        with pytest.raises(DataError, match=rf"^data\.validation = {n}: .* holds out 10 to 1427 of them"):
            hold_out(ds, n)
        return
    a, b = hold_out(ds, n), hold_out(ds, n)
    assert torch.equal(a.x_val, b.x_val) and torch.equal(a.y_train, b.y_train)
    assert len(a.y_val) == n and len(a.y_train) == len(ds.y_train) - n
    assert a.x_test is ds.x_test and len(ds.y_train) == 1437 and ds.x_val is None
    rows = {tuple(r.tolist()): i for i, r in enumerate(ds.x_train)}
    kept = [rows[tuple(r.tolist())] for r in a.x_train]
    held = [rows[tuple(r.tolist())] for r in a.x_val]
    assert kept == sorted(kept) and held == sorted(held)
    assert sorted(kept + held) == list(range(len(ds.y_train)))
    share = torch.bincount(ds.y_train, minlength=10).double() * n / len(ds.y_train)
    assert torch.all((torch.bincount(a.y_val, minlength=10) - share).abs() <= 1.0)
    assert f"{len(a.y_train)} train / {n} validation / 360 test" in a.describe()


def test_digits_read_without_scikit_learn_match_its_own_loader_and_split(monkeypatch) -> None:
    """`load_digits` reads scikit-learn's file and draws its stratified split itself (no
    scikit-learn import): the same arrays as scikit-learn's loader and `train_test_split`."""
    from sklearn.model_selection import train_test_split

    import hil.data as data

    assert data._digits_file() is not None
    ours = data.load_digits()
    monkeypatch.setattr(data, "_digits_file", lambda: None)
    theirs = data.load_digits()
    for a, b in ((ours.x_train, theirs.x_train), (ours.x_test, theirs.x_test)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for a, b in ((ours.y_train, theirs.y_train), (ours.y_test, theirs.y_test)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert ours.x_train.dtype == theirs.x_train.dtype and ours.y_train.dtype == theirs.y_train.dtype
    rng = np.random.default_rng(0)
    for n, classes, n_test, seed in ((200, 3, 30, 1), (501, 7, 100, 5), (97, 2, 13, 0)):
        y = rng.integers(0, classes, n)
        train, test = data.stratified_split(y, n_test, seed)
        want = train_test_split(np.arange(n), test_size=n_test, random_state=seed, stratify=y)
        np.testing.assert_array_equal(train, want[0])
        np.testing.assert_array_equal(test, want[1])
