"""``raysched eval`` (trace replay against the published baselines) and ``raysched import``.

Both are click commands; ``raysched/cli.py`` adds them to the main group.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Iterable

import click

from ..errors import RayschedError
from .readers import FORMATS, NotATrace, TraceFormatError, expand_paths, read_trace, sniff_format, workflow_names

#: ``--home DIR`` of the commands that read or write a home's store (import, profiles, compact).
HOME_OPTION = click.option("--home", type=click.Path(file_okay=False, path_type=Path), default=None,
                           help="raysched home (default: $RAYSCHED_HOME or .raysched).")

METHOD_NAMES = ("raysched", "raysched_fixed", "presets", "tovar", "witt_percentile", "witt_lr", "vpa", "oracle")


def methods_by_name(names: list[str], config):
    """The replay methods of these names (see METHOD_NAMES), the raysched ones built from ``config``."""
    from .baselines import BASELINES
    from .raysched_method import RayschedMethod

    out = []
    for name in names:
        if name == "raysched":
            out.append(RayschedMethod(config))
        elif name == "raysched_fixed":
            # the same runtime policy with the fixed-coverage memory chain (the
            # default before cost-aware sizing): for comparison
            m = RayschedMethod(config.replace(memory_cost_aware=False))
            m.name = "raysched_fixed"
            out.append(m)
        else:
            out.append(BASELINES[name]())
    return out


def _parse_methods(value: str) -> list[str]:
    # Each once: a method named twice was replayed twice (the slowest, raysched_fixed, took
    # twice as long) and had two columns in the Markdown table.
    names = list(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    if not names:
        raise click.BadParameter(f"name at least one method; choose from {', '.join(METHOD_NAMES)}",
                                 param_hint="--methods")
    unknown = [n for n in names if n not in METHOD_NAMES]
    if unknown:
        raise click.BadParameter(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHOD_NAMES)}",
                                 param_hint="--methods")
    return names


def parse_config_overrides(pairs: Iterable[str]) -> dict[str, object]:
    """``KEY=VALUE`` pairs as RayschedConfig field changes, each value parsed by its field's type."""
    import dataclasses

    from ..config import RayschedConfig

    fields = {f.name: f for f in dataclasses.fields(RayschedConfig)}
    defaults = RayschedConfig()
    changes: dict[str, object] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise click.BadParameter(f"{pair!r}: expected KEY=VALUE with KEY a RayschedConfig field "
                                     f"(such as cost_tail_allowance)", param_hint="--set")
        current = getattr(defaults, key)
        text = raw.strip()
        try:
            if text.lower() in ("none", "null") and "None" in str(fields[key].type):
                value: object = None
            elif isinstance(current, bool):
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError("expected true or false")
                value = text.lower() in ("true", "1")
            elif isinstance(current, int) and not isinstance(current, bool):
                value = int(text)
            elif isinstance(current, float) or current is None:
                value = float(text)
            elif isinstance(current, str):
                value = text
            else:
                raise ValueError(f"a {type(current).__name__} cannot be set from the command line")
        except ValueError as exc:
            raise click.BadParameter(f"{pair!r}: {exc}", param_hint="--set") from None
        changes[key] = value
    return changes


@click.command("eval")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--format", "fmt", type=click.Choice([*FORMATS, "auto"]), default="auto", show_default=True,
              help="Trace format; 'auto' tells nextflow from lotaru by the header.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed of the 30/70 split and of the online order.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write results as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), help="Write a PNG of wastage.")
@click.option("--markdown", "md_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the summary table as Markdown.")
@click.option("--methods", "methods", default=",".join(METHOD_NAMES), show_default=True,
              help="Comma-separated methods to replay.")
@click.option("--min-rows", default=34, show_default=True, type=click.IntRange(min=1),
              help="Task types with fewer usable rows are skipped (random split only).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Replay raysched with a RayschedConfig field changed (repeatable), "
                   "e.g. --set cost_tail_allowance=0.")
