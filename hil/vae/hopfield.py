"""Hopfield VAEs trained by EP on a Device: H-VAE, DH-VAE, TDH-VAE and the shared layered VAE.

Every Hopfield network of the family has the node groups ``x`` (pixels), ``h`` (hidden),
``mu`` and ``lv`` (latent mean and log-variance, `latent.LatentCode`). The encoder pass
clamps ``x`` and reads ``(mu, lv)``; the decoder pass clamps ``mu`` to the sample z and
reads ``x``. One gradient step (fixed eps):

1. encoder free settle -> (mu, log sigma^2); z = mu + sigma * eps;
2. decoder free settle with z clamped -> image mean x_hat; loss = -log p(x|z) + KL;
3. EP on the decoder pass, nudged by d(-log p)/dx_hat, gives the decoder's parameter
   gradients and, as an EP input gradient, dL/dz;
4. through the reparameterisation and the KL this becomes (dL/dmu, dL/dlog sigma^2), the
   nudge of the encoder pass, whose EP gives the encoder's parameter gradients.

In the shared variants (TDH-VAE, shared layered) both passes run on the same network and
their gradients add on the same weights: half the crossbar cells of the separate variant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from drivers import BIAS, Coupling, Device, Equilibrium, SettleBudget, Topology, seeds
from hil.ep import EBBlock, Mode
from hil.gradcheck import cosine
from hil.init import InitBias, init_weights
from hil.vae.latent import LatentCode, Likelihood, kl_normal, reparameterize

Variant = Literal["h-vae", "dh-vae", "tdh-vae", "shared-layered"]
# (weights, biases) that init="auto" and init_bias="auto" give per variant (docs/vae.md, measured
# on the digits with the trainer's defaults, issue 20):
# - mid biases: at zero biases half the units sit on the hard sigmoid's lower kink and the
#   whole-ELBO EP gradient at initialisation has a cosine of 0.35-0.93 at beta 0.2; mid makes it
#   1.0000 on TDH-VAE and DH-VAE and trains them to lower -ELBO. Not the shared layered net: its
#   pixels, free when it decodes, have no bias row, and with mid biases it trained to -ELBO
#   27-30 against 1.6 with zero biases;
# - GOE weights for H-VAE: its decoder tile from the 2 x latent + 1 rows of z, lv and bias has a
#   gaussian_init entry scale of init_scale / 3, whose loop through the 64 hidden units has a
#   gain above 1 (the lv units sit on a rail; the gradient's cosine at init 0.87-0.99 with mid
#   biases); the GOE scales every entry by the whole network (cosine 1.0000).
AUTO_INIT: dict[str, tuple[str, str]] = {
    "h-vae": ("goe", "mid"),
    "dh-vae": ("gaussian", "mid"),
    "tdh-vae": ("gaussian", "mid"),
    "shared-layered": ("gaussian", "zero"),
}
# the node curve that activation="auto" gives per variant (docs/vae.md, docs/neuron.md, issue 20):
# the logistic for the shared layered net, whose unbiased pixels sit on the hard sigmoid's kink
# at the start whatever the biases (whole-ELBO cosine at init 0.72-0.81 there, 0.9995-0.9997
# with the logistic, seeds 0-2), and which trains better with it (test -ELBO 1.30 against 1.92
# nats, mean of seeds 0-2, better on each; measured 2026-12-04); the hard sigmoid elsewhere:
# with mid biases their gradient at init is exact already, and their defaults were tuned with it
AUTO_ACTIVATION: dict[str, str] = {
    "h-vae": "hard_sigmoid",
    "dh-vae": "hard_sigmoid",
    "tdh-vae": "hard_sigmoid",
    "shared-layered": "logistic",
}
VARIANTS: tuple[str, ...] = ("h-vae", "dh-vae", "tdh-vae", "shared-layered")
ENC_IN, ENC_OUT = ("x",), ("mu", "lv")
DEC_IN, DEC_OUT = ("mu",), ("x",)


def _groups(pixels: int, hidden: int, latent: int) -> dict[str, int]:
    return {"x": pixels, "h": hidden, "mu": latent, "lv": latent}


def layered_encoder_topology(
    pixels: int, hidden: int, latent: int, w_max: float = 1.0, **kw: object
) -> Topology:
    """x -> h -> (mu, lv): also the shared layered network, read backwards to decode."""
    couplings = (
        Coupling("W0", ("x", BIAS), ("h",), w_max=w_max),
        Coupling("W1", ("h", BIAS), ("mu", "lv"), w_max=w_max),
    )
    return Topology(_groups(pixels, hidden, latent), couplings, **kw)  # type: ignore[arg-type]


def layered_decoder_topology(
    pixels: int, hidden: int, latent: int, w_max: float = 1.0, **kw: object
) -> Topology:
    """z (the mu group) -> h -> x, with an lv group of free units beside mu (equal sizes)."""
    couplings = (
        Coupling("V0", ("mu", "lv", BIAS), ("h",), w_max=w_max),
        Coupling("V1", ("h", BIAS), ("x",), w_max=w_max),
    )
    return Topology(_groups(pixels, hidden, latent), couplings, **kw)  # type: ignore[arg-type]


def dense_topology(pixels: int, hidden: int, latent: int, tile: str = "W", **kw: object) -> Topology:
    return Topology.dense(_groups(pixels, hidden, latent), tile=tile, **kw)  # type: ignore[arg-type]


def initial_weights(
    topology: Topology, scale: float, bias: str, seed: int, init: str = "gaussian"
) -> dict[str, Tensor]:
    """A block's initial weights (`hil.init.init_weights`), drawn from the stream `EBBlock`
    draws from for `seed`."""
    return init_weights(topology, init, scale, seeds.torch_generator(seed, "ep.init"), bias)


@dataclass
class StepResult:
    loss: float  # batch-mean negative ELBO (nats), with this eps
    nll: float
    kl: float
    grads: dict[str, dict[str, Tensor]]  # per block name, per tile
    encoder_free: Equilibrium
    decoder_free: Equilibrium
    nudged: dict[str, Equilibrium]  # "encoder nudged+", "decoder nudged-", ... (the phases that ran)
    settle_steps: int  # encoder_steps + decoder_steps
    encoder_steps: int  # the encoding settles' steps, free and nudged (one network or two)
    decoder_steps: int  # the decoding settles' steps, free and nudged
    settle_energy_j: float
    converged: bool


class HopfieldVAE:
    """A VAE whose encoder and decoder are EB blocks on Devices (one block when shared)."""

    def __init__(
        self,
        variant: Variant,
        devices: tuple[Device, ...],
        *,
        pixels: int = 64,
        hidden: int = 64,
        code: LatentCode | None = None,
        budget: SettleBudget | None = None,
        gain: float = 1.0,
        w_max: float = 1.0,
        init_scale: float = 0.5,
        init_bias: InitBias | Literal["auto"] = "zero",
        init: str = "gaussian",
        seed: int = 0,
        programming: str = "ideal",
        activation: str = "hard_sigmoid",
        joint_phases: bool = False,
        settle: str = "auto",
        compute: str | torch.device | None = None,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown Hopfield VAE variant {variant!r}; known: {VARIANTS}")
        self.variant = variant
        init = AUTO_INIT[variant][0] if init == "auto" else init
        bias = AUTO_INIT[variant][1] if init_bias == "auto" else init_bias
        activation = AUTO_ACTIVATION[variant] if activation == "auto" else activation
        # what the "auto" settings became (the run log records them: `resolved`)
        self.activation, self.weight_init, self.bias_init = activation, init, bias
        self.code = code or LatentCode()
        self.pixels = pixels
        budget = budget or SettleBudget(max_steps=200, tol=1e-3, dt=0.5)
        kw = {"gain": gain, "budget": budget, "w_max": w_max, "activation": activation}
        d = self.code.units
        shared = variant in ("tdh-vae", "shared-layered")
        need = 1 if shared else 2
        if len(devices) < need:
            raise ValueError(f"{variant} needs {need} device(s), got {len(devices)}")
        if variant in ("dh-vae", "tdh-vae"):
            enc_topo = dense_topology(pixels, hidden, d, **kw)
            dec_topo = dense_topology(pixels, hidden, d, **kw)
        elif variant == "h-vae":
            enc_topo = layered_encoder_topology(pixels, hidden, d, **kw)
            dec_topo = layered_decoder_topology(pixels, hidden, d, **kw)
        else:
            enc_topo = dec_topo = layered_encoder_topology(pixels, hidden, d, **kw)
        self.encoder = EBBlock(
            devices[0],
            enc_topo,
            inputs=ENC_IN,
            outputs=ENC_OUT,
            weights=initial_weights(enc_topo, init_scale, bias, seed, init),
            seed=seed,
            programming=programming,
            joint_phases=joint_phases,
            settle=settle,  # type: ignore[arg-type]
            compute=compute,
        )
        self.decoder = (
            self.encoder
            if shared
            else EBBlock(
                devices[1],
                dec_topo,
                inputs=DEC_IN,
                outputs=DEC_OUT,
                weights=initial_weights(dec_topo, init_scale, bias, seeds.derive(seed, "vae.decoder"), init),
                seed=seeds.derive(seed, "vae.decoder"),
                programming=programming,
                joint_phases=joint_phases,
                settle=settle,  # type: ignore[arg-type]
                compute=compute,
            )
        )

    # --------------------------------------------------------------------------- structure
    @property
    def shared(self) -> bool:
        return self.encoder is self.decoder

    def blocks(self) -> dict[str, EBBlock]:
        return {"net": self.encoder} if self.shared else {"encoder": self.encoder, "decoder": self.decoder}

    def cells(self) -> int:
        """Crossbar cells (differential pairs) over all blocks."""
        return sum(b.topology.cells() for b in self.blocks().values())

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for b in self.blocks().values() for p in b.weights.values()]

    # --------------------------------------------------------------------------- passes
    @property
    def compute(self) -> torch.device:
        """Where the host's arithmetic runs (`EBBlock.compute`; the CPU without one)."""
        return self.encoder.compute or torch.device("cpu")

    def encode(self, x: Tensor, trace: int = 0) -> tuple[Tensor, Tensor, Equilibrium]:
        """Latent mean and log-variance (on `compute`) and the encoder equilibrium."""
        eq = self.encoder.settle({"x": x}, trace=trace)
        states = self.encoder.as_tensor(eq.states["mu"]), self.encoder.as_tensor(eq.states["lv"])
        mu, lv = self.code.stats(*states)
        return mu, lv, eq

    def decode(self, z: Tensor, trace: int = 0) -> tuple[Tensor, Equilibrium, Tensor]:
        """Image mean for latent z (on `compute`), the decoder equilibrium, and ds_z/dz."""
        s_z, dsdz = self.code.clamp_state(z.to(self.compute))
        eq = self.decoder.settle({"mu": s_z}, trace=trace)
        return self.decoder.as_tensor(eq.states["x"]), eq, dsdz

    # --------------------------------------------------------------------------- training
    def step(
        self,
        x: Tensor,
        eps: Tensor,
        likelihood: Likelihood,
        *,
        beta: float = 0.2,
        mode: Mode = "centered",
        trace: int = 0,
    ) -> StepResult:
        """Negative ELBO of the batch and its EP gradients (batch mean), for the noise `eps`;
        `trace` records every settle (free and nudged) every `trace` steps."""
        batch = x.shape[0]
        x, eps = x.to(self.compute), eps.to(self.compute)  # no copy where they are already
        mu, lv, enc = self.encode(x, trace)
        z = reparameterize(mu, lv, eps)
        x_hat, dec, dsdz = self.decode(z, trace)
        nll, kl = likelihood.nll(x, x_hat), kl_normal(mu, lv)
        # decoder pass: the reconstruction loss nudges x; EP gives dL/dW and dL/ds_z
        dec_ep = self.decoder.vjp(
            dec, {"x": likelihood.grad(x, x_hat) / batch}, beta=beta, mode=mode, inputs=DEC_IN, trace=trace
        )
        d_z = self.code.z_grad(dec_ep.input_grads["mu"].to(torch.float32), dsdz)
        sigma = torch.exp(0.5 * lv)
        d_mu = d_z + mu / batch
        d_lv = d_z * eps * 0.5 * sigma + 0.5 * (lv.exp() - 1.0) / batch
        g_mu, g_lv = self.code.state_grads(d_mu, d_lv)
        enc_ep = self.encoder.vjp(
            enc, {"mu": g_mu, "lv": g_lv}, beta=beta, mode=mode, inputs=ENC_IN, trace=trace
        )
        grads: dict[str, dict[str, Tensor]] = {}
        if self.shared:
            grads["net"] = {t: enc_ep.grads[t] + dec_ep.grads[t] for t in enc_ep.grads}
        else:
            grads["encoder"], grads["decoder"] = dict(enc_ep.grads), dict(dec_ep.grads)
        eqs = [enc, dec, enc_ep.first, enc_ep.second, dec_ep.first, dec_ep.second]
        unique = {id(e): e for e in eqs}.values()
        encoder_steps, decoder_steps = enc_ep.settle_steps + enc.steps, dec_ep.settle_steps + dec.steps
        return StepResult(
            loss=float((nll + kl).mean()),
            nll=float(nll.mean()),
            kl=float(kl.mean()),
            grads=grads,
            encoder_free=enc,
            decoder_free=dec,
            nudged={
                f"{name} nudged{'+' if b > 0 else '-'}": eq
                for name, ep in (("encoder", enc_ep), ("decoder", dec_ep))
                for eq, b in zip((ep.first, ep.second), ep.betas, strict=True)
                if b != 0
            },
            settle_steps=encoder_steps + decoder_steps,
            encoder_steps=encoder_steps,
            decoder_steps=decoder_steps,
            settle_energy_j=sum(e.energy_j for e in unique),
            converged=enc.converged and dec.converged,
        )

    def apply(self, grads: dict[str, dict[str, Tensor]]) -> None:
        """Put `grads` on the blocks' parameters (their optimizer steps next)."""
        for name, block in self.blocks().items():
            for tile, p in block.weights.items():
                p.grad = grads[name][tile].to(p.dtype)

    def sync(self) -> None:
        for block in self.blocks().values():
            block.sync()

    # --------------------------------------------------------------------------- reference
    def gradient_check(
        self, x: Tensor, eps: Tensor, likelihood: Likelihood, *, beta: float = 0.2, mode: Mode = "centered"
    ) -> dict[str, float]:
        """The cosine of EP's whole negative-ELBO gradient (`step`, both passes, noise `eps`)
        with autograd through the reference (`reference_loss`: implicit differentiation
        through both settles, float64): per tile (``"encoder.W0"``, ``"net.W"``) and over all
        parameters as one vector (``"all"``). Settle the board to its fixed point (a tight
        `budget`) to check EP rather than the settle."""
        step = self.step(x, eps, likelihood, beta=beta, mode=mode)
        loss, nets = self.reference_loss(x, eps, likelihood)
        loss.backward()
        est, ref, out = [], [], {}
        for name, net in nets.items():
            for tile, p in net.weights.items():
                g = step.grads[name][tile].to(torch.float64)
                out[f"{name}.{tile}"] = cosine(g, p.grad)
                est.append(g.flatten())
                ref.append(p.grad.flatten())
        out["all"] = cosine(torch.cat(est), torch.cat(ref))
        return out

    # --------------------------------------------------------------------------- reference
    def reference_loss(self, x: Tensor, eps: Tensor, likelihood: Likelihood) -> tuple[Tensor, dict]:
        """The same negative ELBO through pure-torch reference networks with autograd
        (implicit differentiation through both settles); returns (loss, {block: DHN})."""
        nets = {name: b.reference(dtype=torch.float64) for name, b in self.blocks().items()}
        enc_net = nets["net"] if self.shared else nets["encoder"]
        dec_net = nets["net"] if self.shared else nets["decoder"]
        x64 = x.to(torch.float64)
        out = enc_net({"x": x64}, outputs=ENC_OUT)
        mu, lv = self.code.stats(out["mu"], out["lv"])
        z = reparameterize(mu, lv, eps.to(torch.float64))
        s_z, _ = self.code.clamp_state(z)
        x_hat = dec_net({"mu": s_z}, outputs=DEC_OUT)["x"]
        loss = (likelihood.nll(x64, x_hat) + kl_normal(mu, lv)).mean()
        return loss, nets
