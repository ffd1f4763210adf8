"""``tve``, the installed command line: the library's commands and the orchestration ones.

The parser is the library's (:mod:`tve_pipeline.cli`: ``import``, ``validate``,
``targets``) with the commands that drive Dagster added between them: ``register``,
``run``, ``experiment``, ``results``, ``materialize`` and ``demo``, whose work is done by
:mod:`assets.commands`. That module (and Dagster with it) is imported when one of them
runs, not when ``tve`` builds its parser, so that ``tve import``, ``tve validate`` and
``tve --help`` start without Dagster. Errors end as the library's commands do: one line on
stderr, exit status 2 (:func:`tve_pipeline.cli.run_command`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tve_pipeline.cli import add_dataset_commands, new_parser, run_command
from tve_pipeline.config import PROFILES
from tve_pipeline.targets_cli import add_targets_parser


def _default_run_dir() -> Path:
    return Path(os.environ.get("TVE_RUN_DIR", Path.cwd() / "runs" / "demo"))


def _cmd_register(args) -> None:
    from assets.commands import dataset_to_register, prepare_run_dir, register_dataset

    run_dir = Path(args.run_dir).resolve()
    name = dataset_to_register(Path(args.dataset_dir), run_dir, args.name)  # before any write
    instance = prepare_run_dir(run_dir)
    info = register_dataset(
        Path(args.dataset_dir), run_dir, instance, profile=args.profile, name=name
    )
    windows = info["windows"]
    span = f" ({windows[0]} .. {windows[-1]})" if windows else ""
    print(
        f"registered database {info['name']!r} in {run_dir}: {len(windows)} windows{span}, "
        f"{len(info['added'])} new; tasks: {', '.join(info['tasks']) or '(none)'}; "
        f"recipe profile {info['profile']!r}"
    )
    print(
        f"next: tve run {info['name']} --run-dir {run_dir}   "
        f"(or `make ui RUN_DIR={run_dir}` and reload the code location)"
    )


def _cmd_run(args) -> None:
    from assets.commands import run_database

    run_database(args.database, Path(args.run_dir))


def _cmd_experiment(args) -> None:
    from assets.commands import run_experiment

    tasks = [t for t in (args.tasks or "").split(",") if t] or None
    run_experiment(
        args.database,
        Path(args.run_dir),
        args.preset,
        parallel=args.parallel,
        tasks=tasks,
        restricted=args.restricted,
    )


def _restricted_ks(text: str) -> list[int]:
    """``--restricted``: comma-separated ks (``10`` or ``5,10``), or ``none``."""
    if text.strip().lower() == "none":
        return []
    try:
        ks = [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        ks = []
    if not ks or any(k < 1 for k in ks):
        raise argparse.ArgumentTypeError(
            f"--restricted must be positive integers (e.g. 10 or 5,10) or none, got {text!r}"
        )
    return ks


def _cmd_results(args) -> None:
    from assets.commands import show_results

    show_results(args.database, Path(args.run_dir))


def _cmd_materialize(args) -> None:
    from assets.commands import materialize

    materialize(args.asset, args.partition, Path(args.run_dir))


def _cmd_demo(args) -> None:
    from assets.commands import run_demo

    run_demo(Path(args.run_dir), profile=args.profile)


def add_orchestration_commands(subparsers: argparse._SubParsersAction) -> None:
    """``tve register``, ``run``, ``experiment``, ``results``, ``materialize``, ``demo``;
    each works on a run folder (``--run-dir``, default ``$TVE_RUN_DIR`` or ``runs/demo``)."""
    run_dir = str(_default_run_dir())

    reg = subparsers.add_parser(
        "register", help="add a dataset folder to a run folder as a database partition"
    )
    reg.add_argument("dataset_dir")
    reg.add_argument("--run-dir", default=run_dir)
    reg.add_argument(
        "--name",
        default=None,
        help="the database's name (default: the name in the dataset's manifest.yaml, "
        "which `tve import` takes from its YAML)",
    )
    reg.add_argument(
        "--profile",
        choices=PROFILES,
        default=None,
        help="recipe profile of the run folder (written to recipe.json; default: keep it, "
        "or 'reference' for a new run folder)",
    )
    reg.set_defaults(func=_cmd_register)

    run = subparsers.add_parser(
        "run", help="materialise whatever is missing or stale upstream of a database's metrics"
    )
    run.add_argument("database")
    run.add_argument("--run-dir", default=run_dir)
    run.set_defaults(func=_cmd_run)

    exp = subparsers.add_parser(
        "experiment", help="run a database's experiment cells as one Dagster backfill"
    )
    exp.add_argument("database")
    exp.add_argument(
        "--preset", choices=PROFILES, default="cpu", help="the recipe profile of the experiment"
    )
    exp.add_argument("--parallel", type=int, default=2, help="runs at a time (and gpu pool slots)")
    exp.add_argument(
        "--tasks", default=None, help="comma-separated tasks to fine-tune (default: every task)"
    )
    exp.add_argument(
        "--restricted",
        type=_restricted_ks,
        default=None,
        metavar="K[,K...]|none",
        help="restricted tasks beside the label fractions: each task restricted to its K most "
        "active entities per seed time (cells 'top<K>'), for this database (kept in "
        "recipe.json; default: what it has)",
    )
    exp.add_argument("--run-dir", default=run_dir)
    exp.set_defaults(func=_cmd_experiment)

    res = subparsers.add_parser(
        "results", help="print a database's results (mean ± std, paired differences to scratch)"
    )
    res.add_argument("database")
    res.add_argument("--run-dir", default=run_dir)
    res.set_defaults(func=_cmd_results)

    mat = subparsers.add_parser(
        "materialize", help="materialise one asset of a database, checking the key first"
    )
    mat.add_argument("asset")
    mat.add_argument(
        "--partition",
        required=True,
        help="'database', 'database|window' (YYYY-MM-DD) or 'database|task'",
    )
    mat.add_argument("--run-dir", default=run_dir)
    mat.set_defaults(func=_cmd_materialize)

    demo = subparsers.add_parser("demo", help="run the whole pipeline on rel-flights")
    demo.add_argument("--run-dir", default=run_dir)
    demo.add_argument("--profile", choices=PROFILES, default="demo")
    demo.set_defaults(func=_cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    """The whole ``tve`` command line, its commands in the order ``tve --help`` lists them."""
    parser, subparsers = new_parser()
    add_dataset_commands(subparsers)
    add_orchestration_commands(subparsers)
    add_targets_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``tve`` entry point: parse, run, exit status 0 or 2 (one line on stderr)."""
    return run_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
