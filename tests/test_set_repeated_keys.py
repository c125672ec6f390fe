"""`hil train ... --set k=a --set k=b` is refused, naming the key and both values, as a device
URI's repeated query key and `hil emulator serve`'s repeated --set are (tests/test_uri_repeated_keys.py):
it used to run with the last value without a word (``--set train.epochs=5 --set
train.epochs=50`` trained 50 epochs)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from hil.cli import app
from hil.config import ConfigError, RunConfig, check_repeated_overrides, load_config, load_into
from hil.vae.config import VAERunConfig
from tests.cli_errors import one_line_error


@pytest.mark.parametrize("command", [["train", "classifier"], ["train", "vae"]])
def test_train_refuses_a_set_key_given_twice(command: list[str]) -> None:
    line = one_line_error(*command, "--set", "train.epochs=5", "--set", "train.epochs=50", "--show-config")
    assert "--set train.epochs given twice (--set train.epochs=5, --set train.epochs=50)" in line
    assert "keep the one you mean" in line


def test_a_key_given_three_times_names_every_value() -> None:
    sets = ["train.lr=0.1", "train.epochs=2", "train.lr=0.2", "train.lr = 0.3"]
    with pytest.raises(ConfigError) as info:
        check_repeated_overrides(sets)
    assert "--set train.lr given 3 times (--set train.lr=0.1, --set train.lr=0.2, --set train.lr=0.3)" in str(
        info.value
    )
    line = one_line_error("train", "vae", *[a for s in sets for a in ("--set", s)], "--show-config")
    assert "--set train.lr given 3 times" in line


def test_a_library_caller_appending_to_defaults_gets_the_last_value() -> None:
    """`load_config` / `load_into` apply overrides in order: code that appends its own to a list
    of defaults (tests, benchmarks, a lab's scripts) gets its own; only a person's --set is refused."""
    cfg = load_config(None, ["train.epochs=1", "train.seed=4", "train.epochs=2"])
    assert (cfg.train.epochs, cfg.train.seed) == (2, 4)
    vae = load_into(VAERunConfig(), None, ["train.epochs=1", "train.epochs=3"])
    assert vae.train.epochs == 3


def test_programming_and_its_set_key_together_are_refused() -> None:
    line = one_line_error(
        "train", "classifier", "--programming", "verify", "--set", "ep.programming=pulsed", "--show-config"
    )
    assert "--programming verify and --set ep.programming=pulsed both set ep.programming" in line


def test_model_and_its_set_key_together_are_refused() -> None:
    """`hil train vae --model h-vae --set model.variant=dh-vae` trained the h-vae without a word."""
    line = one_line_error(
        "train", "vae", "--model", "h-vae", "--set", "model.variant=dh-vae", "--show-config"
    )
    assert "--model h-vae and --set model.variant=dh-vae both set model.variant" in line
    result = CliRunner().invoke(app, ["train", "vae", "--model", "h-vae", "--show-config"])
    assert result.exit_code == 0, result.output
    assert 'variant = "h-vae"' in result.stdout


def test_distinct_keys_still_apply() -> None:
    cfg = load_into(RunConfig(), None, ["train.epochs=3", "train.seed=7", "ep.programming=verify"])
    assert (cfg.train.epochs, cfg.train.seed, cfg.ep.programming) == (3, 7, "verify")
    result = CliRunner().invoke(app, ["train", "classifier", "--programming", "verify", "--show-config"])
    assert result.exit_code == 0, result.output
    assert 'programming = "verify"' in result.stdout