def eval_command(paths, fmt, seed, json_path, plot_path, md_path, methods, min_rows, overrides):
    """Replay workflow traces (Sizey protocol) and compare raysched's sizing with the baselines.

    PATHS are trace files, or folders of them (a file of a folder that is no
    trace, such as nf-core's pipeline_report.txt, is passed over). Per task type with at least
    --min-rows rows, a seeded 30% is history and the rest arrive one by one;
    each method's allocation is charged (allocation - peak) x runtime when it
    fits and allocation x runtime per failed attempt. Reports wastage in
    GB-hours, failed attempts, MAQ and the seconds each method took. A
    workflow is named by its file's stem (with its folders where two files
    share a stem); a run repeated in a trace is replayed once.
    """
    from ..config import RayschedConfig
    from .harness import replay_trace
    from .results import goal_summary, markdown_table, plot, plot_target, text_table, write_json

    names = _parse_methods(methods)
    files = expand_paths(paths)
    if not files:
        raise click.UsageError("no trace files found in " + ", ".join(map(str, paths)))
    try:
        config = RayschedConfig.from_env(**parse_config_overrides(overrides))
    except (TypeError, ValueError) as exc:  # the config's own validation
        raise click.BadParameter(str(exc), param_hint="--set") from None
    if plot_path is not None:
        try:
            plot_path = plot_target(plot_path)  # a format matplotlib writes, and the file it will be
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--plot") from None
    for option, out in (("--json", json_path), ("--plot", plot_path), ("--markdown", md_path)):
        if out is not None:
            _check_writable(out, option)  # before the replay, which can take a minute
    if overrides:
        click.echo("raysched replayed with " + ", ".join(overrides) + "\n")
    results = []
    unreadable: list[str] = []
    workflow = workflow_names(files)
    named = _named_files(paths)
    passed_over = 0
    for path in files:
        if _passed_over(path, named):
            passed_over += 1
            continue
        t0 = time.perf_counter()
        try:
            trace = read_trace(path, fmt)
            trace.name = workflow[path]
            result = replay_trace(trace, methods_by_name(names, config), seed=seed, min_rows=min_rows)
        except (TraceFormatError, RayschedError) as exc:
            if len(files) == 1:
                raise click.ClickException(f"{path}: {exc}" if str(path) not in str(exc) else str(exc)) from None
            unreadable.append(_skip(path, exc))  # one bad file of a folder: the others are still replayed
            continue
        results.append(result)
        click.echo(text_table(result))
        if trace.skipped:
            click.echo(f"  {trace.describe_skipped()}")
        click.echo(f"  replayed in {time.perf_counter() - t0:.1f} s\n")
    _nothing_but_passed_over(paths, passed_over, bool(results or unreadable))
    summary = goal_summary(results)
    if summary:
        click.echo(summary)
    replayed = [r for r in results if any(t.tasks for t in r.methods.values())]
    if replayed:
        try:
            if json_path:
                write_json(results, json_path, seed)
                click.echo(f"wrote {json_path}")
            if md_path:
                Path(md_path).parent.mkdir(parents=True, exist_ok=True)
                Path(md_path).write_text(markdown_table(results, [n for n in names]) + "\n")
                click.echo(f"wrote {md_path}")
            if plot_path:
                plot(results, plot_path)
                click.echo(f"wrote {plot_path}")
        except (OSError, ValueError) as exc:
            raise click.ClickException(f"cannot write the results: {exc}") from None
    if results and not replayed and not unreadable:
        raise click.ClickException(
            f"nothing was replayed: no task type of {'this trace' if len(results) == 1 else 'these traces'} has "
            f"enough usable rows (--min-rows {min_rows}; for lotaru, both history and online rows)")
    _report_skipped(unreadable)


