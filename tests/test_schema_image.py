"""The schema drawn as an image for the UI (Dagster 1.13 renders no Mermaid)."""

import base64
import io
import re

import matplotlib.image as mpimg
from relbench.manifest import TableSpec

from tve_pipeline.schema_diagram import schema_layers, schema_png


def _f1_like():
    # rel-f1's key structure, by hand: circuits <- races <- results -> drivers, constructors
    return {
        "circuits": TableSpec(pkey="circuitId"),
        "races": TableSpec(pkey="raceId", time_col="date", fkeys={"circuitId": "circuits"}),
        "drivers": TableSpec(pkey="driverId"),
        "constructors": TableSpec(pkey="constructorId"),
        "results": TableSpec(
            pkey="resultId",
            time_col="date",
            fkeys={"raceId": "races", "driverId": "drivers", "constructorId": "constructors"},
        ),
        "self_ref": TableSpec(pkey="id", fkeys={"parent": "self_ref", "gone": "not_a_table"}),
    }


def test_referenced_tables_sit_left_of_the_tables_that_reference_them():
    assert schema_layers(_f1_like()) == {
        "circuits": 0,
        "races": 1,
        "drivers": 0,
        "constructors": 0,
        "results": 2,
        "self_ref": 0,  # a key to itself or to a missing table is not followed
    }


def test_a_cycle_of_foreign_keys_is_cut_where_it_closes():
    tables = {
        "a": TableSpec(pkey="id", fkeys={"b": "b"}),
        "b": TableSpec(pkey="id", fkeys={"a": "a"}),
    }
    layers = schema_layers(tables)
    assert sorted(layers.values()) == [0, 1]


def test_the_schema_image_is_a_png_wider_for_more_layers():
    wide = mpimg.imread(io.BytesIO(schema_png(_f1_like(), {"races": {"year": "numerical"}})))
    flat = mpimg.imread(io.BytesIO(schema_png({"t": TableSpec(pkey="id")}, {})))
    assert wide.ndim == 3 and wide.shape[1] > flat.shape[1] > 0


def test_raw_tables_show_the_schema_image(pipeline_run):
    import dagster as dg

    records = pipeline_run["instance"].fetch_materializations(
        dg.AssetKey(["tiny", "raw_tables"]), limit=1
    )
    text = records.records[0].asset_materialization.metadata["schema_image"].value
    (encoded,) = re.findall(r"\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", text)
    image = mpimg.imread(io.BytesIO(base64.b64decode(encoded)))
    assert image.shape[0] > 50 and image.shape[1] > 50
