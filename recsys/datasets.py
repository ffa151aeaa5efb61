"""Synthetic catalogues: clustered embeddings with categories, reproducible from a seed.

Real embedding sets are clustered (items of a kind sit together), which is what makes an
HNSW index both useful and imperfect; uniform random vectors would make every benchmark
and recall figure misleading. Used by the demo catalogue, the tests and the benchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["SELECTIVITIES", "Catalogue", "clustered_catalogue", "exact_nearest", "selectivity_tag",
           "selectivity_tags", "subspace_vectors"]

CATEGORIES = ("books", "music", "movies", "games", "garden", "kitchen", "sports", "toys", "tools", "travel")


@dataclass(frozen=True)
class Catalogue:
    ids: list[str]
    vectors: npt.NDArray[np.float32]  # shape (n, dim), unit length
    categories: list[str]
    clusters: npt.NDArray[np.int64]


def clustered_catalogue(
    n: int,
    dim: int,
    *,
    clusters: int = 100,
    spread: float = 0.35,
    seed: int = 42,
    categories: tuple[str, ...] = CATEGORIES,
    category_weights: tuple[float, ...] | None = None,
    id_prefix: str = "item-",
) -> Catalogue:
    """``n`` unit vectors around ``clusters`` random centres, each item given a category.

    ``spread`` is the noise scale relative to the centre (per vector, not per coordinate).
    Categories are drawn independently of clusters with ``category_weights`` (uniform by
    default), so a category filter cuts across the index like real metadata does.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    assignment = rng.integers(0, clusters, size=n)
    noise = rng.standard_normal((n, dim)).astype(np.float32) * (spread / np.sqrt(dim))
    vectors = centres[assignment] + noise
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    weights = np.asarray(category_weights or [1.0] * len(categories), dtype=np.float64)
    picks = rng.choice(len(categories), size=n, p=weights / weights.sum())
    width = max(6, len(str(n)))
    return Catalogue(
        ids=[f"{id_prefix}{i:0{width}d}" for i in range(n)],
        vectors=vectors.astype(np.float32),
        categories=[categories[int(p)] for p in picks],
        clusters=assignment.astype(np.int64),
    )


#: Fractions of the catalogue that the filter tags of :func:`selectivity_tags` select.
SELECTIVITIES = (0.5, 0.05, 0.005, 0.0005)


def selectivity_tag(selectivity: float, *, correlated: bool = False) -> str:
    """The tag that :func:`selectivity_tags` puts on ``selectivity`` of the catalogue."""
    return f"{'near' if correlated else 'far'}-{selectivity:g}"


def selectivity_tags(
    catalogue: Catalogue,
    *,
    around: int,
    correlated: bool,
    seed: int = 11,
    selectivities: tuple[float, ...] = SELECTIVITIES,
) -> list[list[str]]:
    """Filter tags whose selectivity is known and whose relation to a query cluster is chosen.

    Item ``i`` gets ``selectivity_tag(s, correlated=...)`` for each ``s`` whose set it is in; the
    sets are nested (the rarer tag's items also carry the commoner tags).

    * anti-correlated (``correlated=False``): no item of cluster ``around`` carries a tag; the
      tagged items are drawn at random from the other clusters. A query from cluster ``around``
      finds none of them among its neighbours, as with a category that does not surround the
      query item: an index scan has to walk past the whole neighbourhood.
    * correlated: the items nearest the centre of cluster ``around`` carry the tags (ranked by
      similarity with some noise), as with a category that surrounds the query item.
    """
    rng = np.random.default_rng(seed)
    n = len(catalogue.ids)
    if correlated:
        centre = catalogue.vectors[catalogue.clusters == around].mean(axis=0)
        closeness = catalogue.vectors @ (centre / np.linalg.norm(centre))
        order = np.argsort(-(closeness + rng.normal(0.0, float(closeness.std()) * 0.5, n)), kind="stable")
    else:
        eligible = np.flatnonzero(catalogue.clusters != around)
        order = rng.permutation(eligible)
    tags: list[list[str]] = [[] for _ in range(n)]
    for selectivity in selectivities:
        count = round(selectivity * n)
        if count > len(order):
            raise ValueError(f"cannot tag {count} items: only {len(order)} are eligible")
        tag = selectivity_tag(selectivity, correlated=correlated)
        for i in order[:count]:
            tags[int(i)].append(tag)
    return tags


def subspace_vectors(
    n: int,
    dim: int,
    *,
    subspace: int = 24,
    clusters: int = 2000,
    spread: float = 0.6,
    noise: float = 0.25,
    seed: int = 42,
    block: int = 100_000,
) -> npt.NDArray[np.float32]:
    """``n`` unit vectors structured as real embeddings are: clusters in a low-dimensional subspace.

    Cluster centres are Gaussian in a random ``subspace``-dimensional subspace of ``dim``; an
    item is its centre plus Gaussian scatter of relative size ``spread`` within the subspace,
    plus isotropic noise of norm about ``noise`` in the whole space, scaled to unit length.
    Model embeddings concentrate their variance in a few directions like this; isotropic noise
    would make every neighbour almost equally far. Generated in blocks of ``block`` rows.
    """
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((dim, subspace)))
    basis = basis.T.astype(np.float32)  # subspace × dim, orthonormal rows
    centres = rng.standard_normal((clusters, subspace)).astype(np.float32)
    cumulative = np.cumsum(rng.dirichlet(np.full(clusters, 2.0)))  # clusters of uneven size
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, block):
        rows = min(block, n - start)
        assignment = np.minimum(np.searchsorted(cumulative, rng.random(rows)), clusters - 1)
        inner = centres[assignment] + rng.standard_normal((rows, subspace), dtype=np.float32) * spread
        vectors = inner @ basis
        vectors *= 1 / np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors += rng.standard_normal((rows, dim), dtype=np.float32) * np.float32(noise / np.sqrt(dim))
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        out[start:start + rows] = vectors
    return out


def exact_nearest(
    vectors: npt.NDArray[np.float32],
    rows: Sequence[int],
    k: int,
    members: npt.NDArray[np.bool_] | None = None,
) -> list[list[int]]:
    """Ground truth: the ``k`` nearest (cosine) to each of ``rows`` (positions in ``vectors``),
    nearest first, the row itself left out; among ``members`` where given (fewer where fewer
    of them exist). Equal scores go in order of position, as a stable sort of every score
    would put them (duplicate vectors tie)."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    nearest = []
    for row in rows:
        scores = unit @ unit[row]
        if members is not None:
            scores[~members] = -np.inf
        scores[row] = -np.inf
        # Every score from the k-th best on (ties included), in order of position, then ranked.
        kth = np.partition(scores, len(scores) - k)[len(scores) - k] if k < len(scores) else -np.inf
        candidates = np.flatnonzero((scores >= kth) & np.isfinite(scores))
        top = candidates[np.argsort(-scores[candidates], kind="stable")][:k]
        nearest.append([int(i) for i in top])
    return nearest
