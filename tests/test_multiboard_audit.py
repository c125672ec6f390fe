"""An ff-EBM's EB blocks on several served boards (docs/multiboard.md), as a user meets them:
a run resumed with one block's board swapped for another chip, and a block refused by its
board's tiles."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hil.cli import app
from hil.config import RunConfig, load_config
from hil.runlog import AnotherBoardWarning, RunLog, open_for_resume, open_run
from hil.testing import BoardServers
from hil.train_classifier import train_classifier

MODEL = ["model.kind=ffebm", "model.sizes=[64,24,16,10]", "model.block_layers=2", "model.between=linear"]
SHORT = ["train.epochs=2", "train.batch_size=16", "data.limit_train=32", "data.limit_test=16"]


def _devices(*uris: str) -> str:
    return "devices=" + json.dumps(list(uris))


def _refused(command: str, sets: list[str], out: Path, *options: str) -> str:
    """`hil train COMMAND` with `sets` as --set overrides: it must exit 2; its last line."""
    args = ["train", command, *options, "--out", str(out), "--no-progress"]
    res = CliRunner().invoke(app, [*args, *[x for s in sets for x in ("--set", s)]])
    assert res.exit_code == 2, res.output
    return res.output.strip().splitlines()[-1]


def _interrupted_after_an_epoch(cfg: RunConfig, path: Path) -> Path:
    """A run of `cfg` logged at `path`, stopped (as by Ctrl-C) after its first epoch."""

    def crash(stats: object) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), RunLog.create(path, cfg) as log:
        train_classifier(cfg, log=log, on_epoch=crash)
    return path


def test_a_resume_with_another_board_for_block_1_says_so_and_keeps_both(
    emulated_board: Callable[..., BoardServers], tmp_path: Path
) -> None:
    """Block 0's board swapped was warned of and kept (`RunLog.set_device`); block 1's was
    taken without a word, and the run log's `boards` forgot which chip trained its first steps."""
    a = emulated_board(board="emulator://?preset=ideal&seed=0").uri("visa-tcp")
    b = emulated_board(board="emulator://?preset=ideal&seed=1").uri("serial-socket")
    c = emulated_board(board="emulator://?preset=ideal&seed=7").uri("serial-socket")
    cfg = load_config(None, [*MODEL, *SHORT, _devices(a, b), "log.snapshot_every_s=0"])
    path = _interrupted_after_an_epoch(cfg, tmp_path / "run.zarr")
    swapped = dataclasses.replace(cfg, devices=[a, c])
    log, state = open_for_resume(path)
    with log, pytest.warns(AnotherBoardWarning) as caught:
        train_classifier(swapped, log=log, state=state).model.close()
    texts = [str(w.message) for w in caught if issubclass(w.category, AnotherBoardWarning)]
    assert len(texts) == 1, texts  # block 0's board did not change: one warning, block 1's
    assert "block 1" in texts[0] and "EMU-00000007" in texts[0] and "EMU-00000001" in texts[0], texts[0]
    run = open_run(path)
    assert [r["idn"].split(",")[2] for r in run.boards] == ["EMU-00000000", "EMU-00000007"]
    before = run.attrs["resumes"][-1]["boards_before"]
    assert [(r["block"], r["idn"].split(",")[2], r["uri"]) for r in before] == [
        (0, "EMU-00000000", a),
        (1, "EMU-00000001", b),
    ]


