"""`hil conformance URI`: check a board's firmware against the protocol spec."""

from __future__ import annotations

from pathlib import Path

import typer

from hil.cli.common import to_stdout

_JSON = typer.Option(
    None,
    "--json",
    help="Also write the results to this JSON file; - writes them to stdout, and the check lines to stderr.",
)


def _error(message: str) -> typer.Exit:
    """One line on stderr, exit code 2 (bad input or a board that cannot be opened)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise _error(f"--sizes takes comma-separated integers (e.g. 5,4,3), got {text!r}") from None
    if len(sizes) < 2 or min(sizes) < 1:
        raise _error(f"--sizes needs two or more positive layer sizes (e.g. 5,4,3), got {text!r}")
    return sizes


def register(app: typer.Typer) -> None:
    @app.command()
    def conformance(
        uri: str = typer.Argument(
            ..., help="Device URI: visa://TCPIP0::HOST::5025::SOCKET, serial:///dev/ttyACM0, emulator://..."
        ),
        json_out: Path = _JSON,
        sizes: str = typer.Option("5,4,3", help="Layer sizes of the test network (a bias row per tile)."),
        batch: int = typer.Option(4, min=1, max=1024, help="Samples per settle (and per mvm, at least 16)."),
        reads: int = typer.Option(
            8, min=2, max=1024, help="Conductance reads averaged for the reference weights."
        ),
        repeats: int = typer.Option(
            4, min=2, max=1024, help="Repeats of an mvm or settle to measure its noise."
        ),
        seed: int = typer.Option(0, help="Seed of the test patterns."),
        limit_probes: bool | None = typer.Option(
            None,
            "--limit-probes/--no-limit-probes",
            help="Send the probes that go past a limit only the board's own check stops (a device one "
            "float32 step past g_max, an mvm input one step past clamp_max, a line 1 % and 20 % over its "
            "current limit, a wait one step past max_wait_s): on a board whose firmware lacks that check "
            "or gets it wrong, its devices take them. Default: on for an emulator:// URI only; off for any "
            "other board, the emulator behind `hil emulator serve` included (a board's identity is its own "
            "claim: firmware started from docs/protocol.md's example declares the emulator's), and those "
            "checks are SKIPPED, unverified. --limit-probes sends them: to verify a firmware's own limit "
            "checks on a board whose devices you can spare, or in CI on `hil emulator serve`.",
        ),
    ) -> None:
        """Run the protocol conformance checks for every capability the board declares, one
        line per operation (PASS/FAIL, what was sent, what came back, what the spec says).
        Exit 0 when all pass, 1 when any fails, 2 when the board cannot be opened or the test
        network (--sizes) does not fit its limits. The board is left reset (no topology; the
        test network's conductances stay in its devices) and in its safe state."""
        from drivers import DeviceError, open_device
        from hil.conformance import Options, plan_topology, run_conformance
        from hil.conformance.session import probes_by_default

        probes = probes_by_default(uri) if limit_probes is None else limit_probes
        options = Options(
            sizes=_sizes(sizes),
            batch=batch,
            reads=reads,
            repeats=repeats,
            seed=seed,
            limit_probes=probes,
        )
        try:
            dev = open_device(uri)
        except (DeviceError, OSError, ValueError) as exc:
            raise _error(f"cannot open {uri}: {exc}") from None
        say = (lambda line: typer.echo(line, err=True)) if to_stdout(json_out) else typer.echo
        try:
            plan_topology(dev.info.limits, options)
            say(f"board  {dev.info.identity.idn()}  ({uri})")
            if not probes:
                why = "--no-limit-probes" if limit_probes is False else "not an emulator:// URI"
                say(
                    f"note   limit probes off ({why}): nothing past a limit is sent; --limit-probes sends them"
                )
            report = run_conformance(dev, uri, options, on_check=lambda c: say(c.line()))
        except ValueError as exc:
            raise _error(str(exc)) from None
        finally:
            try:
                dev.reset()  # the test network is nobody's: the next host finds the board unconfigured
            except DeviceError as exc:
                say(f"note   could not reset the board at the end ({type(exc).__name__}: {exc})")
            finally:
                dev.close()
        say(report.summary())
        if to_stdout(json_out):
            typer.echo(report.to_json())
        elif json_out is not None:
            try:
                json_out.write_text(report.to_json())
            except OSError as exc:
                raise _error(f"cannot write --json {json_out}: {exc}") from None
            say(f"results  {json_out}")
        raise typer.Exit(0 if report.ok else 1)
