"""Where an erased concept lands: its nearest vocabulary words after an edit, and a UMAP map with arrows.

The vocabulary is a concept set's concepts, words related to each group, and a few hundred unrelated
distractors (``vocabulary(concept_set)``; the pipeline's concept set by default). Neighbours and
distances are always measured in the original high-dimensional space (cosine distance by default); the
2-D map only illustrates them. Embeddings come from :func:`workbench.embed.embed`, so any space works: ``"text"``, ``"text.{i}"`` or a
UNet cross-attention key/value space such as ``"unet.mid.0.xattn.k"`` (where UCE and RECE act).

>>> import workbench
>>> from workbench.methods import uce
>>> from workbench.project import landing
>>> pipe = workbench.load("toy")
>>> edit = uce(pipe, "apple")
>>> words = ["pear", "banana", "car", "truck", "happy", "table"]     # default: the model's vocabulary
>>> table = landing(pipe, edit, "apple", vocabulary=words, space="unet.mid.0.xattn.k", k=3)
>>> list(table.columns)
['concept', 'rank', 'neighbour', 'kind', 'group', 'distance', 'distance_before', 'rank_before']
>>> table.neighbour.tolist()                  # after erasure: next to a contentless word
['happy', 'table', 'banana']
>>> landing(pipe, None, "apple", vocabulary=words, space="unet.mid.0.xattn.k", k=3).neighbour.tolist()
['pear', 'banana', 'car']

The map (UMAP is fitted once; the first fit in a fresh environment compiles for about a minute)::

    m = LandingMap.fit(pipe, space="unet.mid.0.xattn.k", seed=0)
    m.landing(pipe, edit, "apple")              # the same table, against the map's vocabulary
    plots.save(m.figure(pipe, edit, ["apple"]), "apple.pdf")
"""
from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .concepts import ConceptSet
from .embed import embed, embed_rows
from .plots import landing_map
from .profile import profile_of

METRICS = ("cosine", "euclidean")


def _read_vocabulary(concepts: ConceptSet) -> pd.DataFrame:
    """The concepts, then the words of the concept set's vocabulary file: ``[related <group>]`` sections
    and distractor sections."""
    if concepts.vocabulary is None:
        raise ValueError(f"the concept set {concepts.name!r} has no vocabulary file; give the words as a list")
    return _parse_vocabulary(tuple((c, concepts.group(c)) for c in concepts.names), Path(concepts.vocabulary))


@lru_cache(maxsize=4)
def _parse_vocabulary(concepts: tuple[tuple[str, str], ...], path: Path) -> pd.DataFrame:
    rows = [(c, "concept", group) for c, group in concepts]
    kind = group = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            head = line.strip("[]").split()
            kind, group = ("related", head[1]) if head[0] == "related" else ("distractor", "")
            continue
        if kind is None:
            raise ValueError(f"{path}: the word {line!r} comes before any [section] header")
        rows.append((line, kind, group))
    table = pd.DataFrame(rows, columns=["word", "kind", "group"])
    dupes = table.word[table.word.duplicated()].tolist()
    if dupes:
        raise ValueError(f"{path} repeats {', '.join(dupes)}; each word may appear once")
    return table


def vocabulary(concepts: ConceptSet) -> pd.DataFrame:
    """A concept set's vocabulary: one row per word with its ``kind`` ("concept", "related" or
    "distractor") and ``group`` (the concept's group, a related word's, or "" for a distractor)."""
    return _read_vocabulary(concepts).copy()


