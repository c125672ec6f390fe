"""Issue 17 item 3: the host stack on a chosen torch device (config key ``compute``).

On a machine without CUDA these tests cover the code paths on the CPU: the key is parsed and
checked with errors that name the fix, an in-process board's URI gets the device, an explicit
``compute=cpu`` (tensors through `Device.settle_tensors`) gives the numbers of the numpy path,
`EBFunction` answers on its input's device and dtype, and a classifier step converts nothing to
numpy between its settles and its gradients; the same for the Hopfield VAE. The tests that
compare CPU and CUDA training run only where torch sees a CUDA device."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drivers import LimitViolation, Topology, open_device
from hil.classifier import Classifier
from hil.compute import ComputeDeviceError, board_uri, resolve_compute
from hil.config import ConfigError, load_config
from hil.ep import EBBlock
from hil.ffebm import FFEBM, EBLayer
from hil.vae.config import VAERunConfig, validate_vae

NO_CUDA = not torch.cuda.is_available()


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------ the key
def test_the_key_is_parsed_and_checked() -> None:
    assert load_config().compute == "cpu"
    # a config is checked for its form only: a run recorded on a GPU machine loads anywhere
    assert load_config(None, ["compute=cuda:1"]).compute == "cuda:1"
    assert load_config(None, ["compute=cuda"]).device.startswith("emulator://")  # the board URI stays
    for bad, match in [("gpu", "compute='gpu': not a torch device; use cpu, cuda or cuda:N"),
                       ("cuda:x", "not a torch device"), ("meta", "runs on cpu or cuda")]:  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            load_config(None, [f"compute={bad}"])
    with pytest.raises(ConfigError, match="compute="):
        validate_vae(VAERunConfig(compute="gpu"))
    assert resolve_compute(None) == resolve_compute("cpu") == torch.device("cpu")


@pytest.mark.skipif(not NO_CUDA, reason="checks the error of a machine without CUDA")
def test_cuda_without_cuda_names_the_fix() -> None:
    with pytest.raises(ComputeDeviceError, match=r"torch sees no CUDA device.*set compute=cpu"):
        resolve_compute("cuda")
    cfg = load_config(None, ["compute=cuda", "model.sizes=[4,3,2]"])
    with pytest.raises(ComputeDeviceError, match="no CUDA device"):
        Classifier(cfg, 4, 2, open_device)  # before any board is opened


def test_an_in_process_board_gets_the_device_a_remote_one_does_not() -> None:
    ideal = "emulator://?preset=ideal&seed=3"
    assert board_uri(ideal, "cpu") == ideal  # cpu is the emulator's default
    if not NO_CUDA:  # the last CUDA device this machine has
        last = torch.cuda.device_count() - 1
        uri = board_uri(ideal, torch.device("cuda", last))
        assert f"device=cuda%3A{last}" in uri or f"device=cuda:{last}" in uri
    own = "emulator://?preset=ideal&seed=3&device=cpu"
    assert board_uri(own, "cpu") == own
    visa = "visa://TCPIP0::127.0.0.1::5025::SOCKET"
    assert board_uri(visa, "cpu") == visa


def test_an_in_process_board_gets_the_device_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """`board_uri` with a CUDA device, on a machine without one (the availability check
    stubbed): the emulator URI gets ``device=``, others keep theirs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    uri = board_uri("emulator://?preset=ideal&seed=3", "cuda:1")
    assert "device=cuda" in uri and "1" in uri.split("device=")[1] and "seed=3" in uri
    keep = "emulator://?preset=ideal&seed=3&device=cpu"
    assert board_uri(keep, "cuda:1") == keep  # the URI's own device wins
    visa = "visa://TCPIP0::127.0.0.1::5025::SOCKET"
    assert board_uri(visa, "cuda:1") == visa  # remote boards: numpy on the wire
    with pytest.raises(ComputeDeviceError, match=r"sees 2 CUDA devices \(cuda:0 .. cuda:1\)"):
        resolve_compute("cuda:2")


# ------------------------------------------------------------------------- the same numbers
def _block(
    compute: str | None, settle: str = "auto", uri: str = "emulator://?preset=ideal&seed=0"
) -> EBBlock:
    return EBBlock.layered(open_device(uri), [12, 8, 4], seed=5, compute=compute, settle=settle)  # type: ignore[arg-type]


