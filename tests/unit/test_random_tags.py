"""The random tags of ``bench embeddings``: nested sets of about their share, the same at each run."""

from __future__ import annotations

import itertools

import numpy as np

from recsys.bench.embeddings import RANDOM_TAGS, random_tags


def test_each_tag_holds_about_its_share_and_the_smaller_tags() -> None:
    tags = random_tags(31_102)
    assert list(tags) == [f"random-{s:g}" for s in RANDOM_TAGS]
    for share, members in zip(RANDOM_TAGS, tags.values(), strict=True):
        # Binomial: within four standard deviations of its mean.
        assert abs(members.sum() - share * 31_102) < 4 * np.sqrt(31_102 * share * (1 - share))
    ordered = sorted(tags.values(), key=lambda members: int(members.sum()))
    for smaller, larger in itertools.pairwise(ordered):
        assert not (smaller & ~larger).any()


def test_the_same_draw_each_run_and_another_with_another_seed() -> None:
    first, again, other = random_tags(5_000), random_tags(5_000), random_tags(5_000, seed=14)
    assert all((first[tag] == again[tag]).all() for tag in first)
    assert any((first[tag] != other[tag]).any() for tag in first)
