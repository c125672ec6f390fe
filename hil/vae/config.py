"""The configuration of `hil train vae` (TOML sections [model], [ep], [likelihood], [train], [eval])."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from drivers.activation import Activation
from drivers.errors import ConfigurationError
from hil.config import (
    MAX_BATCH,
    MAX_EPOCHS,
    MAX_INIT_SCALE,
    ConfigError,
    DataConfig,
    LogConfig,
    check_compute,
    check_data,
    check_ep_beta,
    check_log,
    check_scales,
    check_settle_steps,
)

# declared bounds on one evaluation's work: noise draws of the test -ELBO (each settles the whole
# test set twice) and generated images of the Frechet distance (the default 360: the digits' test set)
MAX_EVAL_DRAWS = 1024
MAX_EVAL_SAMPLES = 65_536
# declared bounds of the latent read-out's scales: log sigma^2 within +-MAX_LOG_VAR (sigma from
# e^-10 to e^10; an lv_max of 1000 overflowed exp() and the encoder's nudge was NaN), |mu| up to
# MAX_MU_SCALE / 2, and the likelihood's sigma (the reconstruction nudge is 1 / sigma^2)
MAX_LOG_VAR = 20.0
MAX_MU_SCALE = 100.0
SIGMA_RANGE = (1e-3, 1e3)


@dataclass
class VAEModelConfig:
    variant: Literal["f-vae", "h-vae", "dh-vae", "tdh-vae", "shared-layered"] = "tdh-vae"
    hidden: int = 64  # hidden units (h group; the hidden layer of F-VAE)
    latent: int = 4  # latent dimensions (mu and lv groups have this many units each)
    gain: float = 1.0
    # the node curve of the Hopfield variants (drivers.activation, docs/neuron.md), or auto: the
    # logistic for shared-layered, the hard sigmoid for the others (hil.vae.hopfield.AUTO_ACTIVATION)
    activation: str = "auto"
    w_max: float = 1.0
    init_scale: float = 0.5
    # biases at the start of the Hopfield variants: mid (every biased unit's drive in the middle
    # of the linear range, hil.init.centre_biases), zero (as before issue 20) or auto (mid, but
    # zero for shared-layered); weights: gaussian (N(0, init_scale^2 / rows) per tile), goe (one
    # symmetric matrix over all nodes, hil.init.goe_init) or auto (goe for h-vae, else
    # gaussian). What auto picks and why: hil.vae.hopfield.AUTO_INIT, docs/vae.md
    init_bias: Literal["auto", "zero", "mid"] = "auto"
    init: Literal["auto", "gaussian", "goe"] = "auto"
    mu_scale: float = 3.0  # mu = mu_scale (s_mu - 1/2): z beyond +-mu_scale/2 is clipped when clamped
    lv_min: float = -6.0  # log sigma^2 = lv_min + (lv_max - lv_min) s_lv
    lv_max: float = 1.0
    copies: int = 1  # units per latent dimension in the Hopfield variants (population code)


@dataclass
class VAEEPConfig:
    beta: float = 0.2
    mode: Literal["centered", "positive", "negative", "random"] = "centered"
    steps: int = 1600  # settle budget per phase (a cap: most settles stop far earlier, at tol)
    tol: float = 3e-3  # converged: max |rho(u) - s| over every node of the batch below this
    # the analog settle's step: the board runs it while the settle converges and falls back
    # to its stability bound (0.39-0.5 on TDH-VAE's decoding settles) where it stalls
    # (emulator.settle_plan.SettlePlanner.step_sizes). 0.8 against 0.5 on TDH-VAE, seeds 0-2:
    # 44 % fewer decoder steps, test -ELBO 1.42 against 1.36 on average (docs/vae.md)
    dt: float = 0.8
    programming: Literal["ideal", "verify", "pulsed", "mixed"] = "ideal"  # docs/programming.md
    # where settles run: board, host (iterated through the board's mvm) or auto (board if it can)
    settle: Literal["auto", "board", "host"] = "auto"
    # both nudged phases as one settle over the doubled batch (EBBlock.joint_phases): faster and
    # its gradients as good or better, but off by default here: over seeds 0-2 TDH-VAE trained
    # with it ended worse on 2 of 3 on the ideal board (by 0.2-0.3 nats; the third a tie) and on
    # all 3 on rram with mixed writes (28.9 vs 8.6, 45.0 vs 7.0, 116 vs 110); see docs/vae.md
    joint_phases: bool = False


@dataclass
class LikelihoodConfig:
    kind: Literal["gaussian", "bernoulli"] = "gaussian"
    sigma: float = 0.3
    eps: float = 0.01


@dataclass
class VAETrainConfig:
    epochs: int = 40
    batch_size: int = 32
    lr: float = 3e-3
    schedule: Literal["cosine", "none"] = "cosine"
    seed: int = 0


@dataclass
class EvalConfig:
    eps_draws: int = 4  # noise draws averaged in the test negative ELBO
    samples: int = 360  # generated images for the Frechet distance
    every: int = 0  # evaluate on the test set every N epochs (0: only at the end)


@dataclass
class VAERunConfig:
    name: str = "vae"
    device: str = "emulator://?preset=ideal&seed=0"  # the board's URI
    # h-vae and dh-vae: the encoder's and the decoder's boards, in that order. Empty: both from
    # `device`, which an emulator:// URI can give (two in-process boards) and a lab board's
    # URI cannot (one physical board holds one network: the two networks' tiles share names)
    devices: list[str] = field(default_factory=list)
    # torch device of the host's arithmetic and of an in-process emulator board: cpu | cuda |
    # cuda:N (`hil.compute`; the classifier's key of the same name). The blocks' weights, EP
    # gradients and settles' tensors live there; evaluation metrics are computed on the CPU.
    compute: str = "cpu"
    calibration: str = ""  # calibration record (hil calibrate ... --out cal.zarr) applied to the board
    # the run folder goes under here (as VARIANT; `hil train vae --out DIR` names the run folder
    # itself, and its run log records DIR's parent here: the config says where the run went)
    out: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: VAEModelConfig = field(default_factory=VAEModelConfig)
    ep: VAEEPConfig = field(default_factory=VAEEPConfig)
    likelihood: LikelihoodConfig = field(default_factory=LikelihoodConfig)
    train: VAETrainConfig = field(default_factory=VAETrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


TWO_BOARDS = ("h-vae", "dh-vae")  # variants whose encoder and decoder are two networks on two boards


def vae_board_bounds(cfg: VAERunConfig) -> tuple[tuple[str, float, str], ...]:
    """The settings of a VAE run that each of its boards bounds from above (config key, value,
    `Limits` field): checked as each board opens and by `hil sweep` before any trial runs
    (ep.beta twice: the nudge strength, max_beta, and the current it injects, max_drive)."""
    return (
        ("model.gain", cfg.model.gain, "max_gain"),
        ("model.w_max", cfg.model.w_max, "max_w_max"),
        ("ep.beta", cfg.ep.beta, "max_beta"),
        ("ep.steps", cfg.ep.steps, "max_settle_steps"),
        # the nudge is the grad scaled to a peak of 1 (`EBBlock.vjp`): it injects beta itself
        ("ep.beta", cfg.ep.beta, "max_drive"),
    )


def vae_boards(cfg: VAERunConfig) -> list[str]:
    """The board URIs of the variant: none for f-vae, one for tdh-vae and the shared layered
    net, the encoder's and the decoder's for h-vae and dh-vae (`devices`, else `device` twice
    where it names an emulator: two in-process boards)."""
    variant = cfg.model.variant
    if variant == "f-vae":
        return []
    if variant not in TWO_BOARDS:
        return [cfg.device]
    return list(cfg.devices) if cfg.devices else [cfg.device, cfg.device]


def _check_boards(cfg: VAERunConfig) -> None:
    variant, devices = cfg.model.variant, cfg.devices
    if devices and variant not in TWO_BOARDS:
        raise ConfigError(
            f"devices: {variant} runs on one board (`device`); `devices` names the two boards of "
            f"{' and '.join(TWO_BOARDS)}: drop it"
        )
    if devices and (len(devices) != 2 or not all(isinstance(u, str) and u.strip() for u in devices)):
        raise ConfigError(
            f"devices: {variant} needs the encoder's and the decoder's board URIs, two non-empty "
            f"strings, got {devices!r}"
        )
    if variant in TWO_BOARDS and not devices and not cfg.device.startswith("emulator://"):
        raise ConfigError(
            f"{variant} puts its encoder and decoder on two boards, and device={cfg.device!r} names one "
            "physical board, which cannot hold both (their tiles share names: the decoder's writes "
            'would overwrite the encoder\'s): give both, --set \'devices=["URI1","URI2"]\' '
            "(encoder's, then decoder's), or train tdh-vae, whose one network is both"
        )


def validate_vae(cfg: VAERunConfig) -> None:
    m, e, t = cfg.model, cfg.ep, cfg.train
    check_compute(cfg.compute)
    _check_boards(cfg)
    check_log(cfg.log)
    check_data(cfg.data)
    checks = (
        ("model.hidden", m.hidden),
        ("model.latent", m.latent),
        ("model.copies", m.copies),
    )
    for key, value in checks:
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    check_settle_steps("ep.steps", e.steps)
    check_ep_beta(e.beta)
    if not 0 < e.dt <= 1:
        raise ConfigError(f"ep.dt: must be in (0, 1], got {e.dt}")
    if not -MAX_LOG_VAR <= m.lv_min < m.lv_max <= MAX_LOG_VAR:
        raise ConfigError(
            f"model.lv_min < model.lv_max, both within +-{MAX_LOG_VAR:g} (log sigma^2 of the latent, a "
            f"declared bound; at 1000 sigma overflowed and the nudge was NaN), got {m.lv_min}..{m.lv_max}"
        )
    if not 0 < m.init_scale <= MAX_INIT_SCALE:
        raise ConfigError(
            f"model.init_scale: the initial weights' scale, in (0, {MAX_INIT_SCALE:g}], got {m.init_scale}"
        )
    check_scales(m.gain, m.w_max)
    if not 0 < m.mu_scale <= MAX_MU_SCALE:
        raise ConfigError(f"model.mu_scale: in (0, {MAX_MU_SCALE:g}] (default 3), got {m.mu_scale:g}")
    try:
        if m.activation != "auto":
            Activation.parse(m.activation)
    except ConfigurationError as exc:
        raise ConfigError(f"model.activation: {exc} (or auto: the variant's default)") from None
    if t.epochs < 1 or t.batch_size < 1 or t.lr <= 0:
        raise ConfigError("train.epochs, train.batch_size >= 1 and train.lr > 0 required")
    if t.epochs > MAX_EPOCHS or t.batch_size > MAX_BATCH:
        raise ConfigError(
            f"train.epochs at most {MAX_EPOCHS} and train.batch_size at most {MAX_BATCH} (declared bounds "
            f"on the run's work), got {t.epochs} and {t.batch_size}"
        )
    if cfg.data.validation:
        raise ConfigError(
            "data.validation: the VAE trainer holds out no validation split (the classifier does); "
            "leave it at 0"
        )
    lo, hi = SIGMA_RANGE
    if not lo <= cfg.likelihood.sigma <= hi:
        raise ConfigError(
            f"likelihood.sigma: in [{lo:g}, {hi:g}] (the reconstruction nudge is 1 / sigma^2; default 0.3), "
            f"got {cfg.likelihood.sigma:g}"
        )
    if not 0 < cfg.likelihood.eps < 0.5:
        raise ConfigError(f"likelihood.eps: must be in (0, 0.5), got {cfg.likelihood.eps}")
    ev = cfg.eval
    if not (1 <= ev.eps_draws <= MAX_EVAL_DRAWS and 2 <= ev.samples <= MAX_EVAL_SAMPLES and ev.every >= 0):
        raise ConfigError(
            f"eval.eps_draws in [1, {MAX_EVAL_DRAWS}], eval.samples in [2, {MAX_EVAL_SAMPLES}] (declared "
            "bounds on an evaluation's work) and eval.every >= 0 (0: only at the end) required, got "
            f"{ev.eps_draws}, {ev.samples} and {ev.every}"
        )
