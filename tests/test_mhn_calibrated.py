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


def test_phase_with_a_calibration_record_measures_the_derived_beta_c(tmp_path: Path) -> None:
    rec = _record(tmp_path, BAD, "bad.zarr")
    out = tmp_path / "cal"
    res = CliRunner().invoke(
        app, ["mhn", "phase", "--device", BAD, *PATTERNS, "--calibration", str(rec), "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    data = json.loads((out / "phase.json").read_text())
    assert data["beta_c_derived"] == pytest.approx(1.25)
    assert data["beta_c_measured"] == pytest.approx(1.25, rel=0.1)


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
