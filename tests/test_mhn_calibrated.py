"""The MHN phase diagnostic on a board with 8-bit converters, raw and with a calibration record.

On a noiseless board the mvm ADC rounds away every change of a similarity below half a step, so
without dither the near-centre starts never see the centre's instability (an error-free 8-bit
board measured no beta_c up to 3 beta_c); `MHNBlock(dither="auto")`, which the diagnostic uses,
turns the rounding into zero-mean noise."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from drivers import open_device
from drivers.converters import lsb
from hil.cli import app
from hil.mhn.block import MHNBlock
from hil.mhn.diagnose import phase_diagnostic
from hil.mhn.phase import equidistant_patterns

EIGHT_BITS = "emulator://?preset=ideal&seed=0&adc_bits=8&dac_bits=8"
BAD = "emulator://?preset=ideal&seed=0&gain_error=0.05&offset_error=4&adc_bits=8&dac_bits=8"
PATTERNS = ["--n", "5", "--d", "16", "--norm", "2.0", "--starts", "12"]


def test_phase_diagnostic_sees_the_transition_through_8_bit_converters() -> None:
    torch.set_num_threads(1)
    xi = equidistant_patterns(5, 16, 2.0, seed=0)
    with open_device(EIGHT_BITS) as dev:
        rep = phase_diagnostic(dev, xi, centre_starts=12, anywhere_starts=12, seed=0)
    assert rep.crit.beta_c == pytest.approx(1.25)
    # undithered: NaN (the near-centre starts escaped 1/4 at most, even at 3 beta_c)
    assert math.isfinite(rep.beta_c_measured)
    assert rep.beta_c_measured == pytest.approx(1.25, rel=0.1)


def test_auto_dither_is_sized_from_the_adc_and_off_without_quantisation() -> None:
    xi = equidistant_patterns(5, 16, 2.0, seed=0).numpy()
    with open_device(EIGHT_BITS) as dev:
        fwd, back = MHNBlock(dev, xi, beta=1.0, dither="auto").dither
        assert 0.0 < fwd <= 0.25 and 0.0 < back <= 0.25
        assert MHNBlock(dev, xi, beta=1.0).dither == (0.0, 0.0)
    with open_device("emulator://?preset=ideal&seed=0") as dev:
        if dev.info.limits.adc_bits is None:
            assert MHNBlock(dev, xi, beta=1.0, dither="auto").dither == (0.0, 0.0)


def test_auto_dither_uses_the_projects_one_adc_step() -> None:
    """The dither of "auto" is sqrt(3) ADC steps over the smallest line norm of the weights,
    the step being `drivers.converters.lsb` over the mvm range (span / (2**bits - 1), as the
    board quantises), not span / 2**bits."""
    xi = equidistant_patterns(5, 16, 2.0, seed=0).numpy()
    for bits, out_range in ((8, 4.0), (9, 3.0)):
        uri = f"emulator://?preset=ideal&seed=0&adc_bits={bits}&dac_bits=8"
        with open_device(uri) as dev:
            block = MHNBlock(dev, xi, beta=1.0, dither="auto", out_range=out_range)
        w = block.encoding.weights(block.patterns.detach().double())[:-1]
        step = lsb(bits, 2.0 * out_range)
        fwd, back = block.dither
        assert fwd < 0.25 * (block.encoding.dac_hi - block.encoding.dac_lo)  # not capped
        assert fwd == pytest.approx(math.sqrt(3.0) * step / float(w.norm(dim=0).min()), rel=1e-12)
        assert back == pytest.approx(math.sqrt(3.0) * step / float(w.norm(dim=1).min()), rel=1e-12)


def _record(tmp_path: Path, uri: str, name: str) -> Path:
    rec = tmp_path / name
    args = ["calibrate", uri, "--routines", "adc,dac,mvm", "--tiles", "17x17", "--channels", "32"]
    res = CliRunner().invoke(app, [*args, "--out", str(rec)])
    assert res.exit_code == 0, res.output
    return rec


def _measured(uri: str, out: Path, seed: int, record: Path | None = None) -> dict[str, float]:
    cal = ["--calibration", str(record)] if record is not None else []
    args = ["mhn", "phase", "--device", uri, *PATTERNS, "--seed", str(seed), *cal, "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    return json.loads((out / "phase.json").read_text())


def test_phase_with_a_calibration_record_measures_what_an_error_free_board_does(tmp_path: Path) -> None:
    """A board with 5 % gain and 4-LSB offset errors, through its calibration record, measures
    the beta_c that an error-free board with the same converters measures, within 10 % (mean
    over pattern seeds 0-2). Not the derived 1.25: an 8-bit mvm ADC (its step dithered into
    zero-mean noise of about a step, 0.137 in similarity) lets near-centre starts escape below
    the derived beta_c, so an error-free 8-bit board measures 1.15-1.18 over boards 0-2 x pattern
    seeds 0-2 (7 % low; a 10-bit or 12-bit ADC: 0.99-1.003 of derived, whatever the DAC). With the
    record the bad board measured 1.03-1.19 there (mean 1.10; 1.03-1.12, mean 1.08, with the
    mid-tread ADC), without it 0.40-0.84: the record brings it to the error-free board's."""
    rec = _record(tmp_path, BAD, "bad.zarr")
    cal, free = [], []
    for seed in (0, 1, 2):
        data = _measured(BAD, tmp_path / f"cal{seed}", seed, rec)
        assert data["beta_c_derived"] == pytest.approx(1.25)
        cal.append(data["beta_c_measured"])
        free.append(_measured(EIGHT_BITS, tmp_path / f"free{seed}", seed)["beta_c_measured"])
    assert sum(free) / 3 == pytest.approx(1.25, rel=0.1)
    assert sum(cal) / 3 == pytest.approx(sum(free) / 3, rel=0.1)
    raw = _measured(BAD, tmp_path / "raw", 0)["beta_c_measured"]
    assert raw < 0.8 * sum(free) / 3  # without the record: 0.79 (0.81 mid-tread) against 1.16


def test_phase_refuses_a_record_of_another_configuration(tmp_path: Path) -> None:
    rec = _record(tmp_path, BAD.replace("dac_bits=8", "dac_bits=10"), "other.zarr")
    res = CliRunner().invoke(
        app, ["mhn", "phase", "--device", BAD, *PATTERNS, "--calibration", str(rec), "--out", str(tmp_path)]
    )
    assert res.exit_code != 0
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, res.output
    assert "configuration" in lines[0] and "hil calibrate" in lines[0]
    assert not (tmp_path / "phase.json").exists()
