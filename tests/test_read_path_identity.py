"""The emulator's read path keeps what a read of an unchanged tile would compute anew (a pcm
tile's read-noise stds, the read-noise factor), the emulated driver converts a read once, and
`read_stats` updates its statistics in reused buffers: shortcuts that must give the numbers of
the plain computations, bit for bit. A small calibration session with them and one with the
plain computations patched back in must produce the same record."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import numpy as np
import pytest

import calibration.measure as measure
from calibration import SessionOptions, run_session
from calibration.converters import ConverterOptions
from drivers import open_device
from drivers.emulated import EmulatedDevice
from drivers.numerics import to_numpy
from emulator.array import TileArray
from emulator.statistics import pcm_read_std

TIMES = ("created", "durations_s", "total_s")  # wall-clock fields: differ between any two runs


def _plain_read_stats(device: Any, tile: str, reads: int) -> measure.ReadStats:
    """`read_stats` as first written: a fresh stacked float64 array and temporaries per read."""
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None
    for k in range(1, reads + 1):
        gp, gm = device.read_conductance(tile)
        g = np.stack((gp, gm)).astype(np.float64)
        if mean is None:
            mean, m2 = g.copy(), np.zeros_like(g)
            continue
        delta = g - mean
        mean += delta / k
        m2 += delta * (g - mean)
    assert mean is not None and m2 is not None
    std = np.sqrt(m2 / (reads - 1)) if reads > 1 else np.zeros_like(mean)
    return measure.ReadStats(mean, std, reads)


def _plain_driver_read(self: EmulatedDevice, tile: str) -> tuple[np.ndarray, np.ndarray]:
    with self.lock:
        gp, gm = self.board.read_conductance(tile)
        return to_numpy(gp, dtype=None), to_numpy(gm, dtype=None)


def _flat(x: Any, path: str, out: dict[str, Any]) -> None:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        for f in dataclasses.fields(x):
            _flat(getattr(x, f.name), f"{path}.{f.name}", out)
    elif isinstance(x, dict):
        for k, v in x.items():
            if k not in TIMES:
                _flat(v, f"{path}[{k!r}]", out)
    elif isinstance(x, (list, tuple)):
        out[f"{path}.len"] = len(x)
        for i, v in enumerate(x):
            _flat(v, f"{path}[{i}]", out)
    elif isinstance(x, np.ndarray):
        out[path] = (x.dtype.str, x.shape, np.ascontiguousarray(x).tobytes())
    elif isinstance(x, float):
        out[path] = x.hex()
    else:
        out[path] = repr(x)


def _session(preset: str) -> dict[str, Any]:
    options = SessionOptions(
        routines=("adc", "stuck", "gmap"),  # the state-ADC routine's reads, and a tile's
        tile_shapes=((8, 8),),
        channels=16,
        reads=16,
        converter=ConverterOptions(levels=12, repeats=8, level_reads=8),
        seed=0,
    )
    rec = run_session(open_device(f"emulator://?preset={preset}&seed=0&wire_resistance=0"), options)
    out: dict[str, Any] = {}
    _flat(rec, "record", out)
    return {k: v for k, v in out.items() if k != "record.created"}


@pytest.mark.parametrize("preset", ["rram", "pcm"])
def test_read_path_shortcuts_give_the_plain_computations_numbers(
    preset: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast = _session(preset)
    monkeypatch.setattr(
        TileArray, "_pcm_read_std", lambda self, g: pcm_read_std(g, self.model.g_max, self.model.read_noise)
    )
    monkeypatch.setattr(TileArray, "_read_noise_scalar", lambda self: self.model.read_noise)
    monkeypatch.setattr(EmulatedDevice, "read_conductance", _plain_driver_read)
    for name, module in list(sys.modules.items()):
        if name.startswith("calibration") and getattr(module, "read_stats", None) is measure.read_stats:
            monkeypatch.setattr(module, "read_stats", _plain_read_stats)
    plain = _session(preset)
    assert fast.keys() == plain.keys()
    differ = [k for k in fast if fast[k] != plain[k]]
    assert not differ, differ[:10]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])  # float64: every mantissa bit in use
def test_read_stats_matches_the_plain_welford_update(dtype: type) -> None:
    draws = np.random.default_rng(0).normal(0.0, 1.0, (40, 2, 3, 5)).astype(dtype)  # delta ~ mean

    class Reader:  # the same reads, from the first, for each of the two
        def __init__(self) -> None:
            self.draws = iter(draws)

        def read_conductance(self, tile: str) -> tuple[np.ndarray, np.ndarray]:
            g = next(self.draws)
            return g[0], g[1]

    for reads in (1, 2, 17):
        a = measure.read_stats(Reader(), "t", reads)  # type: ignore[arg-type]
        b = _plain_read_stats(Reader(), "t", reads)
        assert a.reads == b.reads
        assert a.mean.tobytes() == b.mean.tobytes() and a.std.tobytes() == b.std.tobytes()