@pytest.mark.parametrize("settle", ["board", "host"])
def test_explicit_cpu_gives_the_numbers_of_the_numpy_path(settle: str) -> None:
    """compute=None is the numpy path of the Device API; compute="cpu" hands tensors to
    `Device.settle_tensors` (board settle) or moves the host settle's states to the compute
    device: the same weights, states and EP gradients."""
    g = torch.Generator().manual_seed(1)
    x, grad, target = (
        torch.rand(16, 12, generator=g),
        torch.randn(16, 4, generator=g),
        torch.rand(16, 4, generator=g),
    )
    a, b = _block(None, settle), _block("cpu", settle)
    assert b.tensor_settle is (settle == "board") and not a.tensor_settle
    for t in a.weights:
        torch.testing.assert_close(a.weights[t], b.weights[t], rtol=0, atol=0)
    fa, fb = a.free(x), b.free(x)
    assert isinstance(fa.states["s2"], np.ndarray)
    assert isinstance(fb.states["s2"], torch.Tensor) is (settle == "board")
    for kw in ({"grad": grad, "mode": "centered"}, {"target": target, "mode": "positive"}):
        ra, rb = a.ep(x, free=fa, **kw), b.ep(x, free=fb, **kw)  # type: ignore[arg-type]
        for t in ra.grads:
            torch.testing.assert_close(rb.grads[t], ra.grads[t], rtol=1e-6, atol=1e-7)
        for gr in ra.input_grads:
            torch.testing.assert_close(rb.input_grads[gr], ra.input_grads[gr], rtol=1e-6, atol=1e-7)


def test_a_wrapped_board_speaks_numpy_and_the_states_move_to_the_compute_device() -> None:
    """A board without a tensor path (a wrapper, e.g. a calibrated board; every remote board)
    gets numpy; the block moves its states to the compute device for the same gradients."""
    from drivers.wrapper import DeviceWrapper

    g = torch.Generator().manual_seed(2)
    x, grad = torch.rand(8, 12, generator=g), torch.randn(8, 4, generator=g)
    plain = _block(None)
    wrapped = EBBlock.layered(
        DeviceWrapper(open_device("emulator://?preset=ideal&seed=0")), [12, 8, 4], seed=5, compute="cpu"
    )
    assert wrapped.device.tensor_device is None and not wrapped.tensor_settle
    fa, fb = plain.free(x), wrapped.free(x)
    assert isinstance(fb.states["s2"], np.ndarray)
    ra, rb = plain.ep(x, grad=grad, free=fa), wrapped.ep(x, grad=grad, free=fb)
    for t in ra.grads:
        torch.testing.assert_close(rb.grads[t], ra.grads[t], rtol=1e-6, atol=1e-7)
    with pytest.raises(Exception, match="numpy arrays only"):
        wrapped.device.settle_tensors({"s0": x})


