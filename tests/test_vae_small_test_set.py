"""`hil train vae` with fewer test images than its reconstruction picture shows (30)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from hil.cli import app


@pytest.mark.parametrize("caps", ["", "&capabilities=mvm,pulse,program_verify"], ids=["settle", "mvm-only"])
def test_a_run_with_data_limit_test_below_30_writes_its_pictures(tmp_path, caps: str) -> None:  # type: ignore[no-untyped-def]
    """data.limit_test=16: the run trained, evaluated and logged, then crashed drawing its
    reconstructions with "shape '[30, -1]' is invalid for input of size 1024" (it took the
    first 30 test images and reshaped them as 30). The picture now shows the 16 there are."""
    uri = f"emulator://?preset=rram&seed=0&max_batch=8&max_settle_steps=60&tile_rows_max=32&tile_cols_max=32{caps}"
    out = tmp_path / "run"
    args = ["train", "vae", "--model", "tdh-vae", "--no-progress", "--out", str(out)]
    for kv in (f"device={uri}", "ep.steps=60", "data.limit_train=16", "data.limit_test=16", "eval.samples=16",
               "train.epochs=1", "model.hidden=16"):  # fmt: skip
        args += ["--set", kv]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (out / "reconstructions.png").is_file() and (out / "samples.png").is_file()
