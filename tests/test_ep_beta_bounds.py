"""ep.beta past EP's range is refused by the config check, before a board is opened or a run
log written, with the key, the range and the value; not trained on (5e4 ran to the end at
chance) or refused mid-run by a board limit that names neither ep.beta nor the fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hil.config import MAX_EP_BETA, ConfigError, load_config, load_into, validate
from hil.vae.config import VAERunConfig, validate_vae


@pytest.mark.parametrize("beta", [1.5, 5e4, 1e9])
def test_classifier_beta_past_the_range_is_refused(beta: float) -> None:
    with pytest.raises(ConfigError, match=r"ep\.beta: .*\(0, 1\]"):
        validate(load_config(None, [f"ep.beta={beta}"]))


def test_the_bound_itself_is_accepted() -> None:
    validate(load_config(None, [f"ep.beta={MAX_EP_BETA}"]))


def test_vae_beta_past_the_range_is_refused() -> None:
    cfg = load_into(VAERunConfig(), None, ["ep.beta=2.0"])
    with pytest.raises(ConfigError, match=r"ep\.beta: .*\(0, 1\]"):
        validate_vae(cfg)


def test_the_cli_refuses_before_writing_a_run_log(tmp_path: Path) -> None:
    out = tmp_path / "run.zarr"
    cmd = [sys.executable, "-m", "hil.cli", "train", "classifier", "--set", "ep.beta=1e9"]
    done = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "ep.beta" in done.stderr + done.stdout
    assert not out.exists()
