"""Synthetic catalogues: clustered embeddings with categories, reproducible from a seed.

Real embedding sets are clustered (items of a kind sit together), which is what makes an
HNSW index both useful and imperfect; uniform random vectors would make every benchmark
and recall figure misleading. Used by the demo catalogue, the tests and the benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["Catalogue", "clustered_catalogue"]

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
