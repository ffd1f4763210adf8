"""The Dagster layer: partitions, assets (thin shells over ``tve_pipeline``), sensors,
definitions."""
