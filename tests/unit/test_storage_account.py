"""``AzureWebJobsStorage``: a connection string, or an identity-based connection without a key."""

from __future__ import annotations

import pytest

from recsys.config import SettingsError, StorageAccount, load_settings, storage_account


def test_a_connection_string_keeps_working_and_wins() -> None:
    env = {"AzureWebJobsStorage": "UseDevelopmentStorage=true", "AzureWebJobsStorage__accountName": "acct"}
    assert storage_account(env) == StorageAccount(connection_string="UseDevelopmentStorage=true")
    assert storage_account({}) == StorageAccount(connection_string="UseDevelopmentStorage=true")


def test_an_account_name_means_the_public_endpoints_and_a_managed_identity() -> None:
    env = {
        "AzureWebJobsStorage__accountName": "recsysdata",
        "AzureWebJobsStorage__credential": "managedidentity",
        "AzureWebJobsStorage__clientId": "client-1",
    }
    account = storage_account(env)
    assert account.keyless and account.connection_string is None
    assert account.queue_service_uri == "https://recsysdata.queue.core.windows.net"
    assert account.blob_service_uri == "https://recsysdata.blob.core.windows.net"
    assert (account.credential, account.client_id) == ("managedidentity", "client-1")
    settings = load_settings(env)
    assert settings.storage == account and settings.storage_connection == ""


def test_service_uris_replace_the_account_name() -> None:
    env = {"Other__queueServiceUri": "https://127.0.0.1:1/dev", "Other__blobServiceUri": "https://127.0.0.1:2/dev"}
    account = storage_account(env, "Other", default=None)
    assert (account.queue_service_uri, account.blob_service_uri, account.credential) == (
        "https://127.0.0.1:1/dev", "https://127.0.0.1:2/dev", None)


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"AzureWebJobsStorage__accountName": "Not_Valid"}, "AzureWebJobsStorage__accountName"),
        ({"AzureWebJobsStorage__queueServiceUri": "https://q"}, "AzureWebJobsStorage__blobServiceUri"),
        ({"AzureWebJobsStorage__queueServiceUri": "http://q", "AzureWebJobsStorage__blobServiceUri": "https://b"},
         "AzureWebJobsStorage__queueServiceUri"),
        ({"AzureWebJobsStorage__accountName": "acct", "AzureWebJobsStorage__credential": "secret"},
         "AzureWebJobsStorage__credential"),
    ],
)
def test_bad_identity_settings_name_the_variable(env: dict[str, str], name: str) -> None:
    with pytest.raises(SettingsError) as error:
        load_settings(env)
    assert error.value.name == name


def test_a_connection_the_host_needs_must_be_set() -> None:
    with pytest.raises(SettingsError) as error:
        storage_account({}, "HostStorage", default=None)
    assert error.value.name == "HostStorage"
