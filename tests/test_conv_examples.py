"""The conv ff-EBM experiments of issue 18 as commands: the example configs load, build the
networks they describe on the emulator and train (the CIFAR-10 model on synthetic 32 x 32
images, as no CIFAR batches ship with the project)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from drivers import open_device
from hil.classifier import Classifier
from hil.config import ConfigError, load_config
from hil.train_classifier import train_classifier

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_cifar10_example_builds_the_six_layer_model_and_trains_on_synthetic_images() -> None:
    cfg = load_config(EXAMPLES / "ffebm_cifar10.toml", ["ep.free_steps=2", "ep.nudge_steps=1"])
    clf = Classifier(cfg, 3 * 32 * 32, 10, open_device, image_shape=(3, 32, 32))
    try:
        shapes = clf.tile_shapes()
        chans = [3, 128, 128, 256, 256, 512, 512]
        convs = [(c_in * 9 + 1, c_out) for c_in, c_out in itertools.pairwise(chans)]
        assert list(shapes.values()) == [*convs, (512 * 4 * 4 + 1, 10)]  # 3 blocks of 2, head in the last
        assert len(clf.blocks()) == 3
        before = [p.detach().clone() for p in clf.ffebm.block_parameters()]  # type: ignore[union-attr]
        gen = torch.Generator().manual_seed(0)
        x, y = torch.rand(4, 3 * 32 * 32, generator=gen), torch.randint(0, 10, (4,), generator=gen)
        loss, _acc, st = clf.step(x, y)
        assert torch.isfinite(torch.tensor(loss)) and st["settles"] == 9  # 3 blocks x (free + 2 nudged)
        after = clf.ffebm.block_parameters()  # type: ignore[union-attr]
        assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    finally:
        clf.close()


@pytest.mark.parametrize(("preset", "pool_mode"), [("ideal", "max"), ("rram", "max"), ("rram", "avg")])
def test_mnist_conv_example_learns_on_a_subset(preset: str, pool_mode: str) -> None:
    """One epoch of the example on 1024 of the 28 x 28 images (16 batches), on the ideal board
    and on rram: three times chance (10 %) or better on 256 test images; average-pooled too,
    through the noisy board's reads (with w_max = 1 rram stays at 13 %). On rram one epoch's
    result moves with the seed by more than its margin, so it is the mean over board and
    training seeds 0-2, none under twice chance: with the example's fixed step counts
    (``ep.tol = 0``, a fixed count on noisy boards since 2026-12-07) max pooling gave 27.3,
    45.3 and 46.5 % (the per-sample stop before: 35.5, 44.5, 43.0 %), average pooling 32.4,
    65.2 and 48.4 %. The full example is measured by benchmarks/ffebm_conv.py (docs/conv.md)."""
    seeds = (0,) if preset == "ideal" else (0, 1, 2)
    accs = []
    for seed in seeds:
        cfg = load_config(
            EXAMPLES / "ffebm_conv_mnist.toml",
            ["train.epochs=1", "data.limit_train=1024", "data.limit_test=256", f"train.seed={seed}",
             f"device=emulator://?preset={preset}&seed={seed}", f"model.pool_mode={pool_mode}"],
        )  # fmt: skip
        res = train_classifier(cfg)
        try:
            accs.append(res.test_acc)
            assert res.cells == sum(r * c for r, c in res.tiles.values())
        finally:
            res.model.close()  # type: ignore[attr-defined]
    assert sum(accs) / len(accs) > 0.3 and min(accs) > 0.2, accs


def test_mnist_conv_example_predicts_each_image_alone_with_the_running_batch_norm() -> None:
    """After training steps the digital front's batch-norm normalises with its running
    statistics at prediction: an image's output is the same predicted alone or among others,
    prediction leaves those statistics as training left them, and training mode comes back."""
    cfg = load_config(EXAMPLES / "ffebm_conv_mnist.toml", ["ep.free_steps=5", "ep.nudge_steps=2"])
    clf = Classifier(cfg, 28 * 28, 10, open_device, image_shape=(1, 28, 28))
    try:
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            clf.step(torch.rand(16, 28 * 28, generator=gen), torch.randint(0, 10, (16,), generator=gen))
        ffebm = clf.ffebm
        assert ffebm is not None
        stats = {k: v.clone() for k, v in ffebm.state_dict().items() if "running" in k}
        x = torch.rand(6, 28 * 28, generator=gen)
        together = clf.predict(x)
        alone = torch.cat([clf.predict(x[i : i + 1]) for i in range(len(x))])
        assert torch.allclose(alone, together, atol=1e-6)
        assert all(torch.equal(ffebm.state_dict()[k], v) for k, v in stats.items())
        assert ffebm.training
    finally:
        clf.close()


def test_conv_keys_are_checked_by_name() -> None:
    with pytest.raises(ConfigError, match=r"model\.channels"):
        load_config(None, ["model.channels=[8,16]"])  # kind is dhn
    with pytest.raises(ConfigError, match="one pool per conv layer"):
        load_config(None, ["model.kind=ffebm", "model.channels=[8,16]", "model.pools=[2]"])
    with pytest.raises(ConfigError, match=r"model\.pool_mode.*'mean'"):
        load_config(None, ["model.kind=ffebm", "model.channels=[8,16]", "model.pool_mode=mean"])
    cfg = load_config(None, ["model.kind=ffebm", "model.channels=[4]", "data.name=digits"])
    with pytest.raises(ValueError, match="needs image data"):
        Classifier(cfg, 64, 10, open_device)


def test_the_pool_mode_key_reaches_every_conv_tile_of_the_blocks() -> None:
    cfg = load_config(
        None, ["model.kind=ffebm", "model.channels=[4,4,6]", "model.pools=[2,1,2]", "model.block_layers=2",
               "model.pool_mode=avg"],
    )  # fmt: skip
    model = Classifier(cfg, 64, 10, open_device, image_shape=(1, 8, 8))
    try:
        modes = [c.pool_mode for b in model.blocks() for c in b.topology.couplings if c.kind == "conv"]
        assert modes == ["avg"] * 3
    finally:
        model.close()


def _device_error(w_max: float) -> dict[str, float]:
    """Per tile of the example on rram, |weights on the board - host weights| / |host weights|
    at the initial weights, after three writes (the scheme has confirmed the stuck devices and
    their partners carry the difference)."""
    cfg = load_config(
        EXAMPLES / "ffebm_conv_mnist.toml", [f"model.w_max={w_max}", "device=emulator://?preset=rram&seed=0"]
    )
    clf = Classifier(cfg, 28 * 28, 10, open_device, image_shape=(1, 28, 28))
    try:
        blk = clf.blocks()[0]
        for _ in range(2):
            blk.sync(force=True)
        on_board = blk.device_weights().weights
        host = {t: p.detach() for t, p in blk.weights.items()}
        return {t: float((on_board[t] - w).norm() / w.norm()) for t, w in host.items()}
    finally:
        clf.close()


def test_mnist_conv_example_maps_its_weights_onto_enough_of_the_rram_window() -> None:
    """The example's w_max (0.25) keeps the rram devices' errors well below the weights; with
    w_max = 1 they are as large as the weights, which made the example collapse on rram
    (docs/conv.md)."""
    cfg = load_config(EXAMPLES / "ffebm_conv_mnist.toml")
    assert cfg.model.w_max == 0.25
    example, full_window = _device_error(cfg.model.w_max), _device_error(1.0)
    assert max(example.values()) < 0.6, example
    assert min(full_window.values()) > 0.8, full_window
    for tile, err in example.items():
        assert err < 0.6 * full_window[tile], (tile, err, full_window[tile])


@pytest.mark.parametrize("study", ["fc", "conv"])
def test_the_splitting_study_builds_one_network_in_every_split(study: str) -> None:
    """benchmarks/ffebm_conv.py's splitting runs: every block size at every init scale and Adam
    rate is a valid config, and each splits the same network (the same crossbar cells) into the
    blocks it says (the output layer a block of its own in the fully connected study)."""
    import argparse
    import sys

    if str(EXAMPLES.parent) not in sys.path:
        sys.path.insert(0, str(EXAMPLES.parent))
    from benchmarks import ffebm_conv

    args = argparse.Namespace(quick=False, seeds="0,1,2", skip_main=True, skip_split=False, split_model=study,
                              split_scales="", split_lrs="", split_epochs=0, split_train=0)  # fmt: skip
    todo = ffebm_conv.jobs(args)
    assert [(j["tags"]["block_layers"], j["tags"]["init_scale"], j["tags"]["lr"]) for j in todo] == list(
        itertools.product((1, 2, 3, 6), ffebm_conv.SPLIT_SCALES[study], ffebm_conv.SPLIT_LRS[study])
    )
    cells, blocks = set(), {}
    for job in todo:
        cfg = load_config(ffebm_conv.EXAMPLE, job["overrides"])
        rates = ffebm_conv.tile_rates(job["tags"]["lr"])
        assert cfg.model.init_scale == job["tags"]["init_scale"] and cfg.train.lr == rates
        clf = Classifier(cfg, 28 * 28, 10, open_device, image_shape=(1, 28, 28))
        # a per-tile profile names one rate for every tile, the lowest layer's first
        tile_lrs = [g["lr"] for g in clf.opt.param_groups[: len(clf.tile_shapes())]]
        assert len(rates) == 1 or len(rates) == len(tile_lrs), (rates, tile_lrs)
        assert tile_lrs == [rates[min(k, len(rates) - 1)] for k in range(len(tile_lrs))]
        shapes = [tuple(g["params"][0].shape) for g in clf.opt.param_groups[: len(tile_lrs)]]
        assert shapes == list(clf.tile_shapes().values())  # the groups in the tiles' order
        if study == "conv":  # from the lowest layer (8 maps in: 8 x 3 x 3 + 1 rows) to the head
            assert shapes[0] == (73, 8) and shapes[-1] == (16 * 7 * 7 + 1, 10), shapes
        cells.add(sum(r * c for r, c in clf.tile_shapes().values()))
        blocks[job["tags"]["block_layers"]] = len(clf.blocks())
        clf.close()
    assert len(cells) == 1
    expected = {1: 7, 2: 4, 3: 3, 6: 2} if study == "fc" else {1: 6, 2: 3, 3: 2, 6: 1}
    assert blocks == expected