def test_the_tensor_settle_checks_what_settle_checks() -> None:
    dev = open_device("emulator://?preset=ideal&seed=0")
    dev.configure(Topology.layered([4, 3, 2]))
    x = np.random.default_rng(0).uniform(0, 1, (5, 4)).astype(np.float32)
    a, b = dev.settle({"s0": x}), dev.settle_tensors({"s0": torch.from_numpy(x)})
    for gr in a.states:
        np.testing.assert_array_equal(a.states[gr], b.states[gr].numpy())
    with pytest.raises(LimitViolation, match="read-voltage limit on clamp 's0'"):
        dev.settle_tensors({"s0": torch.full((5, 4), 1e9)})
    assert dev.safety().refused == 1
    with pytest.raises(Exception, match="expected shape"):
        dev.settle_tensors({"s0": torch.rand(5, 3)})
    with pytest.raises(Exception, match="NaN"):
        dev.settle_tensors({"s0": torch.full((5, 4), float("nan"))})


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("clamp_low", "read-voltage limit on clamp 's0'"),  # the negative side of the peak
        ("init_inf", "init 's1': contains NaN or infinite"),
        ("target_high", "read-voltage limit on nudge target 's2'"),
        ("grad_nan", "nudge grad 's2': contains NaN or infinite"),
        ("grad_big", "injected nudge current"),  # |beta| x peak past the drive limit
        ("grad_overflow", "injected nudge current .* requested inf"),  # past float32
        ("fine", None),
    ],
)
def test_the_tensor_settle_refuses_what_settle_refuses(case: str, error: str | None) -> None:
    """Every array's extremes are read back at once and checked on the host: the same
    refusals, naming the same array, as the numpy path's checks (`checks.check_settle`)."""
    from drivers import Nudge

    dev = open_device("emulator://?preset=ideal&seed=0")
    dev.configure(Topology.layered([4, 3, 2]))
    lim = dev.info.limits
    x, init = np.full((5, 4), 0.5, np.float32), np.full((5, 3), 0.5, np.float32)
    grad, target, beta = np.ones((5, 2), np.float32), None, 0.5
    if case == "clamp_low":
        x[2, 1] = -2.0 * lim.clamp_max
    elif case == "init_inf":
        init[0, 0] = np.inf
    elif case == "target_high":
        target, grad = np.full((5, 2), 2.0 * lim.clamp_max, np.float32), None
    elif case == "grad_nan":
        grad[1, 1] = np.nan
    elif case == "grad_big":
        grad[3, 0] = -np.float32(2.0 * lim.max_drive / beta)
    elif case == "grad_overflow":
        beta = lim.max_beta
        grad[0, 0] = np.finfo(np.float32).max
    for settle, conv in ((dev.settle, np.asarray), (dev.settle_tensors, torch.from_numpy)):
        nudge = Nudge(beta, None if target is None else conv(target), None if grad is None else conv(grad))
        args = ({"s0": conv(x)}, {"s2": nudge}, {"s1": conv(init)})
        if error is None:
            settle(*args)
        else:
            with pytest.raises(Exception, match=error):
                settle(*args)
    dev.close()


def test_a_classifier_on_explicit_cpu_trains_like_the_default() -> None:
    def run(extra: list[str]) -> list[torch.Tensor]:
        cfg = load_config(None, ["model.sizes=[12,8,4]", "ep.free_steps=15", "ep.nudge_steps=6", *extra])
        clf = Classifier(cfg, 12, 4, open_device)
        g = torch.Generator().manual_seed(0)
        for _ in range(3):
            clf.step(torch.rand(16, 12, generator=g), torch.randint(0, 4, (16,), generator=g))
        out = [p.detach().clone() for p in clf.block.weights.values()]
        clf.close()
        return out

    for u, v in zip(run([]), run(["compute=cpu"]), strict=True):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


