"""`benchmarks/mhn_checks.py` prints the quantities the MHN tests bound (docs/mhn.md "Measured
figures"), from the setups the tests use (`hil.mhn.setups`). Its two fastest parts run here (a
second) and must print figures inside the tests' bounds; its size-setting options refuse
values outside their declared bounds, naming them."""

from __future__ import annotations

import json

import pytest

import benchmarks.mhn_checks as bench


def test_fast_parts_print_one_json_line_each_inside_the_tests_bounds(
    capsys: pytest.CaptureFixture[str],
) -> None:
    bench.main(["--parts", "retrieval,gradient"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["part"] for r in rows] == ["retrieval", "gradient"]
    retrieval, gradient = rows
    assert retrieval["max_abs_diff_to_torch"] <= retrieval["bound"] and retrieval["steps"] == 40
    assert retrieval["converged"] and retrieval["converged_steps"] < 40
    assert min(gradient["cosine"]) >= 0.999 and max(gradient["rel_error"]) <= 0.01
    assert (
        gradient["clamped"]["cosine"] >= 0.999 and gradient["clamped"]["unclamped_reference_cosine"] < 0.995
    )


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--rram-epochs", "0"], "--rram-epochs 0: must be 1 to 20"),
        (["--classifier-epochs", "21"], "--classifier-epochs 21: must be 1 to 20"),
        (["--threads", "two"], "--threads 'two': not a whole number"),
        (["--parts", "retrieval,nope"], "nope not one of"),
    ],
)
def test_options_outside_their_bounds_are_refused(
    capsys: pytest.CaptureFixture[str], argv: list[str], words: str
) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert exc.value.code == 2
    assert words in capsys.readouterr().err
