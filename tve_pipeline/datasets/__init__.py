"""Build RelBench 3 dataset folders: the writer, rel-f1, rel-flights, a user's own files,
a synthetic shop."""

from tve_pipeline.datasets.files import build_from_files
from tve_pipeline.datasets.flights import build_flights
from tve_pipeline.datasets.relf1 import build_rel_f1
from tve_pipeline.datasets.synthetic import build_synthetic
from tve_pipeline.datasets.writer import (
    IMPORT_REPORT_FILE,
    ForeignKey,
    KeyReport,
    reindex_primary_keys,
    write_dataset,
)

__all__ = [
    "IMPORT_REPORT_FILE",
    "ForeignKey",
    "KeyReport",
    "build_flights",
    "build_from_files",
    "build_rel_f1",
    "build_synthetic",
    "reindex_primary_keys",
    "write_dataset",
]
