"""`hil emulator serve`: one emulated board behind real transports (SCPI and framed binary)."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
from typing import TYPE_CHECKING

import typer

from drivers.capabilities import CAPABILITIES, LOCK
from hil.cli.common import SIGINT_EXIT, SIGTERM_EXIT, fail

if TYPE_CHECKING:
    from drivers.base import DeviceInfo

_SET_OPTION = typer.Option(
    None, "--set", help="Board parameter KEY=VALUE (any emulator:// URI parameter); repeatable."
)


def board_uri(preset: str, seed: int, capabilities: str | None = None, sets: list[str] | None = None) -> str:
    """The emulator URI `serve` opens: the preset, the seed, the declared capabilities
    (comma-separated, None: all) and every ``--set KEY=VALUE``, validated (ConfigurationError
    naming a bad parameter) and written in canonical form."""
    from drivers.uri import replace_params

    params = {"preset": preset, "seed": str(seed)}
    if capabilities is not None:
        params["capabilities"] = capabilities
    given: dict[str, str] = {}
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--set takes KEY=VALUE, got {item!r}")
        if key in given:  # as a URI's query: a bound given twice must not become its last value
            raise typer.BadParameter(
                f"--set {key} given twice (--set {key}={given[key]}, --set {key}={value}); keep the one you mean"
            )
        given[key] = params[key] = value
    return replace_params("emulator://", **params)


def served_capabilities(info: DeviceInfo, lock: bool = False) -> list[str]:
    """The board's capabilities as a client of its servers sees them: the board's, in
    CAPABILITIES' order then any others, and ``lock`` where the servers give it an owner."""
    from drivers.wire.payload import LOCK_CAPABILITY

    declared = set(info.capabilities) - {LOCK_CAPABILITY}
    ordered = [c for c in CAPABILITIES if c in declared] + sorted(declared - set(CAPABILITIES))
    return ordered + [LOCK_CAPABILITY] * lock


def banner(info: DeviceInfo, lock: bool = False) -> str:
    """The first line `serve` prints: the board's identity, preset, seed and capabilities as a
    client sees them (`hil info`): the board's, in CAPABILITIES' order then any others, and
    ``lock`` where the servers give the board an owner (`lock`), which CAPABILITIES lacks."""
    caps = ",".join(served_capabilities(info, lock)) or "none"
    return (
        f"board  {info.identity.idn()}  (preset {info.preset}, seed {info.extra.get('seed')}, "
        f"capabilities {caps})"
    )


def served_json(info: DeviceInfo, uris: dict[str, str], lock: bool = False) -> str:
    """`serve --json`'s line: ``identity`` (the *IDN? reply), ``preset``, ``seed``,
    ``capabilities`` (as the banner lists them) and ``uris``, the device URI of each transport
    served (keys as in `hil.testing.TRANSPORTS`: visa-tcp, visa-asrl, serial-pty, serial-socket)."""
    import json

    return json.dumps(
        {
            "identity": info.identity.idn(),
            "preset": info.preset,
            "seed": info.extra.get("seed"),
            "capabilities": served_capabilities(info, lock),
            "uris": {t: uris[t] for t in ENDPOINT_NAMES if t in uris},
        }
    )


ENDPOINT_NAMES = {
    "visa-tcp": "SCPI over TCP (VISA)",
    "visa-asrl": "SCPI over a pty (VISA)",
    "serial-pty": "framed binary over a pty",
    "serial-socket": "framed binary over TCP",
}


def resource_lines(uris: dict[str, str]) -> list[tuple[str, str]]:
    """(what, device URI) for every endpoint that is being served, in a fixed order."""
    return [(what, uris[t]) for t, what in ENDPOINT_NAMES.items() if t in uris]