def test_a_resume_on_the_same_boards_says_nothing(
    emulated_board: Callable[..., BoardServers], tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    a = emulated_board(board="emulator://?preset=ideal&seed=0").uri("visa-tcp")
    b = emulated_board(board="emulator://?preset=ideal&seed=1").uri("serial-socket")
    cfg = load_config(None, [*MODEL, *SHORT, _devices(a, b), "log.snapshot_every_s=0"])
    path = _interrupted_after_an_epoch(cfg, tmp_path / "run.zarr")
    log, state = open_for_resume(path)
    with log:
        train_classifier(cfg, log=log, state=state).model.close()
    assert not [w for w in recwarn if issubclass(w.category, AnotherBoardWarning)]
    assert "boards_before" not in open_run(path).attrs["resumes"][-1]


@pytest.mark.parametrize("shared", [False, True])
def test_a_block_too_large_for_its_boards_tiles_names_the_block_and_the_board(
    emulated_board: Callable[..., BoardServers], tmp_path: Path, shared: bool
) -> None:
    """The refusal said "the network needs 7 tiles of 16 x 16 ... split it into EB blocks on
    several boards", of a model already on several boards, without saying which block or board."""

    a = emulated_board(board="emulator://?preset=ideal&seed=0").uri("visa-tcp")
    # block 0 takes 12 tiles of 16 x 16, block 1 9: shared, 16 hold block 0 only; alone, 4 not block 1
    tiles = 16 if shared else 4
    small = f"emulator://?preset=ideal&seed=1&tile_rows_max=16&tile_cols_max=16&max_tiles={tiles}"
    c = emulated_board(board=small).uri("serial-socket")
    devices = [c, c] if shared else [a, c]
    model = [s for s in MODEL if not s.startswith("model.sizes=")]
    sets = [*model, *SHORT, "model.sizes=[64,24,16,40,10]", _devices(*devices)]
    out = tmp_path / "run"
    line = _refused("classifier", sets, out)
    assert line.startswith("error: EB block 1 (layers [16, 40, 10]) on board " + c), line
    assert "exceeded" in line and "devices[1]" in line and "model.block_layers" in line, line
    assert ("shared with block 0" in line) == shared, line
    assert not out.exists()


def test_a_lone_block_too_large_for_its_boards_tiles_is_named_as_two_blocks_are(tmp_path: Path) -> None:
    """An ff-EBM of one EB block on a board of 4 tiles of 16 x 16: the refusal named no block,
    where two blocks had theirs named with the fix for the block (docs/placement.md says the
    trainer names the block and its board); a lone block's fix is its `device`."""
    small = "emulator://?preset=ideal&seed=1&tile_rows_max=16&tile_cols_max=16&max_tiles=4"
    model = [s for s in MODEL if not s.startswith("model.block_layers=")]
    out = tmp_path / "run"
    line = _refused("classifier", [*model, *SHORT, "model.block_layers=3", f"device={small}"], out)
    assert line.startswith(f"error: EB block 0 (layers [64, 24, 16, 10]) on board {small}: "), line
    assert "For this block: device = a board with more or larger tiles" in line, line
    assert "model.block_layers" in line and "devices[" not in line, line
    assert not out.exists()


def test_a_dhn_too_large_for_its_boards_tiles_names_no_block(tmp_path: Path) -> None:
    """A DHN has no EB blocks: its board's refusal is the whole message."""
    small = "emulator://?preset=ideal&seed=1&tile_rows_max=16&tile_cols_max=16&max_tiles=1"
    sets = ["model.kind=dhn", "model.sizes=[64,24,10]", *SHORT, f"device={small}"]
    line = _refused("classifier", sets, tmp_path / "run")
    assert line.startswith("error: physical tiles of the split network exceeded"), line
    assert "EB block 0" not in line, line


@pytest.mark.parametrize("variant", ["tdh-vae", "dh-vae"])
def test_a_vae_too_large_for_its_boards_tiles_is_refused_for_the_vae_and_leaves_the_boards_safe(
    emulated_board: Callable[..., BoardServers], tmp_path: Path, variant: str
) -> None:
    """`hil train vae` on a board of 32 x 32 tiles: the refusal told a VAE user to set
    ``model.kind = 'ffebm'`` and ``model.block_layers`` (classifier keys), and the boards opened
    were never put in their safe state or closed (the run stopped while building its blocks)."""

    from drivers import open_device
    from tests.test_training_board_safety import SafeStatesServed

    small = "emulator://?preset=ideal&seed=0&tile_rows_max=32&tile_cols_max=32&max_tiles=8"
    boards = [
        SafeStatesServed(open_device(small)),
        SafeStatesServed(open_device("emulator://?preset=ideal&seed=1")),
    ]
    uris = [
        emulated_board(board=b).uri(t) for b, t in zip(boards, ["visa-tcp", "serial-socket"], strict=True)
    ]
    where = [f"device={uris[0]}"] if variant == "tdh-vae" else [f"devices={json.dumps(uris[::-1])}"]
    sets = [*where, "train.epochs=1", "data.limit_train=32", "data.limit_test=16", "eval.samples=16"]
    before = [b.safe_states for b in boards]
    out = tmp_path / "run"
    line = _refused("vae", sets, out, "--model", variant)
    used = 1 if variant == "tdh-vae" else 2
    # every board the run opened reached its safe state (the one it did not use was not touched)
    assert [b.safe_states - n for b, n in zip(boards, before, strict=True)][:used] == [1] * used
    assert line.startswith("error: ") and "exceeded" in line and uris[0] in line, line
    assert "ffebm" not in line and "block_layers" not in line, line
    assert "model.hidden" in line, line
    assert not out.exists()


def test_a_block_its_board_refuses_for_another_limit_is_named_without_the_tiles_fix(tmp_path: Path) -> None:
    """A block whose settle budget is over its board's limit: named, with the board's own fix only
    (the config key to change, as the board opens: `hil.boards.check_within_board`)."""

    tight = "emulator://?preset=ideal&seed=1&max_settle_steps=50"
    sets = [*MODEL, *SHORT, _devices("emulator://?preset=ideal&seed=0", tight)]
    line = _refused("classifier", sets, tmp_path / "r")
    assert line.startswith(
        f"error: ep.free_steps = 100, but the board at {tight} declares max_settle_steps 50: "
        "set ep.free_steps to at most 50"
    ), line
    assert "tiles" not in line, line


@pytest.mark.parametrize("lock", ["1", "0"])
def test_two_uris_of_one_board_are_refused_naming_both_and_the_fix(
    emulated_board: Callable[..., BoardServers], tmp_path: Path, lock: str
) -> None:
    """`devices` naming one board twice, spelled two ways (127.0.0.1 and localhost): the run was
    refused by the board's lock as "owned by <this very run>; wait for it to release the board, or
    break the lock", and without the lock (``?lock=0``) both blocks would configure one board,
    each re-configuring it under the other."""

    served = emulated_board(board="emulator://?preset=ideal&seed=0")
    one = served.uri("visa-tcp", lock=lock)
    other = one.replace("127.0.0.1", "localhost")
    assert one != other
    sets = [*MODEL, *SHORT, _devices(one, other)]
    out = tmp_path / "run"
    line = _refused("classifier", sets, out)
    assert line.startswith(f"error: devices[1] ({other}) is the board devices[0] ({one}) already opened"), (
        line
    )
    assert "repeat" in line and "break the lock" not in line, line
    assert not out.exists()


def test_a_dh_vae_on_two_uris_of_one_board_is_refused(
    emulated_board: Callable[..., BoardServers], tmp_path: Path
) -> None:

    one = emulated_board(board="emulator://?preset=ideal&seed=0").uri("serial-socket")
    other = one.replace("127.0.0.1", "localhost")
    sets = [
        f"devices={json.dumps([one, other])}",
        "train.epochs=1",
        "data.limit_train=32",
        "data.limit_test=16",
    ]
    out = tmp_path / "run"
    line = _refused("vae", sets, out, "--model", "dh-vae")
    assert line.startswith(f"error: devices[1] ({other}) is the board devices[0] ({one}) already opened"), (
        line
    )
    assert not out.exists()


def test_open_run_on_the_run_folder_names_its_run_log(tmp_path: Path) -> None:
    """docs/multiboard.md reads the boards back with `open_run(path).boards`; given the run
    folder (as `hil inspect RUN` takes it), it said only "not a zarr v3 store"."""
    from hil.runlog.layout import RunLogError

    cfg = load_config(None, [*MODEL, *SHORT])
    with RunLog.create(tmp_path / "run.zarr", cfg):
        pass
    with pytest.raises(RunLogError, match=r"a run folder: its run log is .*run\.zarr"):
        open_run(tmp_path)
