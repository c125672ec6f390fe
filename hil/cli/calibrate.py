"""`hil calibrate`: run a calibration session on a board and write its record and report."""

from __future__ import annotations

import math
import re
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from calibration.routines import ENDURANCE_SHARE, FALLBACK_PULSE_BUDGET, PULSE_BUDGET_MAX, ROUTINES
from hil.cli.common import fail, show_progress, user_errors

if TYPE_CHECKING:
    from tqdm import tqdm

    from calibration import CalibrationRecord
    from drivers import Limits

# Node channels a default session calibrates: every node of the default networks of `hil train
# classifier` and `hil gradcheck` (64-256-10: 330) and `hil train vae` (TDH-VAE 64+64+4+4: 136),
# with room for wider ones. The channel count sets the cost of the DAC and state-ADC routines,
# mostly the state-ADC routine's host reads (96 levels x 32 reads of each 1 x 8 reference row):
# on the rram emulator (`--routines adc,dac`, seed 0, one torch thread, AMD EPYC 2 cores,
# 2026-12-07) they took 24.4 s for 512 channels and 8.2 s for 136 at load average 1.7-3.0
# (42.8 s and 11.9 s before that day's read-path shortcuts, run in turns), and 23-65 s for 512
# at load 3.8-5.9 (another job on the cores).
DEFAULT_CHANNELS = 512

_OUT = typer.Option(Path("cal.zarr"), "--out", help="Calibration record (Zarr store) to write.")
_OVERWRITE = typer.Option(
    False,
    "--overwrite",
    help="Replace an existing record at --out (and its PNG pages) once the new one is complete; a "
    "session stopped part-way writes its partial record beside it (NAME.partial.zarr).",
)
_PNG = typer.Option(
    None,
    help="PNG report path (default: next to --out, .png); a record of several tiles adds a page per "
    "further tile, NAME-tileK.png.",
)
_CHECK = typer.Option(None, help="Instead of calibrating, run the quick drift check of this existing record.")


class Bars:
    """One tqdm bar per stage, created on a stage's first report and closed at its end."""

    def __init__(self) -> None:
        self.bars: dict[str, tqdm] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        bar = self.bars.get(stage)
        if bar is None:
            from tqdm import tqdm

            bar = self.bars[stage] = tqdm(total=total, desc=f"{stage:<10}", leave=True, dynamic_ncols=True)
        bar.total = total
        bar.n = min(done, total)
        bar.refresh()
        if done >= total:
            bar.close()
            del self.bars[stage]

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


class StageLines:
    """`--no-progress`, and the default when stderr is not a terminal: one line per stage as it
    ends, with its time (for logs and CI, where redrawn bars pile up as hundreds of lines)."""

    def __init__(self) -> None:
        self.started: dict[str, float] = {}
        # stages run one after another, and a routine reports its first step only once it is
        # done: a stage is timed from the end of the one before (or from the start)
        self.last_end = time.perf_counter()

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        start = self.started.setdefault(stage, self.last_end)
        if done >= total:
            typer.echo(f"{stage:<10} done in {now - start:.1f} s")
            del self.started[stage]
            self.last_end = now

    def close(self) -> None:
        self.started.clear()


def _parse_tiles(tiles: str | None, tile_size: int) -> tuple[tuple[int, int], ...]:
    if not tiles:
        return ((tile_size, tile_size),)
    out = []
    for part in tiles.split(","):
        try:
            rows, cols = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise ValueError(
                f"--tiles takes ROWSxCOLS[,ROWSxCOLS...] (e.g. 64x64,65x10), got {part!r}"
            ) from None
        if rows < 1 or cols < 1:
            raise ValueError(f"--tiles: a tile needs at least 1 row and 1 column, got {part!r}")
        out.append((rows, cols))
    return tuple(out)


def _check_tiles_fit(shapes: tuple[tuple[int, int], ...], limits: Limits, tiles: str | None = None) -> None:
    """Refuse, in the terms of --tiles (or of --tile-size, where `tiles` is not given), tiles
    the board cannot hold (the session would stop at its first configure, naming its own
    internal tiles)."""
    rows, cols = limits.tile_rows_max, limits.tile_cols_max
    for r, c in shapes:
        if r > rows or c > cols:
            if not tiles:  # the square tile of --tile-size (default 64)
                raise ValueError(
                    f"--tile-size {r}: this board's tiles hold at most {rows} rows x {cols} columns; "
                    f"pass --tile-size {min(rows, cols)} (or --tiles {min(r, rows)}x{min(c, cols)})"
                )
            raise ValueError(
                f"--tiles {r}x{c}: this board's tiles hold at most {rows} rows x {cols} columns (a "
                "network's larger couplings are split over several tiles: calibrate those)"
            )
    if len(shapes) > limits.max_tiles:
        raise ValueError(f"--tiles names {len(shapes)} tiles; this board holds {limits.max_tiles}")


