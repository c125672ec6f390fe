"""A board's server process killed (SIGKILL) in the middle of a training, and a fresh one
started on the same port: the run ends as an uninterrupted one (docs/reliability.md,
guarantee 3), over both TCP transports, with every step in its Zarr run log once."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tests.served_process import server_processes

BOARD = "emulator://?preset=ideal&seed=0"
HANG_AT = 13  # of the run's 18 settles (9 per epoch): the 4th of epoch 2
SETS = ["train.epochs=2", "data.limit_train=64", "data.limit_test=48", "model.sizes=[64,16,10]"]


def _train(uri: str, log_path: Path | None = None):  # type: ignore[no-untyped-def]
    from hil.config import load_config
    from hil.runlog import RunLog
    from hil.train_classifier import train_classifier

    cfg = load_config(None, [f"device={uri}", *SETS])
    if log_path is None:
        return train_classifier(cfg)
    with RunLog.create(log_path, cfg) as log:
        return train_classifier(cfg, log=log)


@pytest.fixture(scope="module")
def uninterrupted():  # type: ignore[no-untyped-def]
    result = _train(BOARD)
    result.model.close()
    return result


@pytest.mark.parametrize("transport", ["visa-tcp", "serial-socket"])
def test_a_server_process_killed_mid_settle_and_started_again_on_its_port_leaves_the_run_as_uninterrupted(
    transport: str, uninterrupted, tmp_path: Path
) -> None:
    """The server process is SIGKILLed while it runs the 13th of the run's 18 settles (no
    reply, no close, no safe state: the kernel closes its sockets), and a fresh process (a
    new board, devices never programmed, epoch 0 again) takes the same port. The host's
    settle fails, it reconnects, configures the topology again, finds the STATUS `arrays_id`
    changed, programs every tile from its weights and resends the settle: the weights, the
    accuracies and the run log's steps are those of the uninterrupted in-process run."""
    from hil.runlog import open_run

    params = {"timeout": "2", "attempts": "30", "backoff": "0.01"}
    if transport == "serial-socket":
        params["ack_timeout"] = "0.05"
    with server_processes(BOARD, 2, HANG_AT) as (first, standby):
        uri = first.go()[transport] + "?" + "&".join(f"{k}={v}" for k, v in params.items())
        errors: list[BaseException] = []

        def kill_and_start_again() -> None:
            try:
                first.wait_for_hang()
                first.kill()
                standby.go()  # the same ports: bound once the killed process's are free
            except BaseException as exc:  # reported by the test's thread
                errors.append(exc)

        killer = threading.Thread(target=kill_and_start_again, daemon=True)
        killer.start()
        result = _train(uri, tmp_path / "run.zarr")
        killer.join(timeout=30)
        recovery = result.model.devices[0].recovery
        result.model.close()
        assert not errors, errors
        assert first.proc.returncode == -9 and standby.proc.poll() is None
    assert recovery.arrays_lost == 1 and recovery.reconfigured == 1 and recovery.exhausted == 0
    assert [h.test_acc for h in result.history] == [h.test_acc for h in uninterrupted.history]
    for tile, p in result.model.block.weights.items():
        want = uninterrupted.model.block.weights[tile].detach().numpy()
        assert p.detach().numpy().tobytes() == want.tobytes(), tile
    log = open_run(tmp_path / "run.zarr")
    assert [int(s) for s in log.table("metrics/train")["step"]] == list(range(1, 9))
    assert log.complete and log.status == "complete"
