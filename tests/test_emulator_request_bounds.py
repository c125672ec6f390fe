"""An emulated board declares the request bounds a URI gives it (`emulator.periphery.
REQUEST_BOUNDS`: max_batch, max_verify_iters, max_wait_s, max_gain, max_w_max, max_beta,
max_drive), so a stack tested in CI against the emulator meets the limits its own chip
declares: ``emulator://?preset=rram&max_batch=256&max_w_max=1``. Before, only tests that
patched a board's private limits could, and the URI refused the names."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from drivers import Limits, LimitViolation, SettleBudget, Topology, open_device
from drivers.errors import ConfigurationError
from emulator.periphery import REQUEST_BOUNDS
from emulator.server.launch import serve
from hil.cli import app

SET = {"max_batch": 8, "max_verify_iters": 5, "max_wait_s": 0.5, "max_gain": 2.0, "max_w_max": 1.0,
       "max_beta": 0.5, "max_drive": 10.0}  # fmt: skip
URI = "emulator://?preset=ideal&seed=0&" + "&".join(f"{k}={v}" for k, v in SET.items())


def test_a_uri_sets_every_request_bound_the_board_declares_over_the_wire() -> None:
    assert set(SET) == set(REQUEST_BOUNDS)
    served = serve(URI, framed_port=None, scpi_pty=False, framed_pty=False)
    try:
        with open_device(served.uris["visa-tcp"]) as dev:
            limits = dev.info.limits
            assert {k: getattr(limits, k) for k in SET} == SET
            dev.configure(Topology.layered([3, 2]))
            with pytest.raises(LimitViolation, match="batch size of mvm input"):
                dev.mvm("W0", np.zeros((9, 4), np.float32))  # refused on the host
            assert dev.mvm("W0", np.zeros((8, 4), np.float32)).shape == (8, 2)
            with pytest.raises(LimitViolation, match="w_max"):
                dev.configure(Topology.layered([3, 2], w_max=1.5))
    finally:
        served.close()


@pytest.mark.parametrize("transport", ["serial-socket", "visa-tcp"])
def test_the_board_itself_keeps_a_uri_bound_and_passes_conformance(transport: str) -> None:
    """`hil conformance` probes max_batch and max_batch + 1 and a wait past max_wait_s on the
    board itself (unchecked by the host): a board declaring the URI's bounds refuses past them
    and runs up to them. Its verified writes ask for at most the board's max_verify_iters
    rounds: they asked for 20 whatever the board declared, and a board declaring 5 failed
    program, program verify, mvm and mvm transpose (refused on the host)."""
    served = serve(URI, scpi_pty=False, framed_pty=False)
    try:
        result = CliRunner().invoke(app, ["conformance", served.uris[transport], "--limit-probes"])
        assert result.exit_code == 0, result.stdout
        assert "FAIL" not in result.stdout
        for line in ("PASS  program verify W0", "max_iters=5", "PASS  mvm transpose"):
            assert line in result.stdout, line
        if transport == "serial-socket":
            assert "PASS  unchecked batch limit" in result.stdout
            assert "PASS  unchecked wait limit" in result.stdout
        assert served.device.safety().violations == 0
    finally:
        served.close()


@pytest.mark.parametrize(
    "param", ["max_batch=0", "max_batch=1.5", "max_verify_iters=0", "max_wait_s=0", "max_gain=nan",
              "max_w_max=-1", "max_beta=inf", "max_drive=0"],
)  # fmt: skip
def test_a_bound_no_board_could_declare_is_refused_naming_it(param: str) -> None:
    with pytest.raises(ConfigurationError, match=param.split("=")[0]) as err:
        open_device(f"emulator://?preset=ideal&{param}")
    assert "unknown emulator URI parameter" not in str(err.value)  # a known one, out of its range


def test_the_defaults_are_those_of_limits_and_keep_the_boards_fingerprint() -> None:
    default = open_device("emulator://?preset=rram&seed=0")
    same = open_device(f"emulator://?preset=rram&seed=0&max_batch={Limits.max_batch}")
    other = open_device("emulator://?preset=rram&seed=0&max_batch=256")
    for f in dataclasses.fields(Limits):
        if f.name in REQUEST_BOUNDS:
            assert getattr(default.info.limits, f.name) == f.default
    assert default.board.configuration == same.board.configuration  # type: ignore[attr-defined]
    # a calibration record made on the default board is not taken for the narrower one
    assert other.board.configuration != default.board.configuration  # type: ignore[attr-defined]


def test_hil_info_shows_the_declared_bounds() -> None:
    result = CliRunner().invoke(app, ["info", URI])
    assert result.exit_code == 0, result.output
    lines = {line[:13].strip(): line[14:] for line in result.output.splitlines()}
    work = lines["work bounds"]
    assert work.startswith("batch 8 samples") and "5 write-verify rounds" in work and "wait 0.5 s" in work
    assert lines["scale bounds"] == (
        "gain at most 2, w_max at most 1, nudge |beta| at most 0.5, injected current |beta grad| at most 10"
    )


@pytest.mark.parametrize("tensors", [False, True], ids=["numpy", "tensors"])
def test_centered_ep_on_a_board_that_declares_a_nudge_beta_below_one(tensors: bool) -> None:
    """The two centered phases settle as one over the doubled batch with one nudge; it carried
    beta 1 and the error current beta grad folded in, so a board declaring max_beta 0.5
    refused every EP step whatever ep.beta was (0.2 here). It now carries the phase's |beta|
    there, and gives the gradients of a board that takes beta 1."""
    from hil.ep import EBBlock

    x = torch.linspace(0.05, 0.95, 6 * 5).reshape(6, 5)
    grad = torch.linspace(-1, 1, 6 * 3).reshape(6, 3)
    gen = torch.Generator().manual_seed(0)
    w = {"W0": 0.4 * torch.randn(6, 4, generator=gen), "W1": 0.4 * torch.randn(5, 3, generator=gen)}
    topo = Topology.layered([5, 4, 3], budget=SettleBudget(max_steps=40, tol=0.0))
    results = []
    for uri in ("emulator://?preset=ideal&seed=0", "emulator://?preset=ideal&seed=0&max_beta=0.5"):
        with open_device(uri) as dev:
            blk = EBBlock(
                dev, topo, weights={k: v.clone() for k, v in w.items()}, compute="cpu" if tensors else None
            )
            assert blk.tensor_settle == tensors
            for beta in (0.2, 0.05):
                results.append(blk.ep(x, grad=grad, beta=beta).grads)
            assert dev.safety().refused == 0
    for default, narrow in zip(results[:2], results[2:], strict=True):
        for k in ("W0", "W1"):
            np.testing.assert_allclose(narrow[k].numpy(), default[k].numpy(), rtol=1e-5, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("command", [["classifier"], ["vae", "--model", "tdh-vae"]], ids=["cls", "vae"])
@pytest.mark.parametrize(
    ("bound", "key", "value"),
    [
        ("max_gain=0.5", "model.gain", "1"),
        ("max_w_max=0.5", "model.w_max", "1"),
        ("max_beta=0.1", "ep.beta", "0.2"),
    ],
)
def test_a_config_past_what_the_board_declares_is_refused_naming_its_key(
    tmp_path, command: list[str], bound: str, key: str, value: str
) -> None:  # type: ignore[no-untyped-def]
    """Before, gain and w_max were refused at the first configure naming `Topology.gain` and
    the coupling, and ep.beta at the first nudged settle, after the run log was made, naming
    only the request: the config key is what a user changes."""
    uri = f"emulator://?preset=ideal&seed=0&{bound}"
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", *command, "--out", str(out), "--set", f"device={uri}"])
    assert result.exit_code != 0
    assert f"{key} = {value}, but the board at {uri} declares {bound.replace('=', ' ')}" in result.output
    assert f"set {key} to at most {bound.split('=')[1]}" in result.output
    assert not out.exists()  # refused before a run log was made


@pytest.mark.parametrize(
    ("command", "key", "value"),
    [
        (["classifier"], "ep.free_steps", "300"),
        (["classifier"], "ep.nudge_steps", "300"),
        (["vae", "--model", "tdh-vae"], "ep.steps", "1600"),  # the VAE's default
        (["vae", "--model", "h-vae"], "ep.steps", "1600"),
    ],
    ids=["cls-free", "cls-nudge", "tdh-vae", "h-vae"],
)
@pytest.mark.parametrize("caps", ["", "&capabilities=mvm,pulse,program_verify"], ids=["settle", "mvm-only"])
def test_settle_steps_past_the_boards_max_settle_steps_are_refused_naming_the_key(
    tmp_path, command: list[str], key: str, value: str, caps: str
) -> None:  # type: ignore[no-untyped-def]
    """Before, a board declaring max_settle_steps=200 refused these at the first configure with
    'give the settle budget at most 200 steps (SettleBudget.max_steps)': an internal, not the
    key a user sets (the VAE's default ep.steps is 1600, past it)."""
    uri = f"emulator://?preset=ideal&seed=0&max_settle_steps=200{caps}"
    out = tmp_path / "run"
    args = ["train", *command, "--out", str(out), "--set", f"device={uri}"]
    if key != "ep.steps":
        args += ["--set", f"{key}={value}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0
    assert f"{key} = {value}, but the board at {uri} declares max_settle_steps 200" in result.output
    assert f"set {key} to at most 200" in result.output
    assert "SettleBudget" not in result.output
    assert not out.exists()  # refused before a run log was made