def _line_current_hint(exc: Exception, limits: Limits | None) -> str:
    """What to add to a refusal over the line-current limit during a calibration: the fix the
    check names (smaller inputs, more tiles) is a network's; a calibration's is smaller tiles."""
    from drivers.errors import LimitViolation

    if limits is None or not isinstance(exc, LimitViolation) or "line current" not in str(exc):
        return ""
    per = limits.g_max * limits.v_read  # one device at the top of the window, read
    fit = limits.max_line_current_a / per if per > 0 else math.inf
    most = (
        f" (at most {int(fit)} devices at g_max read at v_read fit this board's line limit)"
        if fit < 1e9
        else ""
    )
    return f"; for a calibration, a smaller --tile-size (or --tiles ROWSxCOLS) puts fewer devices on each line{most}"


_TOO_FEW_CHANNELS = re.compile(r"topology needs (\d+) converter channels.*?the board has (\d+) channels")


def _channels_needed(routine: str, shapes: tuple[tuple[int, int], ...]) -> int | None:
    """Converter channels the network of `routine` needs on tiles `shapes` (None: a routine
    whose network is the node channels'): mvm drives the first tile's rows and columns at
    once, stuck/gmap/pulse every tile's (`tile_topology`), settle a layered
    rows-cols-min(cols, 32) (`calibration.settling`)."""
    rows, cols = shapes[0]
    if routine == "mvm":
        return rows + cols
    if routine == "settle":
        return rows + cols + min(cols, 32)
    if routine in ("stuck", "gmap", "pulse"):
        return sum(r + c for r, c in shapes)
    return None


def _channels_fix(
    exc: Exception,
    uri: str,
    given: int | None,
    asked: int | None,
    stage: str | None,
    shapes: tuple[tuple[int, int], ...],
    chosen: tuple[str, ...],
) -> str | None:
    """The refusal of a board with fewer converter channels than the session asked for, said
    as the --channels and --tile-size that fit (the board's own message names a network's fix,
    or an emulated board's URI); None for any other error. `given`: --channels as typed (None:
    the default); `asked`: the node channels the session used; `stage`: the routine refused
    ("": between routines, where the device routines configure every tile); `chosen`: the
    session's routines."""
    found = _TOO_FEW_CHANNELS.search(str(exc))
    if found is None or asked is None or stage is None:
        return None
    needed, board = int(found.group(1)), int(found.group(2))
    stage = stage.split("[")[0] or "stuck"
    fixes, what = [], ""
    node_fits = board
    if stage in ("adc", "dac"):
        node_fits = board - (needed - asked)  # the node channels' others (the bias line) come on top
        if node_fits < 1:
            return None
        if "mvm" in chosen and (given or 0) < asked == max(shapes[0]):  # the tile's lines set the count
            what = f"the first tile's {asked} lines (the mvm routine calibrates each) need"
        else:
            what = (
                f"--channels {given} needs" if given is not None else f"the default --channels {asked} needs"
            )
            fixes.append(f"--channels {node_fits} or less")
    elif _channels_needed(stage, shapes) == needed:
        what = f"the {stage} routine's network on the tiles {','.join(f'{r}x{c}' for r, c in shapes)} needs"
    else:
        return None
    # the tiles every routine of the session fits with, and the lines the mvm routine makes channels
    tiles = [r for r in chosen if _channels_needed(r, shapes) is not None]
    largest = max(max(s) for s in shapes)

    def fits(n: int) -> bool:
        square = tuple((n, n) for _ in shapes)
        return all((_channels_needed(r, square) or 0) <= board for r in tiles) and (
            "mvm" not in chosen or n <= node_fits
        )

    if not fits(largest):
        side = max((n for n in range(1, largest) if fits(n)), default=0)
        if not side:
            return None
        fixes.append(f"--tile-size {side} or less (or --tiles as small)")
    more = (
        f" (or give the emulated board more: &channels={needed} in its URI)"
        if uri.startswith("emulator:")
        else ""
    )
    return f"{what} {needed} converter channels; the board has {board}: give {' and '.join(fixes)}{more}"


