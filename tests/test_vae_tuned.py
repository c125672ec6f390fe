"""The VAE family tuned like the paper (issue 20 part 4, docs/vae.md "Tuned variants"): the
shipped sweeps share one budget and search space, the shipped best settings load through the
config loader and name only keys the VAE config has (a renamed key fails here), and the
Frechet references of `benchmarks/vae_table.py` behave. Seconds: nothing is trained."""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from pathlib import Path

import numpy as np
import pytest

import benchmarks.vae_table as bench
from hil.config import dotted_keys, load_into
from hil.data import load_digits
from hil.sweep.spec import SweepSpec, load_spec
from hil.vae.config import VAEModelConfig, VAERunConfig, validate_vae
from hil.vae.hopfield import AUTO_ACTIVATION
from hil.vae.metrics import DigitsFeatures, frechet_distance, frechet_references

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
VARIANTS: tuple[str, ...] = typing.get_args(typing.get_type_hints(VAEModelConfig)["variant"])
HOPFIELD = tuple(v for v in VARIANTS if v != "f-vae")
SWEPT_CURVE = "hard_sigmoid"  # the node curve every shipped sweep ran with


def _sweep(variant: str) -> SweepSpec:
    return load_spec(EXAMPLES / f"sweep_{variant.replace('-', '_')}.toml")


def test_every_variant_has_a_sweep_with_one_budget() -> None:
    specs = {v: _sweep(v) for v in VARIANTS}
    budgets = set()
    for v, s in specs.items():
        assert (s.trainer, s.objective, s.direction) == ("vae", "neg_elbo", "minimize"), v
        budgets.add(
            (
                s.n_trials,
                s.batch,
                s.seed,
                s.sampler,
                s.startup_trials,
                s.threads,
                s.start_at_base,
                s.base["train"]["epochs"],
            )
        )
        # the base is the trainer's defaults (ideal board, default init) but for variant and epochs,
        # and every variant was swept with the hard sigmoid (the shared layered net's default
        # curve is the logistic since, so its sweep names the curve it ran with)
        expected = VAERunConfig()
        expected.model.variant = v  # type: ignore[assignment]
        expected.train.epochs = s.base["train"]["epochs"]
        if v != "f-vae":
            expected.model.activation = SWEPT_CURVE if AUTO_ACTIVATION[v] != SWEPT_CURVE else "auto"
        assert s.base == dataclasses.asdict(expected), v
    assert len(budgets) == 1, budgets
    # trial 0 of every sweep is the defaults, so no variant's best is worse than not sweeping
    assert all(s.start_at_base for s in specs.values())
    # one search space for the Hopfield variants; F-VAE searches the same keys but for ep.*
    spaces = {v: specs[v].space for v in HOPFIELD}
    assert len(set(spaces.values())) == 1, spaces
    hopfield_space = spaces[HOPFIELD[0]]
    assert specs["f-vae"].space == tuple(p for p in hopfield_space if not p.key.startswith("ep."))


@pytest.mark.parametrize("variant", VARIANTS)
def test_tuned_settings_load_and_name_only_swept_keys(variant: str) -> None:
    path = bench.tuned_path(variant)
    keys = dotted_keys(tomllib.loads(path.read_text()))
    cfg = load_into(VAERunConfig(), path)  # raises on a key the VAE config does not have
    validate_vae(cfg)
    assert cfg.model.variant == variant
    sweep = _sweep(variant)
    swept = {p.key for p in sweep.space}
    # and the curve, where the sweep named it (it ran with another than the variant's default)
    curve = sweep.base["model"]["activation"]
    pinned = {"model.activation"} if curve != "auto" else set()
    assert set(keys) == swept | {"model.variant"} | pinned, f"{path} should set exactly the swept keys"
    assert cfg.model.activation == curve
    # the benchmark reads it, and changes only the board, the seed and (if asked) the epochs
    run = bench.run_config(variant, "ideal", "", 2, None, bench.TUNED_DIR)
    assert run.train.seed == 2 and run.train.epochs == VAERunConfig().train.epochs
    assert run.device == "emulator://?preset=ideal&seed=0"
    for key, value in keys.items():
        section, name = key.split(".")
        assert getattr(getattr(run, section), name) == value, key


def test_frechet_references() -> None:
    data = load_digits()
    features = DigitsFeatures.load_or_train()
    f_test = features.features(data.x_test.reshape(len(data.x_test), -1)).numpy()
    assert abs(frechet_distance(f_test, f_test)) < 1e-6
    refs = frechet_references(features, data.x_train, data.x_test, samples=360, seed=0)
    assert set(refs) == {"train_vs_test", "train_all_vs_test", "mean_image_vs_test"}
    assert all(np.isfinite(v) and v > 0 for v in refs.values()), refs
    # held-out digits are close; one constant image, however average, is far
    assert refs["mean_image_vs_test"] > 10 * refs["train_vs_test"]
    assert refs["train_all_vs_test"] < refs["train_vs_test"]  # more samples, less estimator bias
    same = frechet_references(features, data.x_test, data.x_test, samples=len(data.x_test))
    assert abs(same["train_all_vs_test"]) < 1e-6 and abs(same["train_vs_test"]) < 1e-6
    assert frechet_references(features, data.x_train, data.x_test, seed=0) == refs  # seeded
