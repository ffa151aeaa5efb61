"""``python -m recsys stack``: the stack it describes follows the schema settings."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from recsys.config import SettingsError
from recsys.local.cli import _stack_from


def test_stack_up_takes_dimension_type_and_hnsw_parameters_from_the_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {"RECSYS_EMBEDDING_DIM": "64", "RECSYS_VECTOR_TYPE": "halfvec", "RECSYS_HNSW_M": "24",
                        "RECSYS_HNSW_EF_CONSTRUCTION": "128"}.items():
        monkeypatch.setenv(name, value)
    stack = _stack_from(argparse.Namespace(action="up", root=str(tmp_path), replicas=1))
    config = stack.config
    assert (config.embedding_dim, config.vector_type, config.hnsw_m, config.hnsw_ef_construction) == (
        64, "halfvec", 24, 128)
    assert config.replicas == 1
    assert stack.app_environment()["RECSYS_EMBEDDING_DIM"] == "64"


def test_stack_up_refuses_a_bad_setting_and_down_does_not_read_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSYS_EMBEDDING_DIM", "zero")
    with pytest.raises(SettingsError, match="RECSYS_EMBEDDING_DIM"):
        _stack_from(argparse.Namespace(action="up", root=str(tmp_path), replicas=0))
    assert _stack_from(argparse.Namespace(action="down", root=str(tmp_path), replicas=0)).root == tmp_path.resolve()
