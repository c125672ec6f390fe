"""`drivers`, `calibration` and `hil.runlog` load their names on first use: importing `drivers`
or `calibration`, or their plain modules (`drivers.capabilities`, `drivers.errors`,
`calibration.routines`), imports neither numpy nor torch nor zarr, and importing `hil.runlog`
imports neither its writer nor torch (tests/test_cli_lazy_imports.py runs its readers); every
name of `__all__` still resolves, to the object of the module the package says it comes from,
and the imports its type checkers read name the same modules and names."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import calibration
import drivers
import hil.runlog

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("package", [drivers, calibration, hil.runlog], ids=lambda p: p.__name__)
def test_every_name_resolves_to_its_home(package: ModuleType) -> None:
    homes = package._HOMES
    listed = [name for names in homes.values() for name in names]
    assert sorted(listed) == sorted(package.__all__)
    assert len(set(listed)) == len(listed)  # a name has one home
    for module, names in homes.items():
        for name in names:
            assert getattr(package, name) is getattr(importlib.import_module(module), name)
    assert set(package.__all__) <= set(dir(package))
    with pytest.raises(AttributeError, match="no_such_name"):
        package.no_such_name  # noqa: B018
    with pytest.raises(ImportError):
        exec(f"from {package.__name__} import no_such_name", {})


@pytest.mark.parametrize("package", [drivers, calibration, hil.runlog], ids=lambda p: p.__name__)
def test_type_checking_imports_match_the_homes(package: ModuleType) -> None:
    """The `if TYPE_CHECKING:` imports of the package's __init__ (what type checkers, editors and
    lint-imports read) import each name from the module `_HOMES` gives it."""
    assert package.__file__ is not None
    tree = ast.parse(Path(package.__file__).read_text())
    block = next(
        node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
    )
    imported: dict[str, set[str]] = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom) and node.module is not None
        imported.setdefault(node.module, set()).update(alias.name for alias in node.names)
    assert imported == {module: set(names) for module, names in package._HOMES.items()}


def _printed(code: str) -> str:
    """What `code` prints, run in a fresh interpreter (a module loaded by an earlier test of this
    process would be in sys.modules already)."""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    return done.stdout.strip()


def test_light_modules_import_no_numerics() -> None:
    code = (
        "import sys, drivers, drivers.capabilities, drivers.errors, calibration, calibration.routines\n"
        "print(','.join(m for m in ('numpy', 'torch', 'zarr') if m in sys.modules))"
    )
    assert _printed(code) == ""


def test_device_layer_imports_no_torch() -> None:
    """The Device interface, its topology and numerics (what a remote backend and `hil info`
    load), and a Topology built with a curve, import numpy, not torch: the curves' names
    (drivers.activation) are torch-free, their torch code (drivers.activation_curves) is
    imported at the first curve computed, and a tensor can only be passed once torch is loaded."""
    code = (
        "import sys, drivers.base, drivers.topology, drivers.numerics, drivers.checks, drivers.uri\n"
        "from drivers.topology import Topology\n"
        "Topology.layered([4, 3], activation='soft_sigmoid:0.05')\n"
        "print(','.join(m for m in ('torch', 'drivers.activation_curves') if m in sys.modules))"
    )
    assert _printed(code) == ""


def test_curve_names_resolve_to_the_curves() -> None:
    """drivers.activation still gives the curves' functions (`rho_inplace`, which
    emulator.settle_script imports and TorchScript compiles, and the private ones) from
    drivers.activation_curves, and `Activation`'s methods compute with them."""
    import torch

    import drivers.activation as names
    import drivers.activation_curves as curves
    from emulator import settle_script

    assert names.rho_inplace is curves.rho_inplace is settle_script.rho_inplace
    assert names._soft_rho_ is curves._soft_rho_
    with pytest.raises(AttributeError, match="no_such_curve"):
        names.no_such_curve  # noqa: B018
    assert settle_script.loop() is not None  # TorchScript compiled the loop with the curve
    u = torch.linspace(-1.0, 2.0, 7)
    for spec in ("hard_sigmoid", "logistic", "soft_sigmoid:0.05"):
        act = names.Activation.parse(spec)
        assert torch.equal(act.rho(u, 1.5), curves.rho(act, u, 1.5))
        assert torch.equal(act.rho_(u.clone(), 1.5), curves.rho_inplace(u.clone(), act.kind, 1.5, act.width))


def test_run_log_readers_import_no_torch() -> None:
    """The run log's package and its reading modules (`hil inspect`, `hil plot`) import zarr and
    numpy, not torch nor the writer."""
    code = (
        "import sys, hil.runlog, hil.runlog.reader, hil.runlog.summary, hil.runlog.meta, hil.runlog.state\n"
        "print(','.join(m for m in ('torch', 'hil.runlog.writer', 'drivers.base') if m in sys.modules))"
    )
    assert _printed(code) == ""