def _as_vocabulary(pipe, words: Sequence[str] | pd.DataFrame | None) -> pd.DataFrame:
    """A vocabulary table from None (the default), a table with a ``word`` column, or a list of words;
    words the default vocabulary knows keep its kind and group, others are kind "extra"."""
    concepts = profile_of(pipe).concepts
    if words is None:
        if concepts is None:
            raise ValueError("this model has no concept set, so no default vocabulary: give the words as a list")
        return vocabulary(concepts)
    if isinstance(words, pd.DataFrame):
        if "word" not in words.columns:
            raise ValueError("a vocabulary table needs a 'word' column (and optionally 'kind', 'group')")
        table = words.reset_index(drop=True).copy()
    else:
        if isinstance(words, str):
            raise TypeError("give the vocabulary as a list of words, not one string")
        known = (_read_vocabulary(concepts) if concepts is not None and concepts.vocabulary is not None
                 else pd.DataFrame(columns=["word", "kind", "group"])).set_index("word")
        table = pd.DataFrame({"word": list(words)})
        table["kind"] = [known.kind.get(w, "extra") for w in table.word]
        table["group"] = [known.group.get(w, "") for w in table.word]
    table["kind"] = table.get("kind", "extra")
    table["group"] = table.get("group", "")
    if table.empty:
        raise ValueError("the vocabulary is empty; give at least a few words (or None for the default)")
    dupes = table.word[table.word.duplicated()].unique().tolist()
    if dupes:
        raise ValueError(f"the vocabulary repeats {', '.join(map(repr, dupes[:5]))}; give each word once")
    return table[["word", "kind", "group"]]