def register(app: typer.Typer) -> None:
    emulator_app = typer.Typer(help="The behavioural crossbar board emulator.", no_args_is_help=True)

    @emulator_app.command()
    def serve(
        preset: str = typer.Option("rram", help="Board preset: ideal, rram, pcm, ecram."),
        seed: int = typer.Option(0, help="Seed of the board (fabrication and noise)."),
        scpi_port: int = typer.Option(
            5025, min=-1, max=65535, help="TCP port of the SCPI server (0: any free port, -1: none)."
        ),
        serial_pty: bool = typer.Option(
            False, "--serial-pty", help="Also serve on two ptys: SCPI (VISA ASRL) and framed (serial://)."
        ),
        serial_port: int = typer.Option(
            -1, min=-1, max=65535, help="TCP port of the framed server (0: a free port, -1: none)."
        ),
        host: str = typer.Option("127.0.0.1", help="Address to bind; loopback unless you mean otherwise."),
        set_: list[str] | None = _SET_OPTION,
        corrupt_rate: float = typer.Option(
            0.0,
            min=0.0,
            max=1.0,
            help="Framed links: probability of corrupting a frame the board sends (ACKs included). Each link "
            "draws from its own copy of the seed: a reconnection meets the same faults again.",
        ),
        drop_rate: float = typer.Option(
            0.0,
            min=0.0,
            max=1.0,
            help="Framed links: probability of dropping a frame the board sends (ACKs included).",
        ),
        delay_ms: float = typer.Option(
            0.0, min=0.0, help="Delay before every reply (both servers), milliseconds; not counted on exit."
        ),
        ber: float = typer.Option(
            0.0, min=0.0, max=1.0, help="Both servers: bit-error rate of every byte in and out."
        ),
        byte_drop_rate: float = typer.Option(
            0.0, min=0.0, max=1.0, help="Both servers: probability that a byte is lost."
        ),
        late_rate: float = typer.Option(
            0.0,
            min=0.0,
            max=1.0,
            help="Probability that a reply comes --late-ms late (counted as 'delay' on exit).",
        ),
        late_ms: float = typer.Option(
            500.0, min=0.0, help="How late a late reply is (beyond the host's timeout)."
        ),
        reset_rate: float = typer.Option(
            0.0,
            min=0.0,
            max=1.0,
            help="Probability that the board reboots instead of running a settle or program request "
            "(configuration lost, epoch advanced, conductances kept, its owner lock forgotten).",
        ),
        lose_rate: float = typer.Option(
            0.0,
            min=0.0,
            max=1.0,
            help="Probability that the board reboots with its arrays lost instead of running a settle or "
            "program request: as --reset-rate, and the devices come back as fabricated, never programmed, "
            "under a new STATUS arrays_id (what a server killed and started again shows).",
        ),
        close_rate: float = typer.Option(
            0.0,
            min=0.0,
            max=1.0,
            help="Probability that the board hangs up after a request ran, before replying (also after a "
            "command with no reply: the client then finds out on its next send). Over a pty the port stays: "
            "the reply is lost, like a late one.",
        ),
        fault_seed: int = typer.Option(0, help="Seed of the fault injection."),
        threads: int = typer.Option(
            1,
            min=0,
            max=1024,
            help="torch threads for the board's computations (0: torch's default, one per core). 1 (default): a host-iterated settle sends many small products, and on 2 cores torch's default thread count made each 64-256-10 mvm 10 times slower (2.2 vs 21.9 ms per call over serial+socket, batch 16, cores busy).",
        ),
        capabilities: str | None = typer.Option(
            None,
            help="Capabilities of the array the board declares, comma-separated, of "
            + ",".join(CAPABILITIES)
            + " (default: all); e.g. mvm,pulse,program_verify for a board that multiplies but does not "
            "settle. The served board declares "
            + LOCK
            + " as well, whatever this says: its servers keep one owner at a time (docs/protocol.md, "
            "Ownership). So by default a client (hil info) sees " + ",".join((*CAPABILITIES, LOCK)) + ".",
        ),
        max_connections: int = typer.Option(
            16, min=1, max=1024, help="TCP connections each server admits at a time; one more is refused."
        ),
        as_json: bool = typer.Option(
            False,
            "--json",
            help="Print one JSON object on one line instead of the text lines, for scripts: identity, preset, "
            "seed, capabilities and uris (device URI by transport: visa-tcp, visa-asrl, serial-pty, "
            "serial-socket, those served).",
        ),
        idle_timeout: float = typer.Option(
            3600.0,
            min=0.0,
            help="Close a TCP connection with no byte in or out for this many seconds (0: never).",
        ),
        exit_with_parent: bool = typer.Option(
            False,
            "--exit-with-parent",
            help="Stop as on SIGTERM (servers closed, board safe, exit 143) once the process that started "
            "this one is gone, even SIGKILLed: for a test fixture or a script that starts it in the "
            "background (checked every 0.5 s; the parent is the process that ran `hil`, so start it "
            "directly, not through a wrapper that stays behind). A parent that is init (pid 1) at the start "
            "is taken as gone: exit 143 at once, nothing served.",
        ),
    ) -> None:
        """Serve one emulated board until Ctrl-C (SIGINT, exit code 130) or SIGTERM (143), printing the device URIs
        to connect with (`visa://RESOURCE` for pyvisa: drop `visa://`, and the `?check=1` that
        --ber and --byte-drop-rate add: such a client must speak checked mode, docs/protocol.md;
        `serial://PORT` and `serial+socket://HOST:PORT` for the framed protocol: drop the scheme).

        Fault options (docs/reliability.md) make it a noisy, slow or crashing board to try a
        host's recovery against; the same --fault-seed gives the same faults at the same
        requests. The injected faults are counted and printed on exit, by kind (the frame
        faults of the framed links on a line of their own; --delay-ms is not counted)."""
        parent = os.getppid()  # before the slow imports: the parent may go while they run
        if exit_with_parent and parent == 1:
            # adopted by init before it could look: the parent that ran `hil` is gone already (init
            # itself as the parent, e.g. tini in a container, never goes: the option means nothing
            # there). Waiting for init to change would serve for ever; stop as once it is gone
            with contextlib.suppress(OSError):  # its end of a stderr pipe may be closed
                typer.echo(
                    "the parent process is gone (this process's parent is init, pid 1, from the start): "
                    "not serving (--exit-with-parent; under an init that starts `hil` itself, leave it out)",
                    err=True,
                )
            raise typer.Exit(SIGTERM_EXIT)
        # the ranges above pass NaN (no comparison holds for it), and --delay-ms / --late-ms inf:
        # named here by option, where the fault plan would name its own fields (p_reset, delay_s)
        timings = {"--delay-ms": delay_ms, "--late-ms": late_ms}
        rates = {
            "--corrupt-rate": corrupt_rate, "--drop-rate": drop_rate, "--ber": ber,
            "--byte-drop-rate": byte_drop_rate, "--late-rate": late_rate, "--reset-rate": reset_rate,
            "--lose-rate": lose_rate, "--close-rate": close_rate,
        }  # fmt: skip
        for option, value in {**rates, **timings}.items():
            if not math.isfinite(value):
                what = (
                    "a probability in [0, 1]" if option in rates else "a finite number of milliseconds >= 0"
                )
                raise fail(f"{option} takes {what}, got {value}")
        import torch

        from drivers import open_device
        from emulator.server.launch import FaultPlan, Faults, ListenPortTaken, serve

        if threads:  # 0: torch's default, as in every command's --threads
            torch.set_num_threads(threads)
        try:
            device = open_device(board_uri(preset, seed, capabilities, set_))
        except typer.BadParameter:
            raise
        except Exception as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        try:
            plan = FaultPlan(
                ber=ber, drop_rate=byte_drop_rate, p_delay=late_rate, delay_s=late_ms / 1e3,
                p_reset=reset_rate, p_close=close_rate, p_lose=lose_rate, seed=fault_seed,
                link=Faults(p_corrupt=corrupt_rate, p_drop=drop_rate, seed=fault_seed),
                reply_delay_s=delay_ms / 1e3,
            )  # fmt: skip
        except ValueError as exc:
            device.close()
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        if scpi_port < 0 and serial_port < 0 and not serial_pty:
            device.close()
            typer.echo("error: nothing to serve: give --scpi-port, --serial-port or --serial-pty", err=True)
            raise typer.Exit(2)
        try:
            served = serve(
                device,
                plan=plan,
                host=host,
                scpi_port=scpi_port if scpi_port >= 0 else None,
                framed_port=serial_port if serial_port >= 0 else None,
                scpi_pty=serial_pty,
                framed_pty=serial_pty,
                max_connections=max_connections,
                idle_timeout_s=idle_timeout or None,
            )
        except ListenPortTaken as exc:
            option = "--scpi-port" if exc.server == "scpi" else "--serial-port"
            typer.echo(
                f"error: cannot serve: {option} {exc.port}: {exc.host}:{exc.port} is already in use (another "
                f"`hil emulator serve`, or another program, holds it); give another port, or {option} 0 "
                "to pick a free one (--json prints the ports chosen, in its device URIs)",
                err=True,
            )
            raise typer.Exit(2) from None
        except OSError as exc:
            typer.echo(f"error: cannot serve: {exc}", err=True)
            raise typer.Exit(2) from None
        stop = threading.Event()
        if as_json:
            typer.echo(served_json(device.info, served.uris, lock=served.lock is not None))
        else:
            typer.echo(banner(device.info, lock=served.lock is not None))
            for what, uri in resource_lines(served.uris):
                typer.echo(f"{what:<26}{uri}")
        typer.echo("Ctrl-C (SIGINT) or SIGTERM stops the servers.", err=True)
        # exit codes as every command's (README "Scripts and CI"): 143 after SIGTERM, 130 after
        # Ctrl-C, once the servers are stopped and the board is safe
        code = [SIGTERM_EXIT]
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        # a job a non-interactive shell starts in the background inherits SIGINT ignored
        # (`hil emulator serve &` in CI): `kill -INT` must stop it as Ctrl-C does
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            while not stop.wait(0.5):
                if exit_with_parent and os.getppid() != parent:  # reparented: the parent is gone
                    with contextlib.suppress(OSError):  # its end of a stderr pipe may be closed
                        typer.echo(f"the parent process {parent} is gone: stopping the servers", err=True)
                    break
        except KeyboardInterrupt:
            code = [SIGINT_EXIT]
        finally:
            served.close()  # the servers stop, the board goes to its safe state and closes
            with contextlib.suppress(OSError):  # a stderr whose reader is gone (--exit-with-parent)
                if plan.active:
                    typer.echo(f"faults injected: {plan.summary()}", err=True)
                if corrupt_rate or drop_rate:
                    typer.echo(
                        f"frame faults injected (framed links): {served.framed.frame_faults()}", err=True
                    )
        raise typer.Exit(code[0])

    app.add_typer(emulator_app, name="emulator")
