"""The two-network VAEs (h-vae, dh-vae) on lab boards: an encoder and a decoder need two
boards. An audit served one board and trained dh-vae on it: both networks landed on it, the
decoder's writes overwrote the encoder's tile of the same name, and the run ended without a
word (h-vae failed with "unknown tile 'W0'")."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from typer.testing import CliRunner

from hil.cli import app
from hil.runlog import open_run
from hil.testing import BoardServers

SMALL = ["train.epochs=1", "data.limit_train=32", "data.limit_test=32", "eval.samples=32", "eval.eps_draws=1"]


def _sets(*items: str) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def test_a_two_network_vae_on_one_lab_board_is_refused_naming_the_fix(
    emulated_board: Callable[..., BoardServers], tmp_path
) -> None:
    uri = emulated_board(board="emulator://?preset=ideal&seed=0").uri("visa-tcp")
    res = CliRunner().invoke(
        app, ["train", "vae", "--model", "dh-vae", "--out", str(tmp_path / "r"), "--no-progress",
              *_sets(f"device={uri}", *SMALL)],
    )  # fmt: skip
    assert res.exit_code == 2, res.output
    assert "puts its encoder and decoder on two boards" in res.output and "devices=" in res.output
    one = CliRunner().invoke(
        app, ["train", "vae", "--model", "tdh-vae", "--out", str(tmp_path / "t"), "--no-progress",
              *_sets(f"device={uri}", f'devices=["{uri}","{uri}"]', *SMALL)],
    )  # fmt: skip
    assert one.exit_code == 2 and "tdh-vae runs on one board" in one.output, one.output


def test_dh_vae_trains_its_encoder_and_decoder_on_two_lab_boards(
    emulated_board: Callable[..., BoardServers], tmp_path
) -> None:
    a = emulated_board(board="emulator://?preset=ideal&seed=0").uri("visa-tcp")
    b = emulated_board(board="emulator://?preset=ideal&seed=1").uri("serial-socket")
    out = tmp_path / "run"
    res = CliRunner().invoke(
        app, ["train", "vae", "--model", "dh-vae", "--out", str(out), "--no-progress",
              *_sets(f'devices=["{a}","{b}"]', *SMALL)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    run = open_run(out / "run.zarr")
    assert set(run.attrs["device_state"]["end"]) == {a, b}
    assert run.device["uri"] == a
    # each network's read-back from its own board (on one board they were the same tile twice)
    enc, dec = run.table("tiles/encoder.W"), run.table("tiles/decoder.W")
    assert enc["g_plus"].shape == dec["g_plus"].shape
    assert not np.array_equal(enc["g_plus"][-1], dec["g_plus"][-1])
