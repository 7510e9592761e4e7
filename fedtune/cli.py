"""The ``fedtune`` command line: ``simulate``, ``resume``, ``strategies``, ``plot``, ``compare``."""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence

from fedtune.errors import ConfigError, FedtuneError


def _split_config_and_overrides(items: Sequence[str]) -> tuple[str | None, list[str]]:
    if items and "=" not in items[0]:
        return items[0], list(items[1:])
    return None, list(items)


def _run(cfg: object, verbose: bool) -> int:
    """Simulate ``cfg``; Ctrl-C stops it (exit 130) as :mod:`fedtune.server.interrupt` describes."""
    from fedtune.reporting.quiet import quiet_libraries

    quiet_libraries()  # only now: a config that fails its checks is reported without loading the stack
    from fedtune.errors import RunInterrupted
    from fedtune.flower.simulation import simulate
    from fedtune.server.interrupt import EXIT_CODE, report_interrupted, stop_on_interrupt
    from fedtune.server.run import RunControl

    control = RunControl()
    try:
        with stop_on_interrupt(control):
            run_dir = simulate(cfg, verbose=verbose, control=control)  # type: ignore[arg-type]
    except (RunInterrupted, KeyboardInterrupt):
        report_interrupted(control)
        return EXIT_CODE
    print(f"done: {run_dir}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedtune.config import load_config

    config_path, overrides = _split_config_and_overrides(args.args)
    return _run(load_config(config_path, overrides), args.verbose)


def cmd_resume(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fedtune.config import load_config
    from fedtune.reporting.runlog import CONFIG_FILE

    run_dir = Path(args.run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError([f"{run_dir} is not a run directory (no {CONFIG_FILE}); pass the output.dir of a run"])
    cfg = load_config(run_dir / CONFIG_FILE, [*args.overrides, f"output.dir={run_dir}", "output.resume=true"])
    return _run(cfg, args.verbose)


def cmd_strategies(args: argparse.Namespace) -> int:
    from fedtune.options import describe_options
    from fedtune.strategy import registered_strategies, resolve_strategy

    if args.name is None:
        for name, cls in registered_strategies().items():
            print(f"{name:<12} {cls.summary_line}")
        return 0
    cls = resolve_strategy(args.name)
    print(f"{args.name}: {cls.summary_line}".rstrip(": "))
    options = describe_options(cls)
    print("\noptions (strategy.options.NAME=VALUE):" if options else "\nno options")
    for line in options:
        print(f"  {line}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from fedtune.reporting.compare import read_runs
    from fedtune.reporting.plots import plot_comparison, plot_run

    read_runs(args.run_dirs)  # every directory without metrics.jsonl is named before anything is drawn
    for run_dir in args.run_dirs:
        for path in plot_run(run_dir):
            print(f"wrote {path}")
    if len(args.run_dirs) > 1:
        print(f"wrote {plot_comparison(args.run_dirs, args.out)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    import json

    from fedtune.reporting.compare import format_table, summarize_runs

    summaries = summarize_runs(args.run_dirs)
    if args.json:
        print(json.dumps([s.as_dict() for s in summaries], indent=1))
    else:
        print(format_table(summaries))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtune", description="Federated fine-tuning of language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser(
        "simulate", help="run a federation on this machine",
        description="Simulate a federation through Flower. CONFIG is a YAML file (default: "
                    "the embedded default, fedtune/default.yaml); key=value pairs override it, "
                    "e.g. federation.num_rounds=3 output.dir=runs/mine.")
    sim.add_argument("args", nargs="*", metavar="[CONFIG] [key=value ...]")
    sim.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    sim.set_defaults(func=cmd_simulate)
    resume = sub.add_parser(
        "resume", help="continue a simulated run from its last complete round",
        description="Continue the run in RUN_DIR from its checkpoint (written after every round) with "
                    "the configuration it was started with; key=value pairs may change how long it runs "
                    "(federation.num_rounds) and its fault settings, nothing that changes the result.")
    resume.add_argument("run_dir", metavar="RUN_DIR")
    resume.add_argument("overrides", nargs="*", metavar="key=value")
    resume.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    resume.set_defaults(func=cmd_resume)
    strat = sub.add_parser("strategies", help="list the strategies, or describe one's options",
                           description="List the strategies (built-in and installed), one line each; with NAME, "
                                       "the options of that strategy with their types, defaults and help.")
    strat.add_argument("name", nargs="?", default=None, metavar="NAME",
                       help="a strategy's name or path (path/to/file.py:Class)")
    strat.set_defaults(func=cmd_strategies)
    plot = sub.add_parser(
        "plot", help="draw PNG figures of runs, and one comparing them",
        description="Write accuracy_loss.png and traffic.png into each RUN_DIR (from its metrics.jsonl; a "
                    "failed run's completed rounds too) and, for two or more runs, compare_accuracy.png "
                    "(accuracy by round and by cumulative bytes) into --out.")
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    plot.add_argument("--out", default=".", metavar="DIR",
                      help="where compare_accuracy.png goes (default: the current directory)")
    plot.set_defaults(func=cmd_plot)
    compare = sub.add_parser(
        "compare", help="print a table comparing runs",
        description="One line per RUN_DIR from its metrics.jsonl: strategy, final and best central accuracy "
                    "(with its round), rounds, training bytes (up + down) and the summed round time.")
    compare.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    compare.add_argument("--json", action="store_true", help="print exact numbers as JSON instead of the table")
    compare.set_defaults(func=cmd_compare)
    return parser


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status.

    0: the run finished; 2: a bad configuration (every problem listed); 1: any other
    failure, reported in one line (with the traceback under ``--verbose``); 130: Ctrl-C.
    """
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    from fedtune.reporting.quiet import quiet_notices

    quiet_notices()
    try:
        return int(args.func(args))
    except ConfigError as e:
        print(f"fedtune: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedtune: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every failure ends in one line and a non-zero exit
        if verbose:
            traceback.print_exc()
        if isinstance(e, FedtuneError):  # its message names the value and the fix
            print(f"fedtune: error: {e}", file=sys.stderr)
        else:
            hint = "" if verbose else " (rerun with --verbose for the traceback)"
            print(f"fedtune: error: {_first_line(e)}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
