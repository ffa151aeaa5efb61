"""The exact nearest neighbours of many items in one pass over the catalogue.

Recall calibration needs, for every sampled item, its true ``k`` nearest neighbours by cosine
distance. Asking the database once per item scans the whole table once per item (hours at a
million items). Instead, one binary ``COPY`` streams every embedding to the client once, and
numpy scores each block of rows against all the sampled items at once (a matrix product),
keeping a running top-``k`` per item. Memory stays bounded by the block size, whatever the
catalogue's size.

Each row travels as its ``ctid`` (6 bytes) and its embedding, so every row has the same width
and a block parses as one numpy record array, without a Python loop over rows. The ``ctid``
of the winners is turned back into ids at the end, in the same ``REPEATABLE READ``
transaction as the ``COPY``: the snapshot keeps every row version it saw, so a concurrent
update or delete cannot make a ``ctid`` point elsewhere.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg

from recsys.search.params import NEGATIVE_WEIGHT

__all__ = ["BLOCK_ROWS", "Mix", "TopK", "exact_neighbours", "row_dtype"]

#: Rows scored per matrix product: bounds the memory of a pass (rows × sampled items floats).
BLOCK_ROWS = 32_768

_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"

# Every embedding as pgvector's binary ``vector`` (a halfvec column is cast), with its ctid.
_COPY_SQL = "COPY (SELECT ctid, embedding::vector FROM items) TO STDOUT (FORMAT BINARY)"
_QUERIES_SQL = "SELECT id, embedding::real[] FROM items WHERE id = ANY(%(ids)s::text[])"
_IDS_SQL = "SELECT ctid::text, id FROM items WHERE ctid = ANY(%(ctids)s::tid[])"

Vectors = npt.NDArray[np.float32]


def row_dtype(dim: int) -> np.dtype[Any]:
    """The layout of one binary COPY tuple ``(ctid, vector(dim))``: fixed width, big-endian."""
    return np.dtype([
        ("fields", ">i2"),
        ("tid_len", ">i4"), ("block", ">u4"), ("offset", ">u2"),
        ("vec_len", ">i4"), ("dim", ">i2"), ("unused", ">i2"), ("vector", ">f4", (dim,)),
    ])


def _unit(vectors: Vectors) -> tuple[Vectors, npt.NDArray[np.bool_]]:
    """``vectors`` scaled to unit length, and which of them are zero (no cosine similarity)."""
    norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors))
    zero = norms == 0
    scale = np.divide(1.0, norms, out=np.zeros_like(norms), where=~zero)
    return vectors * scale[:, None], zero


class TopK:
    """A running top-``k`` (highest cosine similarity) per query over blocks of candidates.

    Candidates are identified by integer keys (here: a row's ``ctid`` packed into 48 bits).
    """

    def __init__(self, queries: Vectors, k: int) -> None:
        self.queries, _ = _unit(np.asarray(queries, dtype=np.float32))
        self.k = k
        n = self.queries.shape[0]
        self.scores = np.full((n, 0), -np.inf, dtype=np.float32)
        self.keys = np.zeros((n, 0), dtype=np.int64)

    def add(self, vectors: Vectors, keys: npt.NDArray[np.int64]) -> None:
        """Score one block of candidates against every query and keep the best ``k`` of each."""
        if len(keys) == 0:
            return
        unit, zero = _unit(vectors)
        similarity = self.queries @ unit.T
        if zero.any():
            similarity[:, zero] = -np.inf  # a zero vector is nobody's neighbour
        if similarity.shape[1] > self.k:
            # The block's own best k per query first, so the merge below stays small.
            best = np.argpartition(similarity, -self.k, axis=1)[:, -self.k:]
            block_scores = np.take_along_axis(similarity, best, axis=1)
            block_keys = keys[best]
        else:
            block_scores = similarity
            block_keys = np.broadcast_to(keys, similarity.shape)
        scores = np.concatenate([self.scores, block_scores], axis=1)
        all_keys = np.concatenate([self.keys, block_keys], axis=1)
        if scores.shape[1] > self.k:
            best = np.argpartition(-scores, self.k - 1, axis=1)[:, : self.k]
            scores = np.take_along_axis(scores, best, axis=1)
            all_keys = np.take_along_axis(all_keys, best, axis=1)
        self.scores, self.keys = scores, all_keys

    def result(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """Keys and similarities per query, best first (rows of ``-inf`` are no candidate)."""
        order = np.argsort(-self.scores, axis=1, kind="stable")
        return np.take_along_axis(self.keys, order, axis=1), np.take_along_axis(self.scores, order, axis=1)


def _parse_header(buffer: bytes) -> int:
    """Bytes taken by the binary COPY header at the start of ``buffer``."""
    if not buffer.startswith(_SIGNATURE):
        raise psycopg.DataError("unexpected binary COPY header")
    (extension,) = struct.unpack_from(">i", buffer, len(_SIGNATURE) + 4)
    return len(_SIGNATURE) + 8 + int(extension)


async def _stream(
    conn: psycopg.AsyncConnection[Any], dim: int, top: TopK
) -> None:
    dtype = row_dtype(dim)
    width = dtype.itemsize
    block_bytes = BLOCK_ROWS * width
    chunks: list[bytes] = []
    size = 0
    rest = b""
    header_done = False

    def score(data: bytes) -> None:
        rows = np.frombuffer(data, dtype=dtype)
        if np.any(rows["fields"] != 2) or np.any(rows["dim"] != dim):
            raise psycopg.DataError(f"unexpected row in the embeddings stream (dimension {dim} expected)")
        keys = (rows["block"].astype(np.int64) << 16) | rows["offset"].astype(np.int64)
        top.add(rows["vector"].astype(np.float32), keys)

    def drain(final: bool) -> bytes:
        """Score the whole rows gathered so far; return the bytes of an incomplete last row."""
        data = rest + b"".join(chunks)
        chunks.clear()
        if final:
            # The stream ends with a trailer: a field count of -1.
            if not data.endswith(b"\xff\xff") or (len(data) - 2) % width:
                raise psycopg.DataError("the embeddings stream ended inside a row or without its trailer")
            score(data[:-2])
            return b""
        whole = len(data) // width * width
        score(data[:whole])
        return data[whole:]

    async with conn.cursor() as cur, cur.copy(_COPY_SQL) as copy:
        async for data in copy:
            chunk = bytes(data)
            if not header_done:
                chunk = chunk[_parse_header(chunk):]
                header_done = True
            chunks.append(chunk)
            size += len(chunk)
            if size >= block_bytes:
                rest = drain(final=False)
                size = len(rest)
    if not header_done:
        raise psycopg.DataError("the embeddings stream ended without its header")
    drain(final=True)


@dataclass(frozen=True)
class Mix:
    """A recommendation-shaped query: ``unit mean(positive) - alpha * unit mean(negative)``.

    Each example is scaled to unit length before the means, as the query path does
    (``recsys_query``, strategy ``average_vector``); the examples are excluded from the results.
    """

    name: str
    positive: tuple[str, ...]
    negative: tuple[str, ...] = ()
    alpha: float = NEGATIVE_WEIGHT

    def vector(self, vectors: dict[str, Vectors]) -> Vectors | None:
        """The query vector from the examples' ``vectors``; ``None`` when an example is missing."""
        if any(item not in vectors for item in self.positive + self.negative):
            return None
        unit, _ = _unit(np.asarray([vectors[item] for item in self.positive + self.negative], dtype=np.float32))
        query = unit[: len(self.positive)].mean(axis=0)
        if self.negative:
            query = query - self.alpha * unit[len(self.positive):].mean(axis=0)
        return query


def _ctid(key: int) -> str:
    return f"({key >> 16},{key & 0xFFFF})"


async def exact_neighbours(
    conn: psycopg.AsyncConnection[Any],
    ids: Sequence[str],
    k: int,
    *,
    mixes: Sequence[Mix] = (),
    statement_timeout_ms: int = 600_000,
) -> tuple[dict[str, list[str]], float]:
    """The exact ``k`` nearest neighbours (cosine) of each item of ``ids``, itself excluded.

    ``mixes`` adds recommendation-shaped queries, answered by name, their examples excluded.
    One pass over the catalogue for all of them, in one ``REPEATABLE READ`` read-only
    transaction. Returns the neighbours by item id or mix name (nearest first; ids missing from
    the catalogue, and mixes with a missing example, are left out) and the seconds spent.
    """
    started = time.perf_counter()
    async with conn.transaction():
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        await conn.execute("SELECT set_config('statement_timeout', %s, true)", [str(statement_timeout_ms)])
        examples = [item for mix in mixes for item in mix.positive + mix.negative]
        rows = await (await conn.execute(_QUERIES_SQL, {"ids": list(ids) + examples})).fetchall()
        stored = {str(r[0]): np.asarray(r[1], dtype=np.float32) for r in rows}
        query_ids = [item for item in dict.fromkeys(ids) if item in stored]
        excluded = [{item} for item in query_ids]
        vectors = [stored[item] for item in query_ids]
        for mix in mixes:
            vector = mix.vector(stored)
            if vector is not None:
                query_ids.append(mix.name)
                excluded.append(set(mix.positive + mix.negative))
                vectors.append(vector)
        if not vectors:
            return {}, time.perf_counter() - started
        queries = np.asarray(vectors, dtype=np.float32)
        # k more than those excluded: each query's own items are among its nearest, and are
        # dropped below by id.
        top = TopK(queries, k + max(len(e) for e in excluded))
        await _stream(conn, queries.shape[1], top)
        keys, scores = top.result()
        wanted = sorted({int(key) for key, s in zip(keys.ravel(), scores.ravel(), strict=True) if s > -np.inf})
        found = await (await conn.execute(_IDS_SQL, {"ctids": [_ctid(key) for key in wanted]})).fetchall()
    by_ctid = {str(r[0]): str(r[1]) for r in found}
    neighbours: dict[str, list[str]] = {}
    for row, query_id in enumerate(query_ids):
        listed = [by_ctid[_ctid(int(key))] for key, s in zip(keys[row], scores[row], strict=True) if s > -np.inf]
        neighbours[query_id] = [item for item in listed if item not in excluded[row]][:k]
    return neighbours, time.perf_counter() - started
