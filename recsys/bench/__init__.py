"""Benchmarks: side-by-side comparisons against real, ephemeral local stacks.

``python -m recsys bench [NAME...]`` runs them; each writes ``bench/results/NAME.json`` (inputs,
machine, figures), a PNG where a curve says more than a table, and regenerates the table of
``bench/README.md``. Timings on a small shared machine are noisy, so every headline figure is a
ratio of two variants measured in the same run.
"""
