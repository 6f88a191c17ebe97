"""The ``raysched`` console script. Commands only parse and print; the work lives elsewhere."""

from __future__ import annotations

from pathlib import Path

import click


from . import __version__
from .replay.commands import HOME_OPTION


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="raysched")  # not package metadata: a checkout on PYTHONPATH (or py_modules) has none
def main() -> None:
    """raysched: an autopilot for Ray task resources.

    Every @adaptive_remote task is measured in its worker, its profile stored
    (Parquet, under RAYSCHED_HOME, default ./.raysched) and learnt from
    (XGBoost quantile models tracked in MLflow), and its next call submitted
    with the memory and CPU that similar calls used.
    """


@main.command()
@click.option("--tasks", default=16, show_default=True, type=click.IntRange(min=1), help="Tasks per round.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Seed of the task sizes.")
@click.option("--address", default="local", show_default=True,
              help="'local' starts a new local Ray cluster (RAY_ADDRESS and earlier `ray start` clusters are "
                   "ignored); 'auto' or host:port joins a running one.")
def demo(tasks: int, seed: int, address: str) -> None:
    """Run a batch of numpy tasks on a local Ray twice, cold then warm, and compare."""
    from .demo import run_demo
    from .errors import RayschedError

    try:
        run_demo(tasks=tasks, seed=seed, echo=click.echo, address=address)
    except RayschedError as exc:  # an unusable home: one line, as every other command says it
        raise click.ClickException(str(exc)) from None
    except ConnectionError as exc:  # --address names no running cluster: Ray's own words, without its traceback
        raise click.ClickException(f"cannot join the Ray cluster at {address!r}: {exc}") from None


@main.command()
@click.argument("function", required=False)
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=1), help="Rows to show (the newest).")
@HOME_OPTION
def profiles(function: str | None, limit: int, home: Path | None) -> None:
    """Show recorded attempts (of one function, or all) from the profile store."""
    columns = ["function", "attempt", "outcome", "input_size", "peak_rss_bytes", "cpu_cores", "wall_seconds",
               "allocated_memory_bytes", "allocated_num_cpus", "prediction_source"]
    # Only the newest parts that hold the rows shown: a home weeks old holds millions of
    # rows (reading them all took 21 s and 8 GB at 7 million, to print a few).
    _show_newest(home, function, limit, "profiles", columns,
                 lambda store, name: store.read_recent(limit, function=name))


@main.command()
@click.argument("function", required=False)
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=1), help="Rows to show (the newest).")
@HOME_OPTION
def events(function: str | None, limit: int, home: Path | None) -> None:
    """Show the live monitor's decisions (of one function, or all): stops, resubmissions, rescales, warnings."""
    columns = ["timestamp", "function", "call_id", "attempt", "rule", "action", "measured", "allocated", "detail"]
    _show_newest(home, function, limit, "events", columns,
                 lambda store, name: store.recent_events(limit, function=name))


def _show_newest(home: Path | None, function: str | None, limit: int, what: str, columns: list[str],
                 read) -> None:
    """Print the newest ``limit`` rows ``read(store, function)`` gives of a home's store, for
    ``raysched profiles`` and ``raysched events``. A query: it never creates a home. A
    function named without its module (functions are stored as module.qualname) is found
    when one stored name ends with it; a name that matches none gets the names there are."""
    import pandas as pd

    from .errors import RayschedError
    from .store.profiles import PROFILES_DIR, ProfileStore, short_name

    given, home = home is not None, _home(home)
    if not (home / PROFILES_DIR).exists():
        click.echo(_no_store(home, given))
        return
    try:
        store = ProfileStore(home, writable=False)
        frame = read(store, function)
        if function is not None and not len(frame):
            known = sorted(set(store.functions()["function"]) | store.event_functions())
            if function in known:  # a function the store holds, with none of these (no events)
                click.echo(f"no {what} of {function} yet")
                return
            ending = [n for n in known if short_name(n) == short_name(function)]
            if len(ending) != 1:
                click.echo(f"no {what} of {function!r}; the store has: " + (", ".join(ending or known) or "none"))
                return
            click.echo(f"(showing {ending[0]}: functions are stored by module and name)")
            frame = read(store, ending[0])
    except RayschedError as exc:
        raise click.ClickException(str(exc)) from None
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 100):
        click.echo(frame[columns].tail(limit).to_string() if len(frame) else f"no {what} yet")


