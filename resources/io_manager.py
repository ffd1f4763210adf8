"""The IO manager of the pickled asset values (``<run dir>/storage/``), written atomically.

Dagster's ``FilesystemIOManager`` (1.13) opens the asset's file for writing and pickles
into it: a run killed mid-write (SIGKILL, out of memory, a lost node) leaves a truncated
pickle under the final name, and the earlier materialisation of that partition is gone.
Here the pickle goes to a temporary file beside it that replaces it when complete
(:func:`tve_pipeline.common.atomic_path`), so a reader sees the earlier value or the new
one. Paths, the pickle protocol and the error for an unpicklable value are Dagster's.
"""

from typing import Any

import dagster as dg
from dagster._core.storage.fs_io_manager import PickledObjectFilesystemIOManager

from tve_pipeline.common import atomic_path


class AtomicPickledObjectFilesystemIOManager(PickledObjectFilesystemIOManager):
    """Local files only (the run folder's ``storage/``): ``os.replace`` is what makes it atomic."""

    def dump_to_path(self, context: dg.OutputContext, obj: Any, path) -> None:
        with atomic_path(path) as tmp:
            super().dump_to_path(context, obj, path.with_name(tmp.name))


class AtomicFilesystemIOManager(dg.FilesystemIOManager):
    """``FilesystemIOManager`` (same configuration, same files) with atomic writes."""

    @classmethod
    def _is_dagster_maintained(cls) -> bool:
        return False

    def create_io_manager(self, context) -> AtomicPickledObjectFilesystemIOManager:
        base_dir = self.base_dir or context.instance.storage_directory()
        return AtomicPickledObjectFilesystemIOManager(base_dir=base_dir)
