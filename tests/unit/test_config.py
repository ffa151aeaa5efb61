from __future__ import annotations

import pytest

from recsys.config import LOCAL_DATABASE_URL, SettingsError, load_settings


def test_defaults_point_at_the_local_stack() -> None:
    settings = load_settings({})
    assert settings.database_url == LOCAL_DATABASE_URL
    assert settings.db_auth == "password"
    assert settings.embedding_dim == 384
    assert settings.queue_name == "embedding-batches"
    assert settings.poison_queue_name == "embedding-batches-poison"
    assert settings.storage_connection == "UseDevelopmentStorage=true"
    assert settings.pool_min_size <= settings.pool_max_size


def test_values_are_parsed() -> None:
    settings = load_settings({
        "RECSYS_EMBEDDING_DIM": "768",
        "RECSYS_POOL_MAX_SIZE": "10",
        "RECSYS_POOL_TIMEOUT": "2.5",
        "RECSYS_DB_AUTH": "entra",
        "RECSYS_ENTRA_CLIENT_ID": "abc",
        "RECSYS_QUEUE_NAME": "my-queue",
    })
    assert (settings.embedding_dim, settings.pool_max_size, settings.pool_timeout) == (768, 10, 2.5)
    assert settings.db_auth == "entra" and settings.entra_client_id == "abc"
    assert settings.poison_queue_name == "my-queue-poison"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RECSYS_EMBEDDING_DIM", "abc"),
        ("RECSYS_EMBEDDING_DIM", "0"),
        ("RECSYS_EMBEDDING_DIM", "16001"),
        ("RECSYS_POOL_MAX_SIZE", "-1"),
        ("RECSYS_POOL_TIMEOUT", "soon"),
        ("RECSYS_STATEMENT_TIMEOUT_MS", "0"),
        ("RECSYS_LOADER_STATEMENT_TIMEOUT_MS", "500"),
        ("RECSYS_DB_AUTH", "kerberos"),
        ("RECSYS_SSLMODE", "verify-everything"),
        ("RECSYS_QUEUE_NAME", "Bad_Queue"),
        ("RECSYS_DATABASE_URL", "mysql://x"),
    ],
)
def test_bad_value_names_the_setting(name: str, value: str) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings({name: value})
    assert raised.value.name == name
    assert name in str(raised.value)


def test_min_pool_size_above_max_is_refused() -> None:
    with pytest.raises(SettingsError, match="RECSYS_POOL_MIN_SIZE"):
        load_settings({"RECSYS_POOL_MIN_SIZE": "5", "RECSYS_POOL_MAX_SIZE": "2"})


def test_blank_values_take_the_default() -> None:
    assert load_settings({"RECSYS_EMBEDDING_DIM": " ", "RECSYS_SSLMODE": ""}).embedding_dim == 384