@main.command()
@click.option("--all", "merge_all", is_flag=True, help="Merge every part into one (rewrites every row).")
@HOME_OPTION
def compact(merge_all: bool, home: Path | None) -> None:
    """Merge the profile store's Parquet parts (the profiler also does this as it writes)."""
    from . import get_config
    from .errors import RayschedError
    from .store.profiles import PROFILES_DIR, ProfileStore

    given, home = home is not None, _home(home)
    if not (home / PROFILES_DIR).exists():
        click.echo(_no_store(home, given))
        return
    try:
        store = ProfileStore(home)
        before = len(store.profiles.parts()) + len(store.event_table.parts())
        removed = store.compact(min_parts=2) if merge_all else store.tidy(max(2, get_config().store_tidy_fanout or 10))
        after = len(store.profiles.parts()) + len(store.event_table.parts())
    except RayschedError as exc:  # an unwritable home, say: its rows are still there to read
        raise click.ClickException(str(exc)) from None
    click.echo(f"{before} part file(s) -> {after} ({removed} merged away) under {home}")


@main.command()
@click.argument("knob", required=False)
def config(knob: str | None) -> None:
    """List every knob of RayschedConfig (or one): its value here, and what it means.

    Set them in a program with raysched.configure(knob=value, ...).
    """
    import textwrap

    from .config import RayschedConfig

    here = RayschedConfig.from_env()
    rows = [r for r in RayschedConfig.describe() if knob is None or r[1] == knob]
    if not rows:
        import difflib

        names = [r[1] for r in RayschedConfig.describe()]
        # Knobs with the word in their name, then close spellings (as configure() suggests).
        close = [name for name in names if knob in name]
        close += [name for name in difflib.get_close_matches(knob, names, n=3) if name not in close]
        raise click.BadParameter(f"no knob {knob!r}" + (f"; did you mean {', '.join(close)}?"
                                                        if close else ""), param_hint="KNOB")
    section = None
    for name_of_section, name, _default, meaning in rows:
        if name_of_section != section:
            section = name_of_section
            click.echo(f"\n# {section}")
        click.echo(f"{name} = {getattr(here, name)!r}")
        if meaning:
            click.echo(textwrap.fill(meaning, width=88, initial_indent="    ", subsequent_indent="    "))


def _home(given: Path | None) -> Path:
    """The home named by ``--home``, else the configured one ($RAYSCHED_HOME or ./.raysched).
    A home that is a file (or lies under one) is refused here, as the Python API refuses it:
    it is not a home without a store yet."""
    from . import get_config

    home = given.expanduser().resolve() if given is not None else get_config().home_path
    for place in (home, *home.parents):
        if place.exists():
            if not place.is_dir():
                raise click.ClickException(f"the raysched home {home} cannot be used: {place} is a file, not a folder")
            break
    return home


def _no_store(home, given: bool = False) -> str:
    import os

    from .config import HOME_ENV

    where = ("--home" if given else f"{HOME_ENV}={os.environ[HOME_ENV]}" if os.environ.get(HOME_ENV)
             else f"the default home; set {HOME_ENV} or --home to read another")
    return f"no profiles yet: no store at {home} ({where})"


def _add_replay_commands() -> None:
    try:
        from .replay.commands import eval_command, import_command
    except ImportError:  # pragma: no cover - the replay package is part of raysched
        return
    main.add_command(eval_command, "eval")
    main.add_command(import_command, "import")


_add_replay_commands()

if __name__ == "__main__":
    main()
