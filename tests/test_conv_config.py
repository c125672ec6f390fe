"""Conv ff-EBM settings a user gets wrong are named by their config keys (the MHN/conv audit:
``model.pools=[0,1]`` ended in a ZeroDivisionError traceback, a kernel too large for the maps
in "shape of group 's2' must be >= 1", naming no setting)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from hil.cli import app
from hil.ffebm import split_conv

BASE = ["train", "classifier", "--config", "examples/ffebm_conv_mnist.toml", "--no-progress"]
SMALL = ["train.epochs=1", "data.limit_train=64", "data.limit_test=32"]


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ("model.pools=[0,1]", "model.pools: each conv layer's pooling window is 1 (none) to 8"),
        ("model.pools=[-2,1]", "model.pools: each conv layer's pooling window is 1 (none) to 8"),
        ("model.kernel=7", "model.kernel 7 and model.padding 1 gives 0 x 0"),
    ],
)
def test_a_conv_setting_that_cannot_work_is_named(setting: str, named: str, tmp_path) -> None:
    sets = [a for s in [*SMALL, setting] for a in ("--set", s)]
    res = CliRunner().invoke(app, [*BASE, "--out", str(tmp_path / "r"), *sets])
    assert res.exit_code == 2, res.output
    assert named in res.output and "Traceback" not in res.output, res.output


def test_split_conv_names_the_layer_whose_map_vanishes() -> None:
    assert split_conv((1, 8, 8), [2, 2], [2, 2], 1) == [((1, 8, 8), [2], [2]), ((2, 4, 4), [2], [2])]
    with pytest.raises(ValueError, match=r"conv layer 3: its 1 x 1 input map .* model.pools\[3\] = 2"):
        split_conv((1, 8, 8), [2, 2, 2, 2], [2, 2, 2, 2], 1)
