"""Physical bounds of the device and periphery parameters (`DeviceModel.bounds`,
`PeripheryModel.bounds`): every value inside a bound builds a model, every value outside it
(just outside included, NaN and infinities too) is refused with an error naming the parameter;
every shipped preset and the URIs the audit found accepted."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers import open_device
from drivers.errors import ConfigurationError
from drivers.topology import Topology
from emulator.array import TileArray
from emulator.devices import Bound, DeviceModel
from emulator.periphery import MAX_READ_V, PeripheryModel
from emulator.presets import PRESETS

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DEVICES = {name: preset.device for name, preset in PRESETS.items()}
PERIPHERIES = {name: preset.periphery for name, preset in PRESETS.items()}
DEVICE_CASES = [(p, b.name) for p, m in DEVICES.items() for b in m.bounds()]
PERIPHERY_CASES = [(p, b.name) for p, m in PERIPHERIES.items() for b in m.bounds()]


def _bound(model: DeviceModel | PeripheryModel, name: str) -> Bound:
    return next(b for b in model.bounds() if b.name == name)


def _inside(b: Bound) -> st.SearchStrategy[float]:
    """Values in the bound, its closed ends and the floats next to its open ones included."""
    lo = math.nextafter(b.lo, math.inf) if b.lo_open else b.lo
    hi = math.nextafter(b.hi, -math.inf) if b.hi_open else b.hi
    return st.one_of(st.floats(lo, hi), st.sampled_from([lo, hi]))


def _outside(b: Bound) -> st.SearchStrategy[float]:
    """Values outside the bound: the open ends themselves, the floats just past the closed
    ones, anything further, NaN and the infinities."""
    below = b.lo if b.lo_open else math.nextafter(b.lo, -math.inf)
    above = b.hi if b.hi_open else math.nextafter(b.hi, math.inf)
    return st.one_of(
        st.sampled_from([below, above, math.nan, math.inf, -math.inf]),
        st.floats(max_value=below, allow_nan=False),
        st.floats(min_value=above, allow_nan=False),
    )


def _device(base: DeviceModel, name: str, value: float) -> DeviceModel:
    """`base` with `name` set to `value`. A new g_max takes the step and the noises down to
    what its window allows, so that only g_max's own bound is under test."""
    if name != "g_max" or not base.g_min < value <= 1.0:
        return dataclasses.replace(base, **{name: value})
    fit = {k: min(getattr(base, k), value) for k in ("write_noise", "reset_noise", "read_noise")}
    return dataclasses.replace(base, g_max=value, dw_min=min(base.dw_min, value - base.g_min), **fit)


def _periphery(base: PeripheryModel, name: str, value: float) -> PeripheryModel:
    """`base` with `name` set; a new v_read comes with the largest read limit, so that only
    v_read's own bound is under test (v_read_max's lower bound is v_read's states)."""
    if name == "v_read":
        return dataclasses.replace(base, v_read=value, v_read_max=MAX_READ_V)
    return dataclasses.replace(base, **{name: value})


def _names(name: str) -> str:
    return rf"\b{re.escape(name)}\b"


def test_every_shipped_preset_is_inside_its_bounds() -> None:
    for name, preset in PRESETS.items():
        for b in preset.device.bounds():
            b.check("device", getattr(preset.device, b.name))
        for b in preset.periphery.bounds():
            b.check("periphery", getattr(preset.periphery, b.name))
        assert dataclasses.replace(preset.device) == preset.device, name


@pytest.mark.parametrize(("preset", "name"), DEVICE_CASES)
@SETTINGS
@given(data=st.data())
def test_device_values_inside_their_bound_are_accepted(preset: str, name: str, data: st.DataObject) -> None:
    base = DEVICES[preset]
    value = data.draw(_inside(_bound(base, name)), label=name)
    assert getattr(_device(base, name, value), name) == value


@pytest.mark.parametrize(("preset", "name"), DEVICE_CASES)
@SETTINGS
@given(data=st.data())
def test_device_values_outside_their_bound_are_refused(preset: str, name: str, data: st.DataObject) -> None:
    base = DEVICES[preset]
    value = data.draw(_outside(_bound(base, name)), label=name)
    with pytest.raises(ConfigurationError, match=_names(name)):
        _device(base, name, value)


@pytest.mark.parametrize(("preset", "name"), PERIPHERY_CASES)
@SETTINGS
@given(data=st.data())
def test_periphery_values_inside_their_bound_are_accepted(
    preset: str, name: str, data: st.DataObject
) -> None:
    base = PERIPHERIES[preset]
    b = _bound(_periphery(base, name, getattr(base, name)), name)
    value = data.draw(_inside(b), label=name)
    assert getattr(_periphery(base, name, value), name) == value


