"""The calibration's settles (`calibration.measure.settle_states`: the state-ADC and DAC
routines) are chunked by what one settle request may carry, as training's are
(`drivers.batches.settle_samples`: the board's `max_batch`, and at most `MAX_SETTLE_VALUES`
states in a reply), where they were chunked by `max_batch` alone. A board that declares a
large `max_batch` was sent a DAC settle it refuses: on an ideal board of 4096 channels with
``max_batch=20000``, a DAC routine of 20000 samples on channel 4080 settles 20000 x 4081 states
(81.6 M, above the 67.1 M bound) in one request, refused with a LimitViolation after the
routine's set-up, where training would have split it ("chunks of at most 16444").

The test scales the bound down (every check reads it when it checks: host and board alike)
and runs the routines through the real framed server over TCP; at the real numbers the case
above runs after the fix (84 s and 7 GB of the emulator's memory: too heavy for the suite)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

import drivers.checks
from calibration import ConverterOptions, SessionOptions, run_session
from calibration.measure import settle_states
from drivers import Device, Topology, open_device
from drivers.emulated import EmulatedDevice
from emulator.server.launch import ServedBoard, serve

QUICK = ConverterOptions(levels=48, repeats=16, samples=512, reads=256, level_reads=128)


@pytest.fixture
def served() -> Iterator[tuple[ServedBoard, Device]]:
    board = open_device("emulator://?preset=ideal&seed=0")
    assert isinstance(board, EmulatedDevice)
    s = serve(board, scpi_port=None, scpi_pty=False, framed_pty=False)
    dev = open_device(s.uris["serial-socket"])
    try:
        yield s, dev
    finally:
        dev.close()
        s.close()


def test_the_converter_routines_settle_within_the_values_one_settle_may_carry(
    served: tuple[ServedBoard, Device], monkeypatch: pytest.MonkeyPatch
) -> None:
    s, dev = served
    # 4096 states a settle: the DAC routine's 512 samples x its topology's nodes are above it
    monkeypatch.setattr(drivers.checks, "MAX_SETTLE_VALUES", 1 << 12)
    opts = SessionOptions(routines=("adc", "dac"), tile_shapes=((8, 8),), channels=16, converter=QUICK)
    record = run_session(dev, opts)
    assert s.device.safety().refused == 0  # the board refused nothing
    assert record.converters["dac"].valid.sum() >= 8  # and the routines still calibrate


def test_settle_states_chunks_as_training_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunk is `settle_samples` of the configured topology, the training's own
    (`hil.ep.EBBlock.settle_batch_most`); a batch that fits goes as one request."""
    from drivers.batches import settle_samples  # (imported here: the test above runs on its own)

    monkeypatch.setattr(drivers.checks, "MAX_SETTLE_VALUES", 1 << 12)
    with open_device("emulator://?preset=ideal&seed=0") as dev:
        topo = Topology.layered([3, 20, 2], bias=False)
        dev.configure(topo)
        most = settle_samples(dev.info.limits, topo)
        assert most == (1 << 12) // 25 < dev.info.limits.max_batch
        calls: list[int] = []
        settle = dev.settle

        def counted(clamp, **kw):  # type: ignore[no-untyped-def]
            calls.append(len(clamp["s0"]))
            return settle(clamp, **kw)

        dev.settle = counted  # type: ignore[method-assign]
        states = settle_states(dev, {"s0": np.zeros((most + 3, 3), np.float32)})
        assert calls == [most, 3] and states["s1"].shape == (most + 3, 20)
        calls.clear()
        settle_states(dev, {"s0": np.zeros((7, 3), np.float32)})
        assert calls == [7]
