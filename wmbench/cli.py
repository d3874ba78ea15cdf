"""The ``wmbench`` command: run scenarios, list components, render leaderboards."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from wmbench.errors import WmbenchError
from wmbench.names import check_entries, not_a_folder, not_a_folder_text
from wmbench.progress import progress_log
from wmbench.safe_io import probe_writable
from wmbench.registry import ATTACKS, DATASETS, METHODS, MODELS, dataclass_params, description, load_plugins

log = logging.getLogger(__name__)

# Exit codes: 2 bad input (nothing run), 3 the run finished and wrote its leaderboard but some cells
# failed (their rows carry the reason in the ``failure`` column; a rerun retries them; for the null:
# some draws failed, its CSV's note and its Markdown's "Failed draws" say why), 4 a fault
# of the machine (a full disk, a read-only or unreachable folder), 130 interrupted.
EXIT_CELLS_FAILED = 3
EXIT_SYSTEM = 4
REGISTRIES = {"methods": METHODS, "attacks": ATTACKS, "models": MODELS, "datasets": DATASETS}


def check_device(device: str | None) -> None:
    """``--device``: cpu, cuda, cuda:N or auto (mps, meta and the like are refused before any work)."""
    from wmbench.names import shown
    from wmbench.scenario import DEVICE

    if device is not None and not DEVICE.fullmatch(device):
        raise WmbenchError(f"--device: expected cpu, cuda, cuda:N or auto, got {shown(device)}")


def check_out(out: str) -> Path:
    """``--out``, checked before any work: a folder, or a path whose nearest existing parent is a
    folder (a long grid must not end on "File exists")."""
    path = Path(out)
    blocker = not_a_folder(path)
    if blocker is not None:
        raise WmbenchError(f"--out {out}: {not_a_folder_text(blocker)}")
    return path


def check_store(store: str | None) -> Path | None:
    """``--store``, checked before any work: a file (or none yet) in a folder, or where one can be
    made (a store below a file failed as a fault of the machine, exit 4; a folder named as the store
    stopped the null after all its draws)."""
    if not store:  # as before: an empty --store is the cache's own store
        return None
    path = Path(store)
    blocker = not_a_folder(path.parent)
    if blocker is not None:
        raise WmbenchError(f"--store {store}: {not_a_folder_text(blocker)}")
    if (path.exists() or path.is_symlink()) and not path.is_file():
        raise WmbenchError(f"--store {store}: not a file (a results store is the .jsonl file wmbench run writes)")
    return path


def cache_dir(args: argparse.Namespace) -> Path:
    from wmbench.cache import default_cache_dir

    return Path(args.cache) if args.cache else default_cache_dir()


def cmd_run(args: argparse.Namespace) -> int:
    from wmbench.executors import make_executor
    from wmbench.leaderboard import check_leaderboard_out, write_leaderboard
    from wmbench.summary import MIN_SEEDS
    from wmbench.runner import Runner, failure_summary
    from wmbench.scenario import load_scenario

    check_device(args.device)
    out = check_out(args.out)
    store = check_store(args.store)
    scenario = load_scenario(args.scenario, args.set, args.plugin)
    check_leaderboard_out(out, scenario.name)  # a grid must not end on a folder where its .html goes
    if not args.dry_run:
        probe_writable(out)  # nor on a read-only --out (exit 4 now, before any training)
    runner = Runner(scenario, cache_dir(args), args.device, progress=not args.quiet, store=store)
    executor = make_executor(args.executor, args.address)
    runner.check()  # dataset paths exist (--dry-run included)
    if args.executor == "local":
        runner.device  # noqa: B018 - cuda on a machine without one fails now, as the run would (Ray's workers may have one)
    plan = runner.plan()
    incompatible, unchecked = runner.preflight(plan, download=not args.dry_run)  # one-pair mismatches raise here: exit 2 before any training
    if args.dry_run:
        print(f"{scenario.name}: {plan.describe()}")
        for problem in incompatible:
            print(f"  incompatible, its cells will fail: {problem}")
        for label in unchecked:
            print(f"  {label}: not checked, its data would be downloaded (the run downloads it first)")
        return 0
    for problem in incompatible:
        log.warning("incompatible, its cells will fail: %s", problem)
    frame = runner.run(executor, plan)
    for path in write_leaderboard(frame, out, scenario.name):
        print(path)
    if len(scenario.seeds) < MIN_SEEDS:
        print(f"wmbench: note: {len(scenario.seeds)} seed(s), so {'no' if len(scenario.seeds) == 1 else 'very wide'} intervals: "
              f"publish figures from {MIN_SEEDS} seeds or more (seeds: [0, 1, 2])", file=sys.stderr)
    failures = failure_summary(frame)
    if failures:
        print(f"wmbench: {failures}", file=sys.stderr)
        return EXIT_CELLS_FAILED
    return 0


def cmd_null(args: argparse.Namespace) -> int:
    import torch

    from wmbench.devices import device_label, resolve_device
    from wmbench.grid import expand
    from wmbench.null import check_null_args, null_scenario, run_null
    from wmbench.null_report import null_table, watermarked_stats, write_null
    from wmbench.results import REFERENCE_METHOD
    from wmbench.runner import Runner
    from wmbench.scenario import load_scenario

    check_device(args.device)
    out = check_out(args.out)
    store = check_store(args.store)
    scenario = load_scenario(args.scenario, args.set, args.plugin)
    check_entries(out, (f"{scenario.name}_null.csv", f"{scenario.name}_null.md"))
    probe_writable(out)
    cache = cache_dir(args)
    # The watermarked rows of this grid only: a store also holds rows of earlier versions of the scenario.
    runner = Runner(scenario, cache, args.device, progress=False, store=store)
    rows = [r for r in runner.store.rows(runner.identities(expand(scenario))).values() if not r.get("failure")]
    check_null_args(scenario, args.keys)  # before the note below: a bad --keys is one line
    if not any(r.get("method") != REFERENCE_METHOD for r in rows):  # said before the draws: the user may run the grid first
        print(f"wmbench: note: the results store ({runner.store.path}) holds no watermarked row of this scenario: the TPR columns "
              f"will be n/a; run `wmbench run {args.scenario}` with the same cache (or pass its --store) first for them", file=sys.stderr)
    samples = run_null(scenario, cache, args.device or scenario.device, args.keys, progress=not args.quiet)
    device = device_label(resolve_device(args.device or scenario.device))
    frame = null_table(samples, watermarked_stats(rows, scenario.name, runner.store.path), scenario.name,
                       scenario.detection.threshold, device, torch.get_num_threads())
    seeds = list(null_scenario(scenario)[0].seeds)
    for path in write_null(frame, out, scenario.name, args.keys, seeds):
        print(path)
    failed = [s.failed for s in samples.values() if s.failed]
    if failed:
        print(f"wmbench: {sum(failed)} null draws failed, in {len(failed)} of {len(samples)} rows (the CSV's note and the Markdown's 'Failed draws' say why)", file=sys.stderr)
        return EXIT_CELLS_FAILED
    return 0


def cmd_curve(args: argparse.Namespace) -> int:
    from wmbench.cache import check_folders
    from wmbench.curve import accuracy_time_curve, curve_markdown, write_curve
    from wmbench.scenario import load_scenario

    check_device(args.device)
    out = check_out(args.out)
    scenario = load_scenario(args.scenario, args.set, args.plugin)
    name = f"{scenario.name}_holdout" if args.holdout else scenario.name
    check_entries(out, (f"{name}_curve.csv", f"{name}_curve.md"))  # checked before hours of training
    probe_writable(out)
    check_folders(cache_dir(args))  # a broken link as the cache: exit 4 now, not a warning per seed after its training
    frame = accuracy_time_curve(scenario, cache_dir(args), args.device or scenario.device, progress=not args.quiet, holdout=args.holdout, every=args.every)
    print(curve_markdown(frame))
    for path in write_curve(frame, out, name):
        print(path)
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from wmbench.api import Detection
    from wmbench.detection import ceiling_note
    from wmbench.devices import resolve_device
    from wmbench.ownership import check_distinct, embed, select_cell
    from wmbench.scenario import load_scenario
    from wmbench.worker import CellWorker

    check_distinct(Path(args.out_model), Path(args.out_key))
    check_device(args.device)
    scenario = load_scenario(args.scenario, args.set, args.plugin)
    cell = select_cell(scenario, args.method, args.model, args.dataset, args.seed)
    device = resolve_device(args.device or scenario.device)
    worker = CellWorker(scenario, cache_dir(args), device, progress=not args.quiet)
    meta, verdict = embed(cell, worker, Path(args.out_model), Path(args.out_key), args.force, args.reproducible_seed)
    print(f"cell:   {cell.model.label} / {cell.dataset.label} / {cell.method.label} / seed {cell.seed}")
    print(f"model:  {args.out_model} (clean task metric {meta['metric_value']:.4f})")
    source = "OS randomness" if args.reproducible_seed is None else f"reproducible seed {args.reproducible_seed}: anyone with it and the scenario can rebuild it"
    print(f"key:    {args.out_key} (mode 0600: keep it secret; drawn from {source})")
    outcome = "detected" if verdict.detected else "NOT detected"
    print(f"check:  p-value {verdict.pvalue:.3g} on the written model: {outcome} at the scenario's threshold {verdict.threshold:g}")
    if not verdict.detected and cell.method.obj.name != "none":
        why = ceiling_note(cell.method.obj, Detection(verdict.stat, verdict.pvalue), verdict.threshold) or "a model trained too little, or a method too weak for it"
        print(f"wmbench: warning: the mark is not detectable in the model just written ({why}): do not rely on this key", file=sys.stderr)
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    from wmbench.ownership import detect

    if args.resync and not args.reference:
        raise WmbenchError("--resync needs --reference MODEL (the owner's model file written by wmbench embed)")
    if args.reference and not args.resync:
        raise WmbenchError("--reference is read only with --resync (match the suspect's units onto it first)")
    verdict = detect(Path(args.model), Path(args.key), args.align, args.threshold, args.plugin, Path(args.reference) if args.resync else None)
    if args.json:
        print(json.dumps(verdict.as_dict(), sort_keys=True))
        return 0
    aligned = (" (aligned)" if verdict.align else "") + (" (resynchronised)" if verdict.resync else "")
    print(f"method:    {verdict.method}{aligned}")
    print(f"statistic: {verdict.stat:.6g}")
    print(f"p-value:   {verdict.pvalue:.3g} (log10 {verdict.log10_pvalue:.1f})")
    if verdict.detected:
        print(f"verdict:   watermark detected (p-value < {verdict.threshold:g})")
    else:
        print(f"verdict:   not detected (p-value >= {verdict.threshold:g})")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    load_plugins(args.plugin, Path.cwd(), "--plugin")
    kinds = [args.kind] if args.kind else list(REGISTRIES)
    for kind in kinds:
        registry = REGISTRIES[kind]
        print(f"{kind}:")
        for name in registry.names():
            cls = registry.get(name)
            print(f"  {name}")
            for line in description(cls).splitlines():
                print(f"      {line}".rstrip())
            for field, hint, default in dataclass_params(cls):
                print(f"      {field}: {hint} = {default!r}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from wmbench.inspection import describe

    load_plugins(args.plugin, Path.cwd(), "--plugin")
    print(describe(args.model, field_values(args.arg, "--arg"), args.dataset, field_values(args.dataset_arg, "--dataset-arg"), cache_dir(args)))
    return 0


def field_values(items: list[str], option: str) -> dict[str, Any]:
    """``FIELD=VALUE`` options as a dict, each value read as YAML."""
    import yaml

    from wmbench.names import as_typed, shown
    from wmbench.yaml_doc import read_yaml

    values = {}
    for item in items:
        field, sep, value = item.partition("=")
        if not sep:
            raise WmbenchError(f"{option} expects FIELD=VALUE, got {shown(item)}")
        try:
            values[field] = read_yaml(value)
        except yaml.YAMLError:
            raise WmbenchError(f"{option} {as_typed(item)}: the value is not valid YAML") from None
    return values


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from wmbench.leaderboard import read_results, write_leaderboard
    from wmbench.names import output_name_problem, safe_filename
    from wmbench.summary import DEFAULT_THRESHOLD

    results = Path(args.results)
    if not results.is_file():
        raise WmbenchError(f"{results}: {'not a regular file' if results.exists() else 'no such results file'}")
    if args.name is not None and (problem := output_name_problem(args.name)):
        raise WmbenchError(f"--name {args.name!r}: {problem}")
    if args.threshold is not None and results.suffix != ".jsonl":
        raise WmbenchError(f"--threshold judges a .jsonl results store's rows again; {results.name} is a CSV, which keeps the "
                           "verdicts it was published with (render the store it came from: <cache>/results/<scenario>.jsonl)")
    threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    if not 0.0 < threshold < 1.0:
        raise WmbenchError(f"--threshold must be in (0, 1), got {threshold}")
    out = check_out(args.out)
    probe_writable(out)  # a read-only --out is named (exit 4), not the temporary file a write would make in it
    frame = read_results(results, threshold)
    # The scenario column is data from elsewhere: reduced to a safe file name. --name is the user's own.
    # Rows without a scenario (an empty column) are named after the file, not "None".
    named = [s for s in frame["scenario"] if isinstance(s, str) and s]
    name = args.name or safe_filename(named[0] if named else results.stem)
    for path in write_leaderboard(frame, out, name):
        print(path)
    return 0


PLUGIN_HELP = "import this plug-in module or .py file first (repeatable)"
STORE_HELP = ("the results store, a JSON-lines file of finished cells (default: <cache>/results/<name>.jsonl); "
              "a grid longer than one session resumes from it on any machine")


def scenario_arguments(command: argparse.ArgumentParser, scenario_help: str, outputs: str) -> None:
    """The arguments every scenario-running command shares."""
    command.add_argument("scenario", help=scenario_help)
    command.add_argument("--out", default="results", help=f"where {outputs} go (default: results; --out leaderboard refreshes the published files)")
    command.add_argument("--cache", help="cache directory: trainings, decoded datasets, results, curve points (default: $WMBENCH_CACHE, else $XDG_CACHE_HOME/wmbench, else ~/.cache/wmbench)")
    command.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: the scenario's)")
    command.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                         help="override a scenario field, e.g. training.epochs=2 or datasets[0].args.root=/data (repeatable)")
    command.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    command.add_argument("--plugin", action="append", default=[], help=PLUGIN_HELP + "; added to the scenario's plugins")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wmbench", description="Benchmark white-box neural-network watermarking.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a scenario file and write its leaderboard")
    scenario_arguments(run, "scenario YAML file", "<name>.csv, <name>.md and plots")
    run.add_argument("--store", help=STORE_HELP)
    run.add_argument("--dry-run", action="store_true", help="print the grid (cells, trainings to do, cached) and stop")
    run.add_argument("--executor", default="local", choices=["local", "ray"], help="where cells run (default: local; ray needs wmbench[ray])")
    run.add_argument("--address", help="the Ray cluster to use (default: $RAY_ADDRESS, else a new local instance)")
    run.set_defaults(func=cmd_run)

    nul = sub.add_parser("null", help="measure each detector's false-positive rate on unwatermarked models (many keys)")
    scenario_arguments(nul, "scenario YAML file (run it first for the TPR columns)", "<name>_null.csv and <name>_null.md")
    nul.add_argument("--store", help=STORE_HELP + "; the watermarked rows of the TPR columns are read from it")
    nul.add_argument("--keys", type=int, default=200, help="independent keys per method and unwatermarked model (default: 200)")
    nul.set_defaults(func=cmd_null)

    cur = sub.add_parser("curve", help="accuracy-time curve of a scenario's recipe: each model trained unwatermarked, tested after every epoch")
    scenario_arguments(cur, "scenario YAML file (its datasets, models, seeds and training block)", "<name>_curve.csv and <name>_curve.md")
    cur.add_argument("--holdout", type=int, default=0, metavar="N",
                     help="measure on N training images held out of the training (the same images for every recipe and seed) "
                          "instead of the test set, to choose a recipe without it; writes <name>_holdout_curve.*")
    cur.add_argument("--every", type=int, default=1, metavar="K",
                     help="measure every K epochs and at the last (default: 1, every epoch); evaluations add wall time, not training minutes")
    cur.set_defaults(func=cmd_curve)

    emb = sub.add_parser("embed", help="train a scenario's cell and write the watermarked model and its key")
    emb.add_argument("scenario", help="scenario YAML file (its training settings are used)")
    emb.add_argument("--out-model", required=True, help="where the model goes (safetensors)")
    emb.add_argument("--out-key", required=True, help="where the secret key goes (safetensors, mode 0600)")
    emb.add_argument("--method", help="method label (default: the first that is not none)")
    emb.add_argument("--model", help="model label (default: the first)")
    emb.add_argument("--dataset", help="dataset label (default: the first)")
    emb.add_argument("--seed", type=int, help="seed (default: the first)")
    emb.add_argument("--reproducible-seed", type=int, metavar="N",
                     help="draw the key from seed N instead of the OS's randomness (reproducible, so not secret; cached)")
    emb.add_argument("--cache", help="cache directory (a cached training is reused with --reproducible-seed)")
    emb.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: the scenario's)")
    emb.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a scenario field")
    emb.add_argument("--force", action="store_true", help="overwrite existing output files")
    emb.add_argument("--plugin", action="append", default=[], help=PLUGIN_HELP + "; added to the scenario's plugins")
    emb.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    emb.set_defaults(func=cmd_embed)

    det = sub.add_parser("detect", help="test a model for the watermark of a key (exit 0 either way; read the verdict)")
    det.add_argument("--model", required=True, help="the suspect model: a safetensors state dict of the key's architecture")
    det.add_argument("--key", required=True, help="the key written by wmbench embed (or from the cache)")
    det.add_argument("--align", action=argparse.BooleanOptionalAction, default=None,
                     help="undo per-channel rescaling before reading the mark (methods with an align option)")
    det.add_argument("--resync", action="store_true",
                     help="match the suspect's units to the owner's model first (undoes permutation, rescaling, dummy units)")
    det.add_argument("--reference", help="with --resync: the owner's model file (safetensors, from wmbench embed)")
    det.add_argument("--threshold", type=float, default=1e-6, help="detected when the p-value is below this (default: 1e-6)")
    det.add_argument("--plugin", action="append", default=[], help=PLUGIN_HELP)
    det.add_argument("--json", action="store_true", help="print the result as one JSON object")
    det.set_defaults(func=cmd_detect)

    lst = sub.add_parser("list", help="list registered components with their parameters")
    lst.add_argument("kind", nargs="?", choices=list(REGISTRIES))
    lst.add_argument("--plugin", action="append", default=[], help=PLUGIN_HELP)
    lst.set_defaults(func=cmd_list)

    ins = sub.add_parser("inspect", help="a model's parameter names, shapes, counts and dead weights (those that cannot change the output)")
    ins.add_argument("model", help="model registry name (wmbench list models)")
    ins.add_argument("--dataset", default="cifar10", help="the data whose input size and classes the model is built for (default: cifar10)")
    ins.add_argument("--arg", action="append", default=[], metavar="FIELD=VALUE", help="a model argument, e.g. width=32 (repeatable)")
    ins.add_argument("--dataset-arg", action="append", default=[], metavar="FIELD=VALUE",
                     help="a dataset argument, e.g. size=64 for synthetic (repeatable)")
    ins.add_argument("--cache", help="cache directory the dataset is read from, when it is loaded (default: $WMBENCH_CACHE, else $XDG_CACHE_HOME/wmbench, else ~/.cache/wmbench)")
    ins.add_argument("--plugin", action="append", default=[], help=PLUGIN_HELP)
    ins.set_defaults(func=cmd_inspect)

    board = sub.add_parser("leaderboard", help="re-render a leaderboard from a results CSV (or .jsonl store)")
    board.add_argument("results")
    board.add_argument("--out", default="results", help="where the re-rendered files go (default: results)")
    board.add_argument("--name", help="output name (default: the scenario column)")
    board.add_argument("--threshold", type=float,
                       help="for a .jsonl store only: the p-value below which a row counts as detected (default: 1e-6); a CSV keeps its verdicts")
    board.add_argument("-q", "--quiet", action="store_true", help="accepted for symmetry with run (re-rendering shows no progress)")
    board.set_defaults(func=cmd_leaderboard)
    return p


@contextlib.contextmanager
def quiet_bars(quiet: bool) -> Iterator[None]:
    """With ``quiet``, every tqdm bar created in the block is off by default, also those wmbench
    does not create itself (dataset decoding, libraries inside attacks)."""
    if not quiet:
        yield
        return
    import functools

    import tqdm.std

    original = tqdm.std.tqdm.__init__
    tqdm.std.tqdm.__init__ = functools.partialmethod(original, disable=True)  # type: ignore[method-assign]
    try:
        yield
    finally:
        tqdm.std.tqdm.__init__ = original  # type: ignore[method-assign]


def os_error(exc: OSError) -> str:
    """``path: cause`` of an OSError (both paths of a rename)."""
    paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    cause = exc.strerror or str(exc) or type(exc).__name__
    return f"{paths}: {cause}" if paths else cause


def one_line(text: str) -> str:
    return " ".join(text.split("\n"))[:2000]


def reported(prog: str, work: Callable[[], int]) -> int:
    """``work()``'s exit code, where the errors a user acts on are one line on stderr, ``prog: error:
    ...``: a WmbenchError exit 2 (its ``exit_code`` where it has one), a fault of the machine (an
    OSError: full disk, read-only or missing folder) exit 4; a closed pipe is no error."""
    try:
        return int(work())
    except WmbenchError as exc:
        print(f"{prog}: error: {one_line(str(exc))}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except BrokenPipeError:  # `wmbench list | head`: the reader left, which is no error
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the interpreter's exit flush must not fail again
        return 0
    except OSError as exc:
        print(f"{prog}: error: {one_line(os_error(exc))}", file=sys.stderr)
        return EXIT_SYSTEM


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    progress_log.setLevel(logging.INFO)  # a minutes-long analysis is announced at the default verbosity too
    try:
        with quiet_bars(getattr(args, "quiet", False)):
            return reported("wmbench", lambda: args.func(args))
    except KeyboardInterrupt:
        print("wmbench: interrupted; finished cells are kept, rerun to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