# ------------------------------------------------------------------------------ EBFunction
@pytest.mark.parametrize("compute", [None, "cpu"])
def test_ebfunction_answers_on_its_inputs_device_and_dtype(compute: str | None) -> None:
    blk = _block(compute)
    layer = EBLayer(blk, beta=0.1)
    x = torch.rand(6, 12, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert out.dtype == torch.float64 and out.device == x.device and out.shape == (6, 4)
    out.sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float64 and x.grad.device == x.device
    for w in blk.weights.values():
        assert w.grad is not None and w.grad.device == w.device and w.grad.dtype == w.dtype


def test_ffebm_digital_parts_follow_the_compute_device() -> None:
    model = FFEBM.layered([12, 8, 6, 4], 1, lambda k: open_device(f"emulator://?preset=ideal&seed={k}"),
                          between="linear", compute="cpu")  # fmt: skip
    assert all(
        lay.block.compute == torch.device("cpu") and lay.block.tensor_settle for lay in model.eb_layers
    )
    assert {p.device for p in model.parameters()} == {torch.device("cpu")}
    x = torch.rand(5, 12)
    out = model(x)
    assert out.shape == (5, 4) and out.device == x.device


# ------------------------------------------------------------------------ no numpy round trip
class _Counter:
    """Counts numpy conversions of tensors (`Tensor.numpy`, `Tensor.__array__`, which
    `np.asarray(tensor)` calls) and tensors made from numpy (`torch.from_numpy`) made by the
    host stack and the Device layer (code under hil/ and drivers/: where a round trip between
    the host's tensors and the board's would happen). The emulator's own CPU-only numpy views
    inside the board (its clamp cache compares clamps through them, same memory, no copy) are
    the board's business and not counted."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        for owner, name in ((torch.Tensor, "numpy"), (torch.Tensor, "__array__"), (torch, "from_numpy")):
            plain = getattr(owner, name)
            monkeypatch.setattr(owner, name, self._wrap(plain, name))

    def _wrap(self, plain, name: str):
        def counted(*args, **kwargs):
            frame = sys._getframe(1)  # np.asarray(t) calls __array__ from C
            parts = Path(frame.f_code.co_filename).parts
            if ("hil" in parts or "drivers" in parts) and "emulator" not in parts:
                where = "/".join(parts[-2:])
                if where == "drivers/numerics.py" and frame.f_back is not None:
                    # the shared conversion (`drivers.numerics.to_numpy`): name its caller too
                    where += " via " + "/".join(Path(frame.f_back.f_code.co_filename).parts[-2:])
                self.calls.append(f"{name} from {where}")
            return plain(*args, **kwargs)

        return counted


def _step_conversions(monkeypatch: pytest.MonkeyPatch, extra: list[str]) -> tuple[list[str], int]:
    """Numpy conversions during one `Classifier.step`, the programming of its update included
    (`Device.program_stacked`: a board with a tensor path takes the targets as tensors), and
    how many programming calls there were."""
    cfg = load_config(None, ["model.sizes=[12,8,4]", "ep.free_steps=10", "ep.nudge_steps=5", *extra])
    clf = Classifier(cfg, 12, 4, open_device)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 12, generator=g), torch.randint(0, 4, (16,), generator=g)
    clf.step(x, y)  # warm: plans, workspaces
    blk = clf.block
    plain = blk._program
    programs = []

    def program(*args, **kwargs):
        programs.append(1)
        return plain(*args, **kwargs)

    monkeypatch.setattr(blk, "_program", program)
    counter = _Counter(monkeypatch)
    try:
        clf.step(x, y)
    finally:
        monkeypatch.undo()
        clf.close()
    return counter.calls, len(programs)


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_a_classifier_step_converts_nothing_to_numpy(monkeypatch: pytest.MonkeyPatch, loss: str) -> None:
    calls, programs = _step_conversions(monkeypatch, [f"ep.loss={loss}"])
    assert programs == 1  # the update was programmed, and its conversions are counted too
    assert calls == [], f"numpy conversions on the step path: {calls}"


def test_the_counter_sees_the_numpy_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same count on a board without a tensor path (a board that only multiplies: the host
    settle speaks numpy through `Device.mvm`) is not zero: the test above could fail."""
    uri = "device=emulator://?preset=ideal&seed=0&capabilities=mvm,pulse,program_verify,preset_state"
    calls, _ = _step_conversions(monkeypatch, [uri])
    assert any("drivers/numerics.py via hil/ep.py" in c for c in calls), calls
    assert any("hil/host_settle.py" in c for c in calls), calls


# ------------------------------------------------------------------------------------- VAE
def _vae(variant: str, compute: str | None):
    """`tests.test_vae._small_vae` on in-process boards (on `compute`), with short settles."""
    from drivers import SettleBudget
    from tests.test_vae import _small_vae

    n = 1 if variant in ("tdh-vae", "shared-layered") else 2
    uri = board_uri("emulator://?preset=ideal&seed=0", None if compute is None else resolve_compute(compute))
    devices = tuple(open_device(uri) for _ in range(n))
    budget = SettleBudget(max_steps=200, tol=1e-3, dt=0.5)
    return _small_vae(variant, devices, budget=budget, compute=compute), devices


def _vae_steps(variant: str, compute: str | None, steps: int = 3) -> tuple[list[torch.Tensor], list[float]]:
    """A few EP steps of a small Hopfield VAE (Adam on its tiles) on fixed data: the weights
    after them and the losses, both on the CPU."""
    from hil.vae.latent import make_likelihood

    vae, devices = _vae(variant, compute)
    params = vae.parameters()
    opt = torch.optim.Adam(params, lr=3e-3)
    lik = make_likelihood("gaussian", 0.3, 0.01)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        x, eps = torch.rand(16, 64, generator=g), torch.randn(16, 2, generator=g)
        opt.zero_grad()
        r = vae.step(x, eps, lik)
        vae.apply(r.grads)
        opt.step()
        losses.append(r.loss)
    if compute is not None:
        assert all(p.device == resolve_compute(compute) for p in params)
        assert all(b.tensor_settle for b in vae.blocks().values())  # tensors in and out of the board
    out = [p.detach().cpu().clone() for p in params]
    for d in devices:
        d.close()
    return out, losses


@pytest.mark.parametrize("variant", ["tdh-vae", "h-vae"])
def test_a_vae_on_explicit_cpu_trains_like_the_numpy_path(variant: str) -> None:
    """The VAE's blocks take `compute` (`VAERunConfig.compute`): with "cpu" their settles go
    through `Device.settle_tensors` and the step's arithmetic stays in tensors; the weights
    and losses are those of the numpy path bit for bit (the README's main job ends with the
    same weights either way)."""
    (wa, la), (wb, lb) = _vae_steps(variant, None), _vae_steps(variant, "cpu")
    assert la == lb
    for u, v in zip(wa, wb, strict=True):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


def test_a_vae_step_converts_nothing_to_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a compute device, a VAE step (both settles, the four nudged phases, the gradients
    and the programming of the update) makes no numpy round trip in the host stack."""
    from hil.vae.latent import make_likelihood

    vae, devices = _vae("tdh-vae", "cpu")
    lik = make_likelihood("gaussian", 0.3, 0.01)
    x, eps = torch.rand(8, 64), torch.randn(8, 2)
    vae.step(x, eps, lik)  # warm: plans, workspaces
    counter = _Counter(monkeypatch)
    try:
        r = vae.step(x, eps, lik)
        vae.apply(r.grads)
        vae.sync()
    finally:
        monkeypatch.undo()
        for d in devices:
            d.close()
    assert counter.calls == [], f"numpy conversions on the VAE's step path: {counter.calls}"


@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device")
def test_a_vae_trains_on_cuda_as_on_the_cpu() -> None:
    """Same seed, a few TDH-VAE steps with the host stack and the board on cuda and on cpu:
    losses and weights agree to float tolerance."""
    (wc, lc), (wg, lg) = _vae_steps("tdh-vae", "cpu", 4), _vae_steps("tdh-vae", "cuda", 4)
    np.testing.assert_allclose(lg, lc, rtol=1e-4, atol=1e-5)
    for u, v in zip(wg, wc, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- CPU and CUDA
CONV = [  # a small conv ff-EBM on 12 x 12 images: digital conv front, conv EB block, EB head
    "model.kind=ffebm", "model.front=4", "model.channels=[6,8]", "model.pools=[2,1]", "model.kernel=3",
    "model.padding=1", "model.block_layers=2", "model.head=eb", "model.init=goe", "model.init_scale=0.5",
    "model.init_bias=zero", "train.optimizer=adam", "train.lr=[0.003]", "train.lr_digital=0.001",
]  # fmt: skip


@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["dhn", "ffebm", "conv"])
def test_cpu_and_cuda_train_to_the_same_numbers(kind: str) -> None:
    """Same seed, a few classifier steps on cpu and on cuda (host stack and emulator): the
    weights agree to float tolerance (initial weights and signs come from CPU generators;
    CUDA matmuls sum in another order)."""
    features = 144 if kind == "conv" else 64

    def run(compute: str) -> tuple[list[torch.Tensor], list[float]]:
        extra = {"ffebm": ["model.kind=ffebm", "model.block_layers=1"], "conv": CONV}.get(kind, [])
        cfg = load_config(None, ["model.sizes=[64,32,10]", "ep.free_steps=20", "ep.nudge_steps=8",
                                 f"compute={compute}", *extra])  # fmt: skip
        shape = {"image_shape": (1, 12, 12)} if kind == "conv" else {}
        clf = Classifier(cfg, features, 10, open_device, **shape)
        g = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(4):
            loss, _acc, _st = clf.step(
                torch.rand(32, features, generator=g), torch.randint(0, 10, (32,), generator=g)
            )
            losses.append(loss)
        ws = [p.detach().cpu().clone() for blk in clf.blocks() for p in blk.weights.values()]
        if compute != "cpu":
            assert all(p.device.type == "cuda" for blk in clf.blocks() for p in blk.weights.values())
            assert all(blk.device.tensor_device.type == "cuda" for blk in clf.blocks())
        clf.close()
        return ws, losses

    (wc, lc), (wg, lg) = run("cpu"), run("cuda")
    np.testing.assert_allclose(lg, lc, rtol=1e-4, atol=1e-5)
    for u, v in zip(wg, wc, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("tol", [0.0, 1e-4])
def test_cuda_graph_steps_settle_as_the_eager_loop(tol: float) -> None:
    """On a CUDA board the noise-free settle replays its steps as a captured graph: the same
    states as the call-by-call loop, after a re-programming too (the graph reads the weights
    the write refreshed in place), for a fixed step count and for checks every few steps."""
    from drivers.topology import SettleBudget, Topology

    x = torch.rand(32, 16, generator=torch.Generator().manual_seed(0)).cuda()
    runs = []
    for graphs in (True, False):
        with open_device("emulator://?preset=ideal&seed=0&device=cuda") as dev:
            budget = SettleBudget(max_steps=40, tol=tol, dt=0.5, check_every=8)
            topo = dataclasses.replace(Topology.layered([16, 12, 8, 4]), budget=budget)
            dev.configure(topo)
            dev.board.engine.cuda_graphs = graphs  # type: ignore[attr-defined]
            lim = dev.info.limits
            out = []
            for seed in (1, 2):
                rng = np.random.default_rng(seed)
                for c in topo.couplings:
                    r, k = dev.board.tile(c.tile).rows, dev.board.tile(c.tile).cols  # type: ignore[attr-defined]
                    g = rng.uniform(lim.g_min, lim.g_max, (2, r, k)).astype(np.float32)
                    dev.program_stacked(c.tile, torch.from_numpy(g).cuda())
                eq = dev.settle_tensors({"s0": x})
                out.append([eq.states[g].clone() for g in ("s1", "s2", "s3")] + [torch.tensor(eq.steps)])
            plans = [p for _, p in dev.board.engine.planner.plans.values()]  # type: ignore[attr-defined]
            graphed = [g is not None for p in plans for w in p.workspaces.values() for g in w.graphs.values()]
            assert (sum(graphed) > 0) == graphs
            runs.append(out)
    for a, b in zip(runs[0], runs[1], strict=True):
        for u, v in zip(a, b, strict=True):
            torch.testing.assert_close(u.cpu(), v.cpu(), rtol=0, atol=1e-6)
    assert not torch.allclose(runs[0][0][0], runs[0][1][0])  # the second weights settle elsewhere


@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device")
def test_boards_on_one_gpu_settle_from_threads_while_one_captures() -> None:
    """Two CUDA boards settled from two threads at once, each capturing its graphs on its
    first settles while the other launches work: the same states as settled one at a time."""
    import threading

    from drivers.topology import Topology

    x = torch.rand(32, 16, generator=torch.Generator().manual_seed(1)).cuda()

    def settle_many(dev, out: list) -> None:
        for _ in range(5):
            out.append(dev.settle_tensors({"s0": x}).states["s2"].clone())

    def boards():
        devs = [open_device(f"emulator://?preset=ideal&seed={k}&device=cuda") for k in (0, 1)]
        for k, dev in enumerate(devs):
            dev.configure(Topology.layered([16, 12, 4]))
            lim = dev.info.limits
            for tile, shape in (("W0", (2, 17, 12)), ("W1", (2, 13, 4))):
                g = np.random.default_rng(k).uniform(lim.g_min, lim.g_max, shape).astype(np.float32)
                dev.program_stacked(tile, torch.from_numpy(g).cuda())
        return devs

    alone: list[list[torch.Tensor]] = [[], []]
    for dev, out in zip(boards(), alone, strict=True):
        settle_many(dev, out)
        dev.close()
    together: list[list[torch.Tensor]] = [[], []]
    devs = boards()
    threads = [threading.Thread(target=settle_many, args=(d, o)) for d, o in zip(devs, together, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for dev in devs:
        dev.close()
    for a, b in zip(alone, together, strict=True):
        assert len(b) == 5
        for u, v in zip(a, b, strict=True):
            torch.testing.assert_close(v, u, rtol=0, atol=1e-6)
