"""Issue 20, part 3: `examples/digits_98.toml` is the recipe docs/neuron.md ("Digits at 98 %")
measured (soft sigmoid 0.1, centred initial biases, Adam 0.002 / 0.001, cosine, 40 epochs);
checked through the config loader so that a renamed key or value fails here, not only in a
40-epoch run. The accuracies themselves are not re-measured (about 50 s a run)."""

from __future__ import annotations

from pathlib import Path

from hil.config import load_config, validate

EXAMPLE = Path(__file__).parents[1] / "examples" / "digits_98.toml"


def test_digits_98_example_is_the_measured_recipe() -> None:
    cfg = load_config(EXAMPLE)
    validate(cfg)
    assert cfg.model.kind == "dhn" and cfg.model.sizes == [64, 256, 10]
    assert cfg.model.activation == "soft_sigmoid:0.1"
    assert cfg.model.init_bias == "mid"
    assert (cfg.train.optimizer, cfg.train.lr, cfg.train.lr_digital) == ("adam", [0.002, 0.001], 0.001)
    assert (cfg.train.schedule, cfg.train.epochs) == ("cosine", 40)
    assert cfg.device == "emulator://?preset=ideal&seed=0"


def test_digits_98_example_takes_the_rram_board_with_a_6_bit_adc() -> None:
    cfg = load_config(EXAMPLE, ["device=emulator://?preset=rram&seed=0&adc_bits=6"])
    validate(cfg)
    assert cfg.device == "emulator://?preset=rram&seed=0&adc_bits=6"
    assert cfg.model.init_bias == "mid"
