"""The ``wmbench`` command: run scenarios, list components, render leaderboards."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from wmbench.errors import WmbenchError
from wmbench.registry import ATTACKS, DATASETS, METHODS, MODELS, dataclass_params, summary

REGISTRIES = {"methods": METHODS, "attacks": ATTACKS, "models": MODELS, "datasets": DATASETS}


def cmd_run(args: argparse.Namespace) -> int:
    from wmbench.cache import default_cache_dir
    from wmbench.leaderboard import write_leaderboard
    from wmbench.runner import Runner
    from wmbench.scenario import load_scenario

    scenario = load_scenario(args.scenario, args.set)
    runner = Runner(scenario, Path(args.cache) if args.cache else default_cache_dir(), args.device, progress=not args.quiet)
    if args.dry_run:
        print(f"{scenario.name}: {runner.plan().describe()}")
        return 0
    frame = runner.run()
    for path in write_leaderboard(frame, Path(args.out), scenario.name):
        print(path)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    kinds = [args.kind] if args.kind else list(REGISTRIES)
    for kind in kinds:
        registry = REGISTRIES[kind]
        print(f"{kind}:")
        for name in registry.names():
            cls = registry.get(name)
            print(f"  {name:<20} {summary(cls)}")
            for field, hint, default in dataclass_params(cls):
                print(f"      {field}: {hint} = {default!r}")
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from wmbench.leaderboard import read_results, write_leaderboard

    results = Path(args.results)
    if not results.is_file():
        raise WmbenchError(f"{results}: no such results file")
    frame = read_results(results)
    name = args.name or (str(frame["scenario"].iloc[0]) if len(frame) else results.stem)
    for path in write_leaderboard(frame, Path(args.out), name):
        print(path)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wmbench", description="Benchmark white-box neural-network watermarking.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a scenario file and write its leaderboard")
    run.add_argument("scenario", help="scenario YAML file")
    run.add_argument("--cache", help="cache directory (default: $WMBENCH_CACHE or ~/.cache/wmbench)")
    run.add_argument("--out", default="leaderboard", help="where <name>.csv, <name>.md and plots go (default: leaderboard)")
    run.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: the scenario's)")
    run.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                     help="override a scenario field, e.g. training.epochs=2 or datasets[0].args.root=/data (repeatable)")
    run.add_argument("--dry-run", action="store_true", help="print the grid (cells, trainings to do, cached) and stop")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    run.set_defaults(func=cmd_run)

    lst = sub.add_parser("list", help="list registered components with their parameters")
    lst.add_argument("kind", nargs="?", choices=list(REGISTRIES))
    lst.set_defaults(func=cmd_list)

    board = sub.add_parser("leaderboard", help="re-render a leaderboard from a results CSV (or .jsonl store)")
    board.add_argument("results")
    board.add_argument("--out", default="leaderboard")
    board.add_argument("--name", help="output name (default: the scenario column)")
    board.set_defaults(func=cmd_leaderboard)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except WmbenchError as exc:
        print(f"wmbench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("wmbench: interrupted; finished cells are kept, rerun to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
