"""The trainers a sweep can tune: their config dataclass, checks, metrics and one run.

A trainer's `run` trains one config into a run folder (the run log is ``run.zarr`` inside it)
and returns the metrics of its result; the sweep's objective is one of them. The training
modules are imported only when a trial runs, so reading a sweep spec stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

Direction = Literal["maximize", "minimize"]
RUN_LOG = "run.zarr"  # the run log's name inside a trial's folder


@dataclass(frozen=True)
class Trainer:
    name: str
    make_config: Callable[[], Any]  # the config dataclass with its defaults
    validate: Callable[[Any], None]  # range checks; raises hil.config.ConfigError naming the key
    metrics: dict[str, Direction]  # metric of the result -> its natural direction
    run: Callable[[Any, Path], dict[str, float]]  # config, run folder -> metrics
    # metric -> what a config needs for the run to report it: None when it has it, else the fix
    requires: Mapping[str, Callable[[Any], str | None]] = field(default_factory=dict)
    # config -> the board URIs a run of it opens (checked before a sweep's first trial)
    boards: Callable[[Any], list[str]] = lambda cfg: [cfg.device]
    # config -> (config key, value, `Limits` field) of each setting its boards bound from above
    # (checked against the ends of a sweep's space before its first trial)
    bounds: Callable[[Any], tuple[tuple[str, float, str], ...]] = lambda cfg: ()


def _classifier_config() -> Any:
    from hil.config import RunConfig

    return RunConfig()


def _classifier_validate(cfg: Any) -> None:
    from hil.config import validate

    validate(cfg)


def _classifier_run(cfg: Any, run_dir: Path) -> dict[str, float]:
    from hil.runlog import RunLog
    from hil.train_classifier import train_classifier

    run_dir.mkdir(parents=True, exist_ok=True)
    with RunLog.create(run_dir / RUN_LOG, cfg, kind="train-classifier", name=cfg.name) as log:
        res = train_classifier(cfg, log=log)
    res.model.close()  # type: ignore[attr-defined]  # a real board must be free for the next trial
    last = res.history[-1]
    out = {"test_acc": res.test_acc, "train_acc": last.train_acc, "train_loss": last.train_loss}
    if res.val_acc is not None:
        out["val_acc"] = res.val_acc
    return out


def _classifier_boards(cfg: Any) -> list[str]:
    from hil.boards import block_uris

    return block_uris(cfg)


def _classifier_bounds(cfg: Any) -> tuple[tuple[str, float, str], ...]:
    from hil.config import board_bounds

    return board_bounds(cfg)


def _needs_validation(cfg: Any) -> str | None:
    if cfg.data.validation > 0:
        return None
    return "set data.validation = N in [base] (N training images held out, e.g. 500 of mnist5k's 4000)"


def _vae_config() -> Any:
    from hil.vae.config import VAERunConfig

    return VAERunConfig()


def _vae_validate(cfg: Any) -> None:
    from hil.vae.config import validate_vae

    validate_vae(cfg)


def _vae_boards(cfg: Any) -> list[str]:
    from hil.vae.config import vae_boards

    return vae_boards(cfg)


def _vae_bounds(cfg: Any) -> tuple[tuple[str, float, str], ...]:
    from hil.vae.config import vae_board_bounds

    return vae_board_bounds(cfg)


def _vae_run(cfg: Any, run_dir: Path) -> dict[str, float]:
    from hil.runlog import RunLog
    from hil.vae.train import train_vae

    run_dir.mkdir(parents=True, exist_ok=True)
    with RunLog.create(run_dir / RUN_LOG, cfg, kind="train-vae", name=cfg.name) as log:
        res = train_vae(cfg, progress=False, out_dir=run_dir, log=log)
    f = res.final
    return {
        "neg_elbo": f.neg_elbo,
        "recon_mse": f.recon_mse,
        "frechet": f.frechet,
        "energy_per_image_j": f.energy_per_image_j,
        "converged": f.converged,
    }


TRAINERS: Mapping[str, Trainer] = MappingProxyType(
    {
        "classifier": Trainer(
            "classifier",
            _classifier_config,
            _classifier_validate,
            {
                "test_acc": "maximize",
                "val_acc": "maximize",
                "train_acc": "maximize",
                "train_loss": "minimize",
            },
            _classifier_run,
            MappingProxyType({"val_acc": _needs_validation}),
            _classifier_boards,
            _classifier_bounds,
        ),
        "vae": Trainer(
            "vae",
            _vae_config,
            _vae_validate,
            {
                "neg_elbo": "minimize",
                "recon_mse": "minimize",
                "frechet": "minimize",
                "energy_per_image_j": "minimize",
                "converged": "maximize",
            },
            _vae_run,
            boards=_vae_boards,
            bounds=_vae_bounds,
        ),
    }
)