def _report_pages(first: Path, tiles: int) -> list[Path]:
    """The report's pages: `first` for tile 0, then NAME-tileK.png for each further tile."""
    return [first] + [first.with_name(f"{first.stem}-tile{k}{first.suffix}") for k in range(1, tiles)]


def _rerun(uri: str, out: Path, tiles: str | None, channels: int | None, routines: list[str]) -> str:
    """The `hil calibrate` command line that runs `routines` with this invocation's other
    settings, quoted for a shell (a URI's ``&`` would end the command)."""
    words = ["hil", "calibrate", uri, "--out", str(out), "--routines", ",".join(routines)]
    words += ["--tiles", tiles] if tiles else []
    words += ["--channels", str(channels)] if channels else []
    return shlex.join(words)


def _partial_path(out: Path) -> Path:
    """Where a stopped session's partial record goes when `out` holds a record already
    (`--overwrite`): beside it, so the complete record is not replaced by a partial one."""
    return out.with_name(f"{out.stem}.partial{out.suffix}")


def _stale_pages(first: Path) -> list[Path]:
    """Every report page of `first` on disk: `first` and its NAME-tileK.png pages."""
    pages = [first] if first.exists() else []
    return pages + sorted(first.parent.glob(f"{first.stem}-tile*{first.suffix}"))


def _remove_pages(first: Path) -> None:
    for page in _stale_pages(first):
        page.unlink(missing_ok=True)


def _keep_partial(stopped: list[CalibrationRecord], out: Path, image: Path) -> str:
    """Write the record of a stopped session's finished routines (marked partial) to `out`,
    or beside it where `out` holds a record already (which is kept, with its report); say
    where it is, or why there is none. A report left at `image` that described another
    record goes."""
    from calibration import write

    if not stopped:
        kept = f"; the record already at {out} is kept" if out.exists() else ""
        return f"no routine had finished: no record written{kept}"
    record = stopped[-1]
    done = ", ".join(record.routines) or "no whole routine"
    target = _partial_path(out) if out.exists() else out
    try:
        write(record, target)
    except OSError as exc:
        return f"the finished routines ({done}) could not be written to {target}: {exc}"
    if target == out:
        _remove_pages(image)  # they described a record no longer here
    kept = f"; the complete record at {out} and its report are kept" if target != out else ""
    return (
        f"the record of the routines that finished ({done}; stopped in "
        f"{record.session.get('stopped_in') or 'between routines'}) is at {target}, marked partial "
        f"(its attribute partial is true){kept}; run `hil calibrate` again with --overwrite for a "
        "whole one"
    )


