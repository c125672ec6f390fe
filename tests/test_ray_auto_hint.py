"""`hil sweep ... --ray-address auto` (and `hil train classifier --distributed --ray-address
auto`) on a machine where no Ray cluster runs passed on Ray's words: "Please specify the one to
connect to by setting `--address` flag or `RAY_ADDRESS` environment variable", a flag of Ray's
own CLI that hil does not take. The error now names hil's options: a head elsewhere as
--ray-address HOST:PORT, or --ray-address local with --board."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from hil.sweep import ray_runner
from hil.sweep.study import SweepError

RAYS_WORDS = (
    "Could not find any running Ray instance. Please specify the one to connect to by setting "
    "`--address` flag or `RAY_ADDRESS` environment variable."
)


def _ray_without_a_cluster() -> Any:
    def init(**_: Any) -> None:
        raise ConnectionError(RAYS_WORDS)  # what ray.init(address="auto") raises with none running

    return SimpleNamespace(is_initialized=lambda: False, init=init)


def test_auto_without_a_cluster_names_hils_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray_runner, "import_ray", _ray_without_a_cluster)
    with pytest.raises(SweepError) as info:
        ray_runner.RayExecutor(None, "auto")
    message = str(info.value)
    assert message.startswith("--ray-address auto: no Ray cluster runs on this machine"), message
    assert "--ray-address HOST:PORT" in message and "--ray-address local --board NAME=URI" in message
    assert "`--address` flag" not in message


def test_another_failure_keeps_rays_words(monkeypatch: pytest.MonkeyPatch) -> None:
    def init(**_: Any) -> None:
        raise RuntimeError("version mismatch")

    monkeypatch.setattr(
        ray_runner, "import_ray", lambda: SimpleNamespace(is_initialized=lambda: False, init=init)
    )
    with pytest.raises(SweepError, match=r"cannot start or join Ray at 'auto': version mismatch"):
        ray_runner.RayExecutor(None, "auto")
