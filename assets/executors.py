"""Where a run's steps execute: in the run's own process (the default), or past one machine.

A run here is one partition of one or two steps (a window range, a checkpoint, a cell). On one
machine parallelism comes from runs (the run queue and the ``gpu`` pool), and the in-process
executor spares each step a Python start (torch + relbench imports: ~14 s) and a second load
of the graph. Past one machine the steps go where the GPUs are, chosen by ``TVE_EXECUTOR``
when the code location loads:

- ``in_process`` (default): every step in the run's process.
- ``multiprocess``: a process per step, on the run's machine.
- ``celery``: every step is a Celery task on the broker ``TVE_CELERY_BROKER``
  (``redis://host:6379/0``; the same Redis is the result backend), run by whichever
  ``dagster-celery`` worker takes it (``deploy/celery.yaml``).
- ``k8s``: every step is a Kubernetes Job; the assets that train ask for a GPU through their
  ``dagster-k8s/config`` op tag (:data:`GPU_STEP_TAGS`), the other steps for none.

``TVE_EXECUTOR_CONFIG`` names a YAML file with the executor's config under ``execution:
config:`` (the layout of run config, which ``dagster-celery worker start -y`` reads too); it
is checked against the executor's schema here, so a typo fails when the code location loads,
not in the first run. Every executor but ``in_process`` needs a Dagster instance that all
processes share (PostgreSQL, ``deploy/dagster.yaml``) and a run folder that every machine
sees at the same path (asset values, targets and checkpoints are files in it).
"""

import os
from collections.abc import Mapping
from pathlib import Path

import dagster as dg
import yaml

EXECUTORS = ("in_process", "multiprocess", "celery", "k8s")

# The op tag that the Kubernetes executor reads for a step's pod (merged into the executor's
# own `step_k8s_config`; `per_step_k8s_config` in the executor config overrides it per op, e.g.
# several GPUs for a DDP pre-training step). Other executors ignore it.
GPU_STEP_TAGS = {
    "dagster-k8s/config": {
        "container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}},
    }
}


def _executor_definition(name: str) -> dg.ExecutorDefinition:
    if name == "in_process":
        return dg.in_process_executor
    if name == "multiprocess":
        return dg.multiprocess_executor
    if name == "celery":
        from dagster_celery import celery_executor

        return celery_executor
    from dagster_k8s import k8s_job_executor

    return k8s_job_executor


def executor_config(environ: Mapping[str, str]) -> dict:
    """The executor's config from ``TVE_EXECUTOR_CONFIG`` (its ``execution: config:``), with the
    Celery broker of ``TVE_CELERY_BROKER`` where the file names none."""
    config = {}
    path = environ.get("TVE_EXECUTOR_CONFIG")
    if path:
        if not Path(path).is_file():
            raise ValueError(f"TVE_EXECUTOR_CONFIG={path!r}: no such file")
        document = yaml.safe_load(Path(path).read_text()) or {}
        config = dict(((document.get("execution") or {}).get("config")) or {})
    if environ.get("TVE_EXECUTOR") == "celery" and "broker" not in config:
        if not environ.get("TVE_CELERY_BROKER"):
            raise ValueError(
                "TVE_EXECUTOR=celery needs the broker: set TVE_CELERY_BROKER "
                "(e.g. redis://HOST:6379/0) or name it in TVE_EXECUTOR_CONFIG's execution.config"
            )
        # read from each process's environment when a run starts, not written into the UI
        config["broker"] = {"env": "TVE_CELERY_BROKER"}
        config.setdefault("backend", {"env": "TVE_CELERY_BROKER"})
    return config


def executor_from_environment(environ: Mapping[str, str] | None = None) -> dg.ExecutorDefinition:
    """The executor that ``TVE_EXECUTOR`` names (``in_process`` when unset), configured from
    ``TVE_EXECUTOR_CONFIG`` / ``TVE_CELERY_BROKER``; a bad name or config fails in one line."""
    from dagster._config import validate_config

    environ = os.environ if environ is None else environ
    name = environ.get("TVE_EXECUTOR") or "in_process"
    if name not in EXECUTORS:
        raise ValueError(f"TVE_EXECUTOR={name!r} is not one of {', '.join(EXECUTORS)}")
    executor = _executor_definition(name)
    config = executor_config({**environ, "TVE_EXECUTOR": name})
    if not config:
        return executor
    checked = validate_config(executor.config_schema.config_type, config)
    if not checked.success:
        problems = "; ".join(error.message for error in checked.errors)
        raise ValueError(f"TVE_EXECUTOR_CONFIG: bad {name} executor config: {problems}")
    return executor.configured(config)