@click.command("import")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--format", "fmt", type=click.Choice([*FORMATS, "auto"]), default="auto", show_default=True)
@HOME_OPTION
def import_command(paths, fmt, home):
    """Load traces into the profile store as history, keyed by task type.

    A Ray function registered under a task type's name (for example
    @adaptive_remote(name="fastqc")) then starts with a prediction from the
    imported runs. Importing the same file twice, or a copy of it, does not duplicate rows.
    PATHS are trace files, or folders of them (nf-core's pipeline_info: its files
    that are no trace, such as pipeline_report.txt, are passed over).
    """
    from ..config import RayschedConfig
    from .importer import import_trace

    config = RayschedConfig.from_env(**({"home": str(home)} if home else {}))
    files = expand_paths(paths)
    if not files:
        raise click.UsageError("no trace files found in " + ", ".join(map(str, paths)))
    total = 0
    unreadable: list[str] = []
    named = _named_files(paths)
    passed_over = done = 0
    for path in files:
        if _passed_over(path, named):
            passed_over += 1
            continue
        try:
            trace = read_trace(path, fmt)
            written, per_type = import_trace(trace, config.home_path)
        except (TraceFormatError, RayschedError) as exc:
            if len(files) == 1:
                raise click.ClickException(str(exc)) from None
            unreadable.append(_skip(path, exc))  # one bad file of a folder: the others are still imported
            continue
        total += written
        done += 1
        held = len(trace.rows) - written  # usable rows the store holds already (imported before, or a copy's)
        why = ((f" ({held} more of its rows were imported before)" if held else "") if written else
               (" (all of its rows were imported before)" if len(trace.rows) else " (it has no rows)"))
        click.echo(f"{path}: {written} new row(s) of {len(per_type)} task type(s) into {config.home_path}{why}")
        for name, n in sorted(per_type.items()):
            click.echo(f"  {n:6d}  {name}")
        if trace.skipped:
            click.echo(f"  {trace.describe_skipped()}")
    _nothing_but_passed_over(paths, passed_over, bool(done or unreadable))
    click.echo(f"imported {total} new row(s)")
    _report_skipped(unreadable)


def _named_files(paths: Iterable[Path]) -> set[Path]:
    """The files named on the command line (not found in a folder named there)."""
    return {Path(p).resolve() for p in paths if not Path(p).is_dir()}


def _passed_over(path: Path, named: set[Path]) -> bool:
    """Whether ``path``, a file a folder contributed, is no trace at all (nf-core's pipeline_info
    holds a pipeline_report.txt beside its execution_trace_*.txt): passed over, said on stderr.
    It failed the command (every trace of the folder done, exit 1). A file named on the command
    line, or one that is a trace but empty or broken, is read and fails as before."""
    if path.resolve() in named:
        return False
    try:
        sniff_format(path)
    except NotATrace as exc:
        reason = str(exc)
        reason = reason[len(f"{path}: "):] if reason.startswith(f"{path}: ") else reason
        click.echo(f"{path}: passed over, not a trace: {reason.split(';')[0]}", err=True)
        return True
    except TraceFormatError:
        return False  # the reader says what is wrong with it
    return False


def _nothing_but_passed_over(paths: Iterable[Path], passed_over: int, any_read: bool) -> None:
    if passed_over and not any_read:
        raise click.UsageError(f"no trace files found in {', '.join(map(str, paths))} "
                               f"({passed_over} file(s) passed over: not traces)")


def _check_writable(path: Path, option: str) -> None:
    """Fail now, with the option's name, if ``path`` cannot be written (leaving nothing behind)."""
    existed = path.exists()
    if path.parent.exists() and not path.parent.is_dir():
        raise click.BadParameter(f"cannot write {path}: {path.parent} is a file, not a folder", param_hint=option)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab"):
            pass
    except OSError as exc:
        raise click.BadParameter(f"cannot write {path}: {exc.strerror or exc}", param_hint=option) from None
    if not existed:
        path.unlink(missing_ok=True)


def _skip(path: Path, exc: Exception) -> str:
    reason = str(exc)
    if reason.startswith(f"{path}: "):  # the reader's own message names the file already
        reason = reason[len(f"{path}: "):]
    message = f"{path}: skipped: {reason}"
    click.echo(message, err=True)
    return message


def _report_skipped(unreadable: list[str]) -> None:
    """After every readable file was done: say which were not, and fail the command."""
    if unreadable:
        raise click.ClickException(f"{len(unreadable)} file(s) skipped, every other one done:\n  "
                                   + "\n  ".join(unreadable))


__all__ = ["eval_command", "import_command"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(eval_command())
