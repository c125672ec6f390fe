"""`benchmarks/vae_table.py --set KEY=VALUE`: the docs/vae.md joint-settle and mixed-writes
figures are the benchmark's runs with one config key set, so the benchmark takes the key as
`hil train vae --set` does (the same parser and checks), refuses what that refuses and the keys
its own options set, and records the overrides in its JSON lines. Training and the Frechet
references are replaced by stubs that record each run's configuration: seconds, nothing is
trained (the figures themselves are measured by the command docs/vae.md names)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import benchmarks.vae_table as bench
from hil.vae.config import VAERunConfig

ROOT = Path(__file__).resolve().parents[1]


def test_set_applies_to_every_run_after_the_tuned_file() -> None:
    cfg = bench.run_config(
        "tdh-vae", "rram", "", 1, 3, None, ["ep.joint_phases=true", "ep.programming=mixed"]
    )
    assert cfg.ep.joint_phases is True and cfg.ep.programming == "mixed"
    # the benchmark's own keys are still its options'
    assert (cfg.train.seed, cfg.train.epochs, cfg.model.variant) == (1, 3, "tdh-vae")
    assert cfg.device == "emulator://?preset=rram&seed=0"
    # over a tuned file the override wins; without one nothing else moves from the defaults
    tuned = bench.run_config("tdh-vae", "ideal", "", 0, None, bench.TUNED_DIR, ["train.lr=0.5"])
    assert tuned.train.lr == 0.5
    plain = bench.run_config("tdh-vae", "ideal", "", 0, None, None, ["ep.joint_phases=true"])
    plain.ep.joint_phases = False
    assert plain == bench.run_config("tdh-vae", "ideal", "", 0, None, None)
    assert VAERunConfig().ep.joint_phases is False  # the default the doc compares against


@pytest.mark.parametrize(
    ("sets", "words"),
    [
        (["ep.nope=1"], "unknown config key 'ep.nope'"),
        (["ep.joint_phases=maybe"], "ep.joint_phases: expected true or false"),
        (["ep.joint_phases"], "is not key=value"),
        (["ep.beta=-1"], "ep.beta"),
        (["ep.programming=mixed", "ep.programming=ideal"], "--set ep.programming given twice"),
        (["ep.beta=0.2", "ep={beta=0.3}"], "both set ep.beta"),
        (["train.seed=3"], "which the benchmark sets from --seeds"),
        (["train.epochs=3"], "which the benchmark sets from --epochs"),
        (["device=emulator://?preset=ideal"], "which the benchmark sets from --presets"),
        (['model={variant="h-vae"}'], "which the benchmark sets from --variants"),
    ],
)
def test_bad_overrides_exit_naming_them_before_any_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], sets: list[str], words: str
) -> None:
    monkeypatch.setattr(bench, "references", lambda samples: pytest.fail("references computed"))
    argv = ["vae_table.py", "--presets", "ideal", "--variants", "tdh-vae", "--mvm-only", ""]
    monkeypatch.setattr(sys, "argv", [*argv, *(a for s in sets for a in ("--set", s))])
    with pytest.raises(SystemExit) as exc:
        bench.main()
    assert words in str(exc.value.code), exc.value.code


def test_runs_get_the_overrides_and_their_json_lines_record_them(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import hil.vae.train

    ran: list[VAERunConfig] = []

    def train(cfg: VAERunConfig, progress: bool = True) -> Any:
        ran.append(cfg)
        ev = SimpleNamespace(
            neg_elbo=1.0, recon_mse=0.03, frechet=6.0, energy_per_image_j=1e-9, converged=1.0
        )
        return SimpleNamespace(final=ev, initial=ev, cells=10, wall_s=0.1)

    monkeypatch.setattr(hil.vae.train, "train_vae", train)
    monkeypatch.setattr(
        bench, "references", lambda samples: {"bench": "vae_table", "kind": "frechet_references"}
    )
    argv = ["vae_table.py", "--presets", "ideal", "--variants", "tdh-vae", "--mvm-only", "", "--seeds", "0,1"]
    monkeypatch.setattr(sys, "argv", [*argv, "--set", "ep.joint_phases=true", "--epochs", "2"])
    bench.main()
    assert [(c.train.seed, c.train.epochs, c.ep.joint_phases) for c in ran] == [(0, 2, True), (1, 2, True)]
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    runs = [r for r in lines if r["kind"] == "run"]
    assert [r["set"] for r in runs] == [["ep.joint_phases=true"]] * 2
    assert all(r["joint_phases"] is True and r["threads"] == 1 for r in runs)
    assert [r["set"] for r in lines if r["kind"] == "summary"] == [["ep.joint_phases=true"]]
