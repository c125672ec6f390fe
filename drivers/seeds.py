"""Named random streams from one root seed: the project's single seeding scheme.

Every random draw in the project (an emulated board's noise and fabrication, EP's
initial weights and nudge signs, a programming scheme's dithering, a VAE's noise, a
calibration routine's random levels) comes from a *stream*: a root seed (the one the
user gives: ``seed=`` of a board URI, ``train.seed``, ``SessionOptions.seed``, ...), a
stream name from the fixed registry `STREAMS`, and optional non-negative indices (a
tile position, a block number). The integer seed of a stream is

    SeedSequence(entropy=seed, spawn_key=(STREAMS[stream], *index)).generate_state(1, uint64)[0] >> 1

i.e. numpy's `SeedSequence` spawning (the same hashing `SeedSequence.spawn` uses), cut to
63 bits so that it fits both `torch.Generator.manual_seed` and `numpy.random.default_rng`.
Streams of one root seed are statistically independent of each other and of every other
root seed's streams (unlike ``seed + 1``-style offsets, where run 0's second stream is
run 1's first). `derive` gives the integer, `torch_generator` and `numpy_rng` the seeded
generators. A name that is not in the registry raises `KeyError`: add it to `STREAMS`,
with a new id (ids are never reused or renumbered: that would change every run's draws).

Devices: a stream's integer seed is the same everywhere, but torch's CPU generator (Mersenne
Twister) and its CUDA generator (Philox) turn one seed into different numbers. So draws that
must not depend on the compute device (initial weights, signs, the digital parts' start, an
emulated chip's fabrication and converter errors) use `torch_generator` on the CPU (its
default) and move the result; only an emulated board's run-time noise is drawn on the board's
device (the same distribution on CPU and CUDA, not the same numbers; `hil.compute`).

Seeds that name *boards* are not streams: ``emulator://?seed=N`` picks a chip, and a
model of several blocks opens boards ``seed, seed + 1, ...`` (`hil.train_classifier`);
the board then derives its own streams (``board.*``) from its seed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# name -> fixed stream id (append only: never renumber or reuse an id)
STREAMS: dict[str, int] = {
    # emulator/board.py: an emulated board (its seed is the URI's seed)
    "board.noise": 1,  # run-time noise: programming (and its read-back), MVM and node noise
    "board.truth": 2,  # the periphery's true converter gain/offset errors
    "board.fabrication": 3,  # index: the physical tile position; device-to-device variation
    "board.read": 4,  # the read noise of host reads (read_conductance): what a host reads never
    # changes the noise its settles and writes see (a run log does not change a run)
    # hil/ep.py: an EBBlock
    "ep.init": 10,  # initial weights (when none are given) and the network's own generator
    "ep.sign": 11,  # the sign of beta per step (EPEstimator)
    # hil/ffebm.py: a feedforward chain of EB blocks
    "ffebm.init": 20,  # initial block weights and the digital parts between blocks
    "ffebm.block": 21,  # index: block number; the root seed of block k (its EBBlock and scheme)
    # hil/train_classifier.py
    "classifier.init": 25,  # initial weights of a one-block (dhn) classifier
    "classifier.augment": 26,  # index: the training step; random translations (hil.augment)
    # hil/programming/schemes.py
    "programming": 30,  # a ProgrammingScheme's generator (stochastic rounding of pulse counts)
    # hil/vae
    "vae.decoder": 40,  # the root seed of an unshared decoder block (the encoder uses the model seed)
    "vae.eval": 41,  # evaluation draws (importance-sampled NLL, eps draws)
    "vae.eps": 42,  # training's reparameterisation noise
    "vae.samples": 43,  # the latent samples of the pictures
    # calibration/
    "calibration.adc": 50,
    "calibration.dac": 51,
    "calibration.mvm": 52,
    "calibration.conductance": 53,
    "calibration.pulse_fit": 54,
    "calibration.settle": 55,
    "calibration.drift": 56,  # the root seed of a drift check's converter measurements
}


def stream_id(stream: str) -> int:
    """The fixed id of a registered stream name; KeyError (listing the names) otherwise."""
    try:
        return STREAMS[stream]
    except KeyError:
        raise KeyError(f"unknown random stream {stream!r}; registered: {', '.join(STREAMS)}") from None


def derive(seed: int, stream: str, *index: int) -> int:
    """The 63-bit integer seed of `stream` (with `index`, e.g. a tile position) under root `seed`.
    Pure: the same arguments give the same value in every process and on every platform."""
    seed = int(seed)
    index = tuple(int(i) for i in index)
    if seed < 0 or any(i < 0 for i in index):
        raise ValueError(f"seeds and stream indices are non-negative integers, got {seed}, {index}")
    seq = np.random.SeedSequence(entropy=seed, spawn_key=(stream_id(stream), *index))
    return int(seq.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def numpy_rng(seed: int, stream: str, *index: int) -> np.random.Generator:
    """`numpy.random.default_rng` seeded with `derive(seed, stream, *index)`."""
    return np.random.default_rng(derive(seed, stream, *index))


def torch_generator(
    seed: int, stream: str, *index: int, device: str | torch.device = "cpu"
) -> torch.Generator:
    """A `torch.Generator` (on `device`) seeded with `derive(seed, stream, *index)`."""
    import torch

    return torch.Generator(device=device).manual_seed(derive(seed, stream, *index))