def register(app: typer.Typer) -> None:
    @app.command()
    def calibrate(
        ctx: typer.Context,
        uri: str = typer.Argument(
            ..., help="Device URI: emulator://?preset=rram&seed=0, visa://..., serial://..."
        ),
        out: Path = _OUT,
        routines: str = typer.Option(
            None,
            help=f"Subset of {', '.join(ROUTINES)}. Default: every routine the board's capabilities allow "
            "(a board that does not settle skips adc, dac, mvm and settle, and says so).",
        ),
        tile_size: int = typer.Option(
            64, min=1, max=65536, help="Rows and columns of the tile at position 0."
        ),
        tiles: str = typer.Option(
            None,
            help="Shapes of the tiles at positions 0, 1, ... as ROWSxCOLS,... (overrides --tile-size): "
            "a network's own tiles get their devices corrected, e.g. 65x256,257x10 for the default "
            "classifier (training with a record names the --tiles of its network when they differ).",
        ),
        channels: int = typer.Option(
            None,
            min=1,
            max=65536,
            help=f"Node channels (DAC and state ADC) to calibrate: a network uses channels 0 .. its node "
            f"count - 1. Default {DEFAULT_CHANNELS} (every node of the trainers' default networks), or "
            "rows + cols of the first tile if larger.",
        ),
        reads: int = typer.Option(64, min=2, max=4096, help="Reads of the conductance map."),
        seed: int = typer.Option(0, help="Seed of the session's random patterns."),
        png: Path = _PNG,
        check: Path = _CHECK,
        overwrite: bool = _OVERWRITE,
        progress: bool | None = typer.Option(
            None,
            "--progress/--no-progress",
            help="A bar per stage on stderr (--no-progress: a line on stdout as a stage ends); default: "
            "bars when stderr is a terminal, the lines otherwise (a CI log, 2> FILE).",
        ),
        pulse_budget: int | None = typer.Option(
            None,
            min=1,
            max=PULSE_BUDGET_MAX,
            help="Pulses per device the pulse routine may apply to a tile, worst case (checked before the "
            f"session starts; at most {PULSE_BUDGET_MAX}). Default: {ENDURANCE_SHARE:.0%} of the device "
            "endurance the board declares; on a board that declares none, "
            "the default routine's worst case at the board's max_pulses "
            f"({FALLBACK_PULSE_BUDGET} at 1000 or more), not a figure "
            "of any device: set it from the datasheet. The record keeps what was applied "
            "(session.pulses_per_device).",
        ),
        threads: int = typer.Option(
            1,
            min=0,
            max=1024,
            help="torch CPU threads of a board run in this process (emulator://; a board on a link "
            "leaves the host numpy and loads no torch). 0: torch's default, one per core. Default 1: "
            "the routines work on small tiles and batches, where more threads only add overhead; see "
            "docs/calibration.md for the measured times.",
        ),
    ) -> None:
        """Measure DAC/ADC gains and offsets, conductance and stuck maps, pulse responses and
        settling on a board; write the record (--out, default cal.zarr) and a PNG report beside
        it (--png), and print a text summary of the record on stdout."""
        from calibration import (
            SessionOptions,
            drift_check,
            load,
            resolve_routines,
            run_session,
            runnable,
            write,
        )
        from calibration.pulse import PulseBudgetError, default_pulse_budget
        from calibration.report import plot, summary
        from drivers import open_device

        if check is not None:
            # every option of a new session: --check uses only the URI, --progress and --threads
            session_only = (
                "routines", "tiles", "tile_size", "channels", "reads", "seed", "pulse_budget", "out",
                "png", "overwrite",
            )  # fmt: skip
            unused = [
                f"--{n.replace('_', '-')}"
                for n in session_only
                # typer carries its own copy of click: its ParameterSource, compared by name
                if getattr(ctx.get_parameter_source(n), "name", "DEFAULT") != "DEFAULT"
            ]
            if unused:
                raise fail(
                    f"--check runs the drift check of an existing record, which {', '.join(unused)} do not "
                    "change; leave them out (they are for a new session)"
                )
        try:
            shapes = _parse_tiles(tiles, tile_size)
        except ValueError as exc:
            raise fail(str(exc)) from None
        image_path = png if png is not None else out.with_suffix(".png")
        pages = _report_pages(image_path, len(shapes))
        if check is None and out.exists() and not overwrite:
            raise fail(f"{out} already exists; add --overwrite to replace it, or pick another --out")
        if check is None and not image_path.parent.is_dir():
            raise fail(
                f"--png {image_path}: folder {image_path.parent} does not exist; create it or pick another"
            )
        taken = [page for page in pages if page.exists()]
        if check is None and taken and not overwrite:
            raise fail(f"{taken[0]} already exists; add --overwrite to replace it, or pick another --png")
        bars = Bars() if show_progress(progress) else StageLines()
        stopped: list[CalibrationRecord] = []  # what had finished when the session stopped
        limits: Limits | None = None  # the board's, once it is open
        asked: int | None = None  # the node channels the session uses, once known
        chosen: tuple[str, ...] = ()
        try:
            with open_device(uri) as dev:
                if threads and "torch" in sys.modules:
                    # an in-process board (emulator://) runs on torch, loaded as it opened; a board
                    # on a link leaves the host numpy alone: no torch to load (~0.8 s)
                    sys.modules["torch"].set_num_threads(threads)
                limits = dev.info.limits
                if check is not None:
                    report = drift_check(dev, load(check), progress=bars)
                    bars.close()
                    typer.echo(str(report))
                    raise typer.Exit(1 if report.recalibrate else 0)
                asked = routines is not None
                names = tuple(r.strip() for r in (routines or ",".join(ROUTINES)).split(",") if r.strip())
                chosen = resolve_routines(names)
                added = [r for r in chosen if r not in names]
                if added:
                    typer.echo(f"also running {', '.join(added)} (needed by the routines asked for)")
                caps = dev.info.capabilities
                missing = runnable(chosen, caps)
                lacking = ", ".join(f"{r} ({why})" for r, why in missing.items())
                if missing and asked:
                    # the routines asked for that can run (those they need are added again); only
                    # where none can, every routine the board can run
                    rest = [r for r in chosen if r in names and r not in missing]
                    can = rest or [r for r in ROUTINES if r not in runnable(ROUTINES, caps)]
                    raise ValueError(
                        f"this board cannot run {lacking}; `{_rerun(uri, out, tiles, channels, can)}` "
                        + ("runs the others asked for" if rest else "runs what it can")
                        if can
                        else f"this board cannot run {lacking}, nor any other calibration routine"
                    )
                if missing:
                    typer.echo(f"skipping {lacking}: the board does not declare those capabilities")
                    chosen = tuple(r for r in chosen if r not in missing)
                    if not chosen:
                        raise ValueError("this board can run none of the calibration routines")
                _check_tiles_fit(shapes, dev.info.limits, tiles)
                options = SessionOptions(
                    routines=chosen,
                    tile_shapes=shapes,
                    channels=channels or max(DEFAULT_CHANNELS, sum(shapes[0])),
                    reads=reads,
                    seed=seed,
                    pulse_budget=pulse_budget,
                )
                worst = options.pulse_worst_case(dev.info.limits.max_pulses)
                if worst:
                    budget, source = (
                        (pulse_budget, "--pulse-budget")
                        if pulse_budget is not None
                        else default_pulse_budget(dev.info.limits)
                    )
                    typer.echo(
                        f"pulse routine: at most {worst} pulses per device of each tile "
                        f"({dev.info.limits.max_pulses} per call on this board); budget {budget}: {source}"
                    )
                n, adc = options.node_channels(), options.adc_channels()
                asked = n
                said = []
                if channels is not None and n != channels:
                    said.append(
                        f"{n} node channels, not --channels {channels} (the mvm routine covers the "
                        "first tile's lines)"
                    )
                if channels is not None and "adc" in chosen and adc != n:
                    said.append(
                        f"{adc} state-ADC channels (the DAC routine reads each DAC channel through one "
                        "of its own)"
                    )
                if said:
                    typer.echo(f"calibrating {'; '.join(said)}")
                record = run_session(dev, options, bars, partial=stopped.append)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM taken as one: the board is in its safe state
            bars.close()
            typer.echo(f"interrupted: {_keep_partial(stopped, out, image_path)}", err=True)
            raise
        except PulseBudgetError as exc:  # refused before anything ran: say the command that runs
            bars.close()
            rest = [r for r in chosen if r != "pulse"]
            way = (
                f"; `{_rerun(uri, out, tiles, channels, rest)}` runs the other routines"
                if "pulse" in chosen and rest
                else ""
            )
            raise fail(f"{exc}{way}") from None
        except user_errors() as exc:
            bars.close()
            kept = f"; {_keep_partial(stopped, out, image_path)}" if stopped else ""
            # the routine refused: the one running, or the first when none had finished
            stage = (stopped[-1].session.get("stopped_in") or "") if stopped else (chosen or (None,))[0]
            said = _channels_fix(exc, uri, channels, asked, stage, shapes, chosen)
            said = said or f"{exc}{_line_current_hint(exc, limits)}"
            raise fail(f"{said}{kept}") from None
        bars.close()
        try:
            write(record, out)  # atomic: an interrupted write leaves what was at `out` before
        except KeyboardInterrupt:
            was = f"the record already at {out} is kept" if out.exists() else "no record written"
            typer.echo(f"interrupted while writing the record to {out}: {was}", err=True)
            raise
        typer.echo(summary(record))
        typer.echo(f"record    {out}")
        try:
            _remove_pages(image_path)  # the old report (and its extra tile pages) describe another record
            drawn = [plot(record, page, tile=k) for k, page in enumerate(pages)]
        except KeyboardInterrupt:
            _remove_pages(image_path)
            typer.echo(
                f"interrupted while drawing the report: the record at {out} is complete; no report "
                "written (calibration.report.plot draws it)",
                err=True,
            )
            raise
        typer.echo(f"report    {', '.join(str(page) for page in drawn)}")