@pytest.mark.parametrize(("preset", "name"), PERIPHERY_CASES)
@SETTINGS
@given(data=st.data())
def test_periphery_values_outside_their_bound_are_refused(
    preset: str, name: str, data: st.DataObject
) -> None:
    base = PERIPHERIES[preset]
    b = _bound(_periphery(base, name, getattr(base, name)), name)
    value = data.draw(_outside(b), label=name)
    with pytest.raises(ConfigurationError, match=_names(name)):
        _periphery(base, name, value)


@pytest.mark.parametrize(
    ("param", "allowed"),
    [
        ("drift_nu=5", r"\[0, 1\)"),
        ("drift_nu_dtod=1", r"\[0, 1\)"),
        ("dw_min_ctoc=10", r"\[0, 5\]"),
        ("bounds_dtod=5", r"\[0, 0\.5\]"),
        ("gamma=-5", r"\[0, 100\]"),
        ("gamma_down=-0.1", r"\[0, 100\]"),
        ("dw_min_dtod=1.5", r"\[0, 1\]"),
        ("up_down_dtod=0.6", r"\[0, 0\.5\]"),
        ("gain_error=5", r"\[0, 0\.2\]"),
        ("g_max=1", r"\(1e-06, 0\.01\] S"),
        ("read_noise=1e-4", r"\[0, 1e-05\] S"),
        ("offset_error=300", r"\[0, 255\] LSB"),
    ],
)
def test_the_audits_uris_are_refused_naming_value_range_and_fix(param: str, allowed: str) -> None:
    name, value = param.split("=")
    with pytest.raises(ConfigurationError, match=allowed) as info:
        open_device(f"emulator://?preset=rram&seed=0&{param}")
    text = str(info.value)
    assert f"{name}={float(value):g}" in text  # the parameter and its value
    assert f"set {name} to a value in" in text  # the fix


@pytest.mark.parametrize(
    "uri",
    [
        "emulator://?preset=rram&seed=0&drift_nu=0.1&drift_nu_dtod=0.05",  # PCM-like drift on rram
        "emulator://?preset=rram&seed=0&dw_min_ctoc=5&bounds_dtod=0.3",  # aihwkit's fits
        "emulator://?preset=ecram&seed=0&gamma=0&gamma_down=0",
        "emulator://?preset=ideal&seed=0&g_max=1e-2&gain_error=0.2&offset_error=255",
        "emulator://?preset=pcm&seed=0&g_max=1e-7&read_noise=1e-8&write_noise=1e-8&reset_noise=1e-8&dw_min=1e-8",
    ],
)
def test_generous_settings_inside_the_bounds_open_and_compute(uri: str) -> None:
    with open_device(uri) as dev:
        dev.configure(Topology.layered([4, 3], bias=False))
        out = dev.mvm("W0", np.full((2, 4), 0.5, np.float32))
        assert np.isfinite(out).all() and dev.safety().violations == 0


NU_TOP = math.nextafter(_bound(DEVICES["rram"], "drift_nu").hi, 0.0)  # the largest allowed nu


@pytest.mark.parametrize("preset", ["rram", "pcm", "ecram"])
@settings(max_examples=25, deadline=None)
@given(
    since=st.floats(0.0, 1e12),
    level=st.floats(0.0, 1.0),
    partial=st.booleans(),
    bounds_dtod=st.sampled_from([0.0, 0.5]),
)
def test_drift_never_takes_a_device_below_its_own_floor(
    preset: str, since: float, level: float, partial: bool, bounds_dtod: float
) -> None:
    """The largest allowed nu and spread, up to 30,000 years after the write: every device
    stays at or above its own g_lo (and so above 0 S), with uniform and scattered bounds,
    one write time for the tile or a different one per device. No wires: the line sums are
    then the devices' own (with wires, the effective conductances', less: test_ir_drop.py)."""
    model = dataclasses.replace(
        DEVICES[preset],
        drift_nu=NU_TOP,
        drift_nu_dtod=NU_TOP,
        statistics="constant",
        bounds_dtod=bounds_dtod,
        wire_resistance=0.0,
    )
    a = TileArray(6, 5, model, torch.Generator().manual_seed(0), torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    g = torch.full(a.shape, model.g_min + level * model.g_range)
    a.write(g, g, 0.0, gen)
    if partial:  # the devices' write times part: the per-device drift path
        counts = torch.zeros(a.shape, dtype=torch.int64)
        counts[0] = 1
        a.pulse(counts, counts, 1.0, gen)
    assert a._drifts
    floor = a.truth()["g_min"]
    for t in (since, 2 * since + 100.0):
        now = torch.stack(a.conductances(t))
        assert bool((now >= floor).all()) and bool((now >= 0).all()), (t, float((now - floor).min()))
        assert bool((a.state(t) >= floor).all())
        rows, _ = a.line_sums(t)
        assert float(rows.min()) >= float(floor.sum((0, 2)).min()) * (1 - 1e-6)
