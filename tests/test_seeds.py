"""drivers.seeds: named random streams from one root seed (SeedSequence spawning)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from drivers import Topology, open_device, seeds


def _reference(seed: int, stream: str, *index: int) -> int:
    """The documented scheme, computed with numpy's SeedSequence directly."""
    seq = np.random.SeedSequence(entropy=seed, spawn_key=(seeds.STREAMS[stream], *index))
    return int(seq.generate_state(1, dtype=np.uint64)[0]) >> 1


@pytest.mark.parametrize("seed", [0, 1, 7, 2**40 + 3])
def test_derive_is_the_documented_seedsequence_value(seed: int) -> None:
    for stream in seeds.STREAMS:
        for index in ((), (0,), (3,), (1, 2)):
            value = seeds.derive(seed, stream, *index)
            assert value == _reference(seed, stream, *index)
            assert 0 <= value < 2**63
            assert value == seeds.derive(seed, stream, *index)  # pure


def test_stable_across_processes() -> None:
    code = (
        "from drivers import seeds; "
        "print(seeds.derive(5, 'board.fabrication', 2), seeds.derive(5, 'ep.sign'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == [str(_reference(5, "board.fabrication", 2)), str(_reference(5, "ep.sign"))]


def test_streams_are_distinct() -> None:
    ids = list(seeds.STREAMS.values())
    assert len(set(ids)) == len(ids)
    values = {
        seeds.derive(seed, stream, *index)
        for seed in range(4)
        for stream in seeds.STREAMS
        for index in ((), (0,), (1,))
    }
    assert len(values) == 4 * len(seeds.STREAMS) * 3
    # no offset aliasing: stream "a" of seed s is not stream "b" of seed s + 1
    assert seeds.derive(1, "ep.init") != seeds.derive(0, "ep.sign")


def test_unknown_stream_raises() -> None:
    with pytest.raises(KeyError, match=r"unknown random stream 'ep\.nope'"):
        seeds.derive(0, "ep.nope")
    with pytest.raises(KeyError):
        seeds.torch_generator(0, "board")
    with pytest.raises(ValueError):
        seeds.derive(-1, "ep.init")
    with pytest.raises(ValueError):
        seeds.derive(0, "board.fabrication", -1)


def test_generators_use_the_derived_seed() -> None:
    gen = seeds.torch_generator(3, "vae.eps")
    ref = torch.Generator().manual_seed(_reference(3, "vae.eps"))
    assert torch.equal(torch.randn(5, generator=gen), torch.randn(5, generator=ref))
    rng = seeds.numpy_rng(3, "calibration.adc")
    assert np.array_equal(rng.random(5), np.random.default_rng(_reference(3, "calibration.adc")).random(5))


def _chip(seed: int) -> tuple[np.ndarray, ...]:
    """What a fresh board of `seed` reads on two tiles at its factory state (fabrication
    variation and converter errors, read noise included)."""
    with open_device(f"emulator://?preset=rram&seed={seed}") as dev:
        dev.configure(Topology.layered([6, 5, 4]))
        tiles = [c.tile for c in dev.topology.couplings]
        return tuple(dev.read_conductance(t)[k] for t in tiles for k in (0, 1))


def test_same_seed_same_board_different_seed_different_board() -> None:
    a, b, c = _chip(3), _chip(3), _chip(4)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    for x, z in zip(a, c, strict=True):
        assert not np.array_equal(x, z)
    # the two tiles of one board are drawn from different fabrication streams
    assert not np.array_equal(a[0][:4, :4], a[2][:4, :4])