def _distances(a: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
    """``[len(a), len(b)]`` distances, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if metric == "cosine":
        an = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        bn = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
        return np.clip(1.0 - an @ bn.T, 0.0, 2.0)
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.maximum(d2, 0.0))


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: use {' or '.join(map(repr, METRICS))}")


def _applied(pipe, edit) -> Any:
    return nullcontext() if edit is None else edit.apply(pipe)


def _landing(vocab: pd.DataFrame, base: np.ndarray, concept: str, before: np.ndarray, after: np.ndarray,
             k: int, metric: str) -> pd.DataFrame:
    others = (vocab.word != concept).to_numpy()
    if k < 1 or k > others.sum():
        raise ValueError(f"k={k}: ask for 1..{others.sum()} neighbours (the vocabulary size, less the concept)")
    ref, words = base[others], vocab[others].reset_index(drop=True)
    d_after = _distances(after[None], ref, metric)[0]
    d_before = _distances(before[None], ref, metric)[0]
    order = np.argsort(d_after, kind="stable")[:k]
    rank_before = np.empty(len(ref), int)
    rank_before[np.argsort(d_before, kind="stable")] = np.arange(1, len(ref) + 1)
    return pd.DataFrame({
        "concept": concept, "rank": np.arange(1, k + 1), "neighbour": words.word[order].to_numpy(),
        "kind": words.kind[order].to_numpy(), "group": words.group[order].to_numpy(),
        "distance": d_after[order], "distance_before": d_before[order], "rank_before": rank_before[order],
    })


def landing(pipe, edit, concept: str, k: int = 5, vocabulary: Sequence[str] | pd.DataFrame | None = None,
            space: str = "text", pool: str = "mean", metric: str = "cosine") -> pd.DataFrame:
    """The ``k`` vocabulary words nearest to ``concept`` once ``edit`` is applied, nearest first.

    Distances are in ``space`` itself (no 2-D map involved), from the edited concept to the unedited
    model's vocabulary (``distance``), and from the unedited concept (``distance_before``, with
    ``rank_before`` its rank then). ``edit=None`` gives the unedited neighbours. The concept itself is
    left out of its neighbours.
    """
    _check_metric(metric)
    vocab = _as_vocabulary(pipe, vocabulary)
    base = embed(pipe, vocab.word.tolist(), space, pool)
    before = embed(pipe, [concept], space, pool)[0]
    with _applied(pipe, edit):
        after = embed(pipe, [concept], space, pool)[0]
    return _landing(vocab, base, concept, before, after, k, metric)


def _umap():
    """``umap.UMAP``, with numba's on-disk cache turned on for umap's compiled functions (umap ships
    them uncached, pynndescent's are cached already), so later processes skip most of the compile.
    numba puts the cache beside the package, or in its user cache folder when that is read-only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import umap
        from numba.core.dispatcher import Dispatcher
    for name, module in list(sys.modules.items()):
        if module is None or name.split(".")[0] != "umap":
            continue
        for value in list(vars(module).values()):
            if isinstance(value, Dispatcher) and type(value._cache).__name__ == "NullCache":
                value.enable_caching()
    return umap.UMAP


@contextmanager
def _keep_torch_threads() -> Iterator[None]:
    """UMAP's numba (through its OpenMP layer) resets the process's OpenMP thread count, which torch
    shares; on a busy machine every later generation then runs several times slower. Restore it."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class LandingMap:
    """A 2-D UMAP map of a vocabulary's embeddings in one space of the *unedited* model."""

    vocabulary: pd.DataFrame  # word, kind, group
    embeddings: np.ndarray  # [words, width], the unedited model's, in ``space``
    coords: np.ndarray  # [words, 2]
    space: str
    pool: str
    metric: str
    seed: int
    reducer: Any

    @classmethod
    def fit(cls, pipe, vocabulary: Sequence[str] | pd.DataFrame | None = None, space: str = "text",
            pool: str = "mean", seed: int = 0, metric: str = "cosine", n_neighbors: int = 15,
            min_dist: float = 0.1) -> LandingMap:
        """Fit UMAP on ``pipe``'s embeddings of ``vocabulary`` (default :func:`vocabulary`); call it on the
        unedited model. The same seed gives the same coordinates."""
        _check_metric(metric)
        vocab = _as_vocabulary(pipe, vocabulary)
        if len(vocab) <= n_neighbors:
            raise ValueError(f"{len(vocab)} words are too few for n_neighbors={n_neighbors}; give more words")
        emb = embed(pipe, vocab.word.tolist(), space, pool)
        reducer = _umap()(n_neighbors=n_neighbors, min_dist=min_dist, metric=metric, random_state=seed,
                          transform_seed=seed, n_jobs=1)
        with warnings.catch_warnings(), _keep_torch_threads():
            warnings.simplefilter("ignore")
            coords = reducer.fit_transform(np.asarray(emb))
        return cls(vocab, np.asarray(emb), np.asarray(coords, np.float64), space, pool, metric, seed, reducer)

    def __repr__(self) -> str:
        return (f"LandingMap({len(self.vocabulary)} words, space={self.space!r}, pool={self.pool!r}, "
                f"metric={self.metric!r}, seed={self.seed})")

    def transform(self, vectors: np.ndarray) -> np.ndarray:
        """``[n, 2]`` map coordinates of vectors in this map's space."""
        vectors = np.asarray(vectors, np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.embeddings.shape[1]:
            raise ValueError(f"vectors of shape {vectors.shape} do not fit this {self.space!r} map, whose "
                             f"vectors are {self.embeddings.shape[1]} wide")
        with warnings.catch_warnings(), _keep_torch_threads():
            warnings.simplefilter("ignore")
            return np.asarray(self.reducer.transform(vectors), np.float64)

    def embed(self, pipe, words: Sequence[str]) -> np.ndarray:
        """``pipe``'s current embeddings of ``words`` in this map's space and pool."""
        return embed(pipe, list(words), self.space, self.pool)

    def landing(self, pipe, edit, concept: str, k: int = 5) -> pd.DataFrame:
        """:func:`landing` against this map's vocabulary and space (the map's own embeddings as reference)."""
        before = self.embed(pipe, [concept])[0]
        with _applied(pipe, edit):
            after = self.embed(pipe, [concept])[0]
        return _landing(self.vocabulary, self.embeddings, concept, before, after, k, self.metric)

    def arrows(self, pipe, edit, words: Sequence[str]) -> pd.DataFrame:
        """Where ``words`` sit before (``x0, y0``) and after (``x1, y1``) ``edit``, and how far they moved
        in the original space (``shift``). A vocabulary word starts at its fitted point; a word whose
        embedding the edit leaves unchanged does not move."""
        words = list(words)
        before = self.embed(pipe, words)
        with _applied(pipe, edit):
            after = self.embed(pipe, words)
        index = {w: i for i, w in enumerate(self.vocabulary.word)}
        start = self.transform(before)
        for j, w in enumerate(words):
            if w in index:
                start[j] = self.coords[index[w]]
        end = self.transform(after)
        shift = np.diag(_distances(before, after, self.metric))
        still = np.all(np.isclose(before, after, rtol=1e-6, atol=1e-7), axis=1)
        end[still] = start[still]
        return pd.DataFrame({"word": words, "x0": start[:, 0], "y0": start[:, 1], "x1": end[:, 0],
                             "y1": end[:, 1], "shift": shift})

    def derived(self, pipe, edit) -> pd.DataFrame:
        """RECE's derived embeddings (``edit.extras["derived.{epoch}"]``) placed in the map, one row per
        epoch and concept, with the nearest vocabulary word in the original space. In a UNet space they
        are projected with the edited layer's weights (``edit`` applied), the model they were derived
        for. Empty when the edit has none. Only token rows are placed: a transformer's derived pooled vectors
        (``derived.pooled.{epoch}``) live in no token-row space."""
        erased = list(edit.params.get("erase") or [edit.concept])
        # an edit that erased the concept in several templates shows the bare concept's embedding
        chosen = [erased.index(edit.concept)] if edit.concept in erased else list(range(len(erased)))
        prompts = [erased[i] for i in chosen]
        rows = []
        keys = sorted((k for k in edit.extras if k.startswith("derived.") and k.split(".")[1].isdigit()),
                      key=lambda k: int(k.split(".")[1]))
        if not keys:
            return pd.DataFrame(columns=["label", "concept", "epoch", "x", "y", "nearest", "distance"])
        with edit.apply(pipe):
            rows_of = {k: edit.extras[k].reshape(len(erased), -1, edit.extras[k].shape[-1]) for k in keys}
            vectors = [embed_rows(pipe, rows_of[k][chosen], prompts, self.space, self.pool) for k in keys]
        vectors = np.concatenate(vectors)
        coords = self.transform(vectors)
        d = _distances(vectors, self.embeddings, self.metric)
        for i, (key, concept) in enumerate((k, c) for k in keys for c in prompts):
            epoch = int(key.split(".")[1])
            j = int(np.argmin(d[i]))
            rows.append({"label": f"{concept} (derived, epoch {epoch})", "concept": concept, "epoch": epoch,
                         "x": coords[i, 0], "y": coords[i, 1], "nearest": self.vocabulary.word[j],
                         "distance": float(d[i, j])})
        return pd.DataFrame(rows)

    def points(self) -> pd.DataFrame:
        """The fitted map as a table: word, kind, group, x, y."""
        return self.vocabulary.assign(x=self.coords[:, 0], y=self.coords[:, 1])

    def figure(self, pipe, edit=None, concepts: Sequence[str] = (), title: str = ""):
        """:func:`workbench.plots.landing_map` of this map, with arrows for ``concepts`` (default: the
        edit's erased concepts) and RECE's derived embeddings when the edit has them; groups are coloured
        as the model's concept set says."""
        if edit is not None and not concepts:
            concepts = list(edit.params.get("erase") or [edit.concept])
        arrows = self.arrows(pipe, edit, concepts) if concepts else None
        derived = self.derived(pipe, edit) if edit is not None else None
        if title == "" and edit is not None:
            title = f"{edit.method}: {edit.concept} ({self.space}, {self.pool})"
        concepts = profile_of(pipe).concepts
        return landing_map(self.points(), arrows, derived, title=title,
                           colours=concepts.colours if concepts is not None else None)
