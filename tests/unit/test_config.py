from __future__ import annotations

import pytest

from recsys.config import LOCAL_DATABASE_URL, SettingsError, load_settings, redact


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
        ("RECSYS_EMBEDDING_DIM", "4001"),
        ("RECSYS_VECTOR_TYPE", "float"),
        ("RECSYS_HNSW_M", "1"),
        ("RECSYS_HNSW_M", "101"),
        ("RECSYS_HNSW_EF_CONSTRUCTION", "1001"),
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


def test_query_and_loader_use_their_own_roles_locally() -> None:
    settings = load_settings({})
    assert settings.url_for("query").startswith("postgresql://recsys_query:")
    assert settings.url_for("loader").startswith("postgresql://recsys_loader:")


def test_the_loader_url_defaults_to_the_query_url_when_that_is_set() -> None:
    url = "postgresql://app@server.postgres.database.azure.com:6432/recsys"
    settings = load_settings({"RECSYS_DATABASE_URL": url, "RECSYS_ENTRA_CLIENT_ID": "q"})
    assert settings.url_for("loader") == url
    assert settings.entra_client_id_for("loader") == "q"
    own = load_settings({
        "RECSYS_DATABASE_URL": url,
        "RECSYS_LOADER_DATABASE_URL": "postgresql://loader@server/recsys",
        "RECSYS_ENTRA_CLIENT_ID": "q",
        "RECSYS_LOADER_ENTRA_CLIENT_ID": "l",
    })
    assert own.url_for("loader") == "postgresql://loader@server/recsys"
    assert (own.entra_client_id_for("query"), own.entra_client_id_for("loader")) == ("q", "l")


def test_a_bad_loader_url_names_its_setting() -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings({"RECSYS_LOADER_DATABASE_URL": "mysql://x"})
    assert raised.value.name == "RECSYS_LOADER_DATABASE_URL"


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("postgresql://app:s3cr%40t@db:6432/recsys?sslmode=verify-full", "s3cr%40t"),
        ("postgresql://app@db/recsys?password=s3cret&sslmode=require", "s3cret"),
        ("host=db user=app password=s3cret dbname=recsys", "s3cret"),
        ("host=db user=app password='s3 cret' dbname=recsys", "s3 cret"),
        ("DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=S3cr3t/Key==;EndpointSuffix=x", "S3cr3t/Key=="),
        ("BlobEndpoint=https://acct.blob/;SharedAccessSignature=sv=2022&sig=S1gnature", "S1gnature"),
    ],
)
def test_redact_hides_passwords_and_keys(text: str, secret: str) -> None:
    redacted = redact(text)
    assert secret not in redacted
    assert "***" in redacted


def test_the_settings_repr_shows_no_secret() -> None:
    settings = load_settings({
        "RECSYS_DATABASE_URL": "postgresql://app:query-pass@db:6432/recsys",
        "RECSYS_LOADER_DATABASE_URL": "postgresql://loader:loader-pass@db:6432/recsys",
        "AzureWebJobsStorage": "AccountName=acct;AccountKey=storage-key==",
        "RECSYS_FUNCTION_KEY": "function-key",
    })
    shown = repr(settings) + str(settings)
    for secret in ("query-pass", "loader-pass", "storage-key==", "function-key"):
        assert secret not in shown
    assert "postgresql://app:***@db:6432/recsys" in shown


def test_vector_type_defaults_by_dimension_and_is_validated_against_the_index() -> None:
    assert load_settings({}).vector_type == "vector"
    assert load_settings({"RECSYS_EMBEDDING_DIM": "2000"}).vector_type == "vector"
    assert load_settings({"RECSYS_EMBEDDING_DIM": "2001"}).vector_type == "halfvec"
    assert load_settings({"RECSYS_EMBEDDING_DIM": "384", "RECSYS_VECTOR_TYPE": "halfvec"}).vector_type == "halfvec"
    assert load_settings({"RECSYS_EMBEDDING_DIM": "4000", "RECSYS_VECTOR_TYPE": "halfvec"}).embedding_dim == 4000
    with pytest.raises(SettingsError, match="up to 2000 dimensions") as caught:
        load_settings({"RECSYS_EMBEDDING_DIM": "3072", "RECSYS_VECTOR_TYPE": "vector"})
    assert caught.value.name == "RECSYS_VECTOR_TYPE"


def test_hnsw_parameters_are_parsed_and_ef_construction_covers_twice_m() -> None:
    settings = load_settings({"RECSYS_HNSW_M": "24", "RECSYS_HNSW_EF_CONSTRUCTION": "128"})
    assert (settings.hnsw_m, settings.hnsw_ef_construction) == (24, 128)
    assert (load_settings({}).hnsw_m, load_settings({}).hnsw_ef_construction) == (16, 128)
    with pytest.raises(SettingsError, match="at least 2") as caught:
        load_settings({"RECSYS_HNSW_M": "80"})
    assert caught.value.name == "RECSYS_HNSW_EF_CONSTRUCTION"
