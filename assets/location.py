"""The code location of ``workspace.yaml`` (``dg dev -w workspace.yaml``, ``make ui``,
``dagster-webserver -w workspace.yaml``): :mod:`assets.definitions` on the run folder of
``TVE_RUN_DIR`` (default ``./runs/demo``), which first gets the embedded database,
rel-flights, when it has none, so that a fresh clone shows its assets. ``tve`` and ``-m
assets.definitions`` load the definitions without that step: a command never builds a
database it was not asked for.
"""

from assets.definitions import build_definitions, default_run_dir, ensure_embedded_database

ensure_embedded_database(default_run_dir())
defs = build_definitions()
