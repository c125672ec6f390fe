"""`hil train ... --set k=a --set k=b` is refused, naming the key and both values, as a device
URI's repeated query key and `hil emulator serve`'s repeated --set are (tests/test_uri_repeated_keys.py):
it used to run with the last value without a word (``--set train.epochs=5 --set
train.epochs=50`` trained 50 epochs)."""

from __future__ import annotations

from pathlib import Path

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


@pytest.mark.parametrize("command", [["train", "classifier"], ["train", "vae"]])
@pytest.mark.parametrize("order", ["key first", "table first"])
def test_a_key_and_its_table_given_together_are_refused_naming_both(command: list[str], order: str) -> None:
    """``--set train.epochs=5 --set 'train={epochs=50}'`` spells one key twice: it trained 50
    epochs without a word (whichever came last won), as a key given twice by one spelling did."""
    sets = ["train.epochs=5", "train={epochs=50}"]
    if order == "table first":
        sets.reverse()
    line = one_line_error(*command, "--set", sets[0], "--set", sets[1], "--show-config")
    assert f"--set {sets[0]} and --set {sets[1]} both set train.epochs" in line, line
    assert "keep the one you mean" in line, line


def test_a_nested_table_and_a_dotted_key_inside_it_are_refused() -> None:
    with pytest.raises(ConfigError) as info:
        check_repeated_overrides(["ep.beta = 0.2", "train.seed=1", "ep = {beta = 0.3, tol = 0.01}"])
    assert "--set ep.beta=0.2 and --set ep={beta = 0.3, tol = 0.01} both set ep.beta" in str(info.value)


def test_an_option_and_its_key_inside_a_table_are_refused() -> None:
    programming, variant = 'ep={programming="pulsed"}', 'model={variant="dh-vae"}'
    line = one_line_error(
        "train", "classifier", "--programming", "verify", "--set", programming, "--show-config"
    )
    assert f"--programming verify and --set {programming} both set ep.programming" in line, line
    line = one_line_error("train", "vae", "--model", "h-vae", "--set", variant, "--show-config")
    assert f"--model h-vae and --set {variant} both set model.variant" in line, line


def test_a_table_and_another_key_of_it_both_apply() -> None:
    """Two spellings of different keys of one table overlap in nothing: both apply, as do a key
    whose name begins like another's and a --set over a key of the --config file."""
    result = CliRunner().invoke(
        app, ["train", "classifier", "--set", "ep={tol=0.01}", "--set", "ep.beta=0.3", "--show-config"]
    )
    assert result.exit_code == 0, result.output
    assert "beta = 0.3" in result.stdout and "tol = 0.01" in result.stdout
    check_repeated_overrides(["train.lr=0.1", "train.lr_schedule=cosine", "ep.beta=0.2", "ep={tol=0.01}"])


def test_a_set_over_a_key_of_the_config_file_is_an_override(tmp_path: Path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text("[ep]\nbeta = 0.2\n")
    result = CliRunner().invoke(
        app, ["train", "classifier", "--config", str(toml), "--set", "ep={beta=0.3}", "--show-config"]
    )
    assert result.exit_code == 0, result.output
    assert "beta = 0.3" in result.stdout
