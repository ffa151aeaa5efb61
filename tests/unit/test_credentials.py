"""The Entra token cache: refreshed ahead of expiry, shared by concurrent callers, failures named."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import pytest
from azure.core.credentials import AccessToken
from azure.core.exceptions import ClientAuthenticationError
from azure.identity import DefaultAzureCredential, ManagedIdentityCredential

from recsys.config import load_settings
from recsys.db.credentials import (
    ENTRA_SCOPE,
    EntraPasswordProvider,
    TokenUnavailable,
    build_credential,
    entra_password_provider,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Credential:
    """Issues ``tok-1``, ``tok-2``... each valid ``lifetime`` seconds from the clock's now."""

    clock: Clock
    lifetime: float = 3600.0
    fail: Exception | None = None
    scopes: list[tuple[str, ...]] = field(default_factory=list)
    gate: threading.Event | None = None

    def get_token(self, *scopes: str, **kwargs: object) -> AccessToken:
        self.scopes.append(scopes)
        if self.gate is not None:
            self.gate.wait(5)
        if self.fail is not None:
            raise self.fail
        return AccessToken(f"tok-{len(self.scopes)}", int(self.clock.now + self.lifetime))


def test_a_token_is_reused_until_its_refresh_margin() -> None:
    clock = Clock()
    credential = Credential(clock)
    provider = EntraPasswordProvider(credential, clock=clock)
    assert provider() == "tok-1"
    clock.now += 3600 - 301  # five minutes (and a second) before expiry: still the same token
    assert provider() == "tok-1"
    clock.now += 2
    assert provider() == "tok-2"
    assert credential.scopes == [(ENTRA_SCOPE,), (ENTRA_SCOPE,)]


def test_short_lived_tokens_are_refreshed_at_half_life() -> None:
    clock = Clock()
    credential = Credential(clock, lifetime=10)
    provider = EntraPasswordProvider(credential, clock=clock)
    assert provider() == "tok-1"
    clock.now += 4.9
    assert provider() == "tok-1"
    clock.now += 0.2
    assert provider() == "tok-2"


def test_connections_are_recycled_before_their_token_expires() -> None:
    clock = Clock()
    provider = EntraPasswordProvider(Credential(clock, lifetime=3600), clock=clock)
    token = provider()
    assert provider.deadline_for(token) == clock.now + 3600 - 60
    short = EntraPasswordProvider(Credential(clock, lifetime=8), clock=clock)
    assert short.deadline_for(short()) == clock.now + 8 - 2
    assert provider.deadline_for("not-a-token-we-issued") is None
    assert provider.deadline_for(None) is None


def test_a_failed_request_without_a_valid_token_is_unavailable_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    credential = Credential(clock, fail=ClientAuthenticationError("identity not found"))
    provider = EntraPasswordProvider(credential, clock=clock)
    with caplog.at_level(logging.WARNING, logger="recsys"), pytest.raises(TokenUnavailable):
        provider()
    assert "entra token request failed: ClientAuthenticationError: identity not found" in caplog.text


def test_a_failed_refresh_keeps_serving_the_still_valid_token(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    credential = Credential(clock, lifetime=100)
    provider = EntraPasswordProvider(credential, clock=clock)
    assert provider() == "tok-1"
    credential.fail = ClientAuthenticationError("endpoint down")
    clock.now += 60  # past the refresh point, before expiry
    with caplog.at_level(logging.WARNING, logger="recsys"):
        assert provider() == "tok-1"
    assert "refresh failed" in caplog.text and "endpoint down" in caplog.text
    clock.now += 41  # expired now
    with pytest.raises(TokenUnavailable):
        provider()


def test_a_token_expired_on_arrival_is_refused() -> None:
    clock = Clock()
    provider = EntraPasswordProvider(Credential(clock, lifetime=-5), clock=clock)
    with pytest.raises(TokenUnavailable, match="expired"):
        provider()


def test_token_unavailable_is_an_operational_error() -> None:
    import psycopg

    assert issubclass(TokenUnavailable, psycopg.OperationalError)


def test_concurrent_callers_share_one_request() -> None:
    clock = Clock()
    gate = threading.Event()
    credential = Credential(clock, gate=gate)
    provider = EntraPasswordProvider(credential, clock=clock)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(provider())) for _ in range(8)]
    for thread in threads:
        thread.start()
    gate.set()
    for thread in threads:
        thread.join()
    assert results == ["tok-1"] * 8
    assert len(credential.scopes) == 1


def test_callers_keep_the_valid_token_while_one_refreshes() -> None:
    clock = Clock()
    credential = Credential(clock, lifetime=100)
    provider = EntraPasswordProvider(credential, clock=clock)
    assert provider() == "tok-1"
    clock.now += 60
    credential.gate = threading.Event()
    refresher = threading.Thread(target=provider)
    refresher.start()
    while len(credential.scopes) < 2:  # the refresher is inside get_token, blocked on the gate
        threading.Event().wait(0.01)
    assert provider() == "tok-1"
    credential.gate.set()
    refresher.join()
    assert provider() == "tok-2"


def test_the_repr_shows_no_token() -> None:
    clock = Clock()
    provider = EntraPasswordProvider(Credential(clock), clock=clock)
    token = provider()
    assert token not in repr(provider)


def test_managed_identity_when_the_endpoint_is_announced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IDENTITY_ENDPOINT", "http://127.0.0.1:9/msi/token")
    monkeypatch.setenv("IDENTITY_HEADER", "secret")
    credential = build_credential("11111111-2222-3333-4444-555555555555", timeout=2)
    assert isinstance(credential, ManagedIdentityCredential)


def test_default_credential_for_local_development(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IDENTITY_ENDPOINT", raising=False)
    assert isinstance(build_credential(None, timeout=2), DefaultAzureCredential)


def test_each_path_uses_its_own_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    chosen: list[str | None] = []

    def fake_build(client_id: str | None, *, timeout: float) -> Credential:
        chosen.append(client_id)
        return Credential(Clock())

    monkeypatch.setattr("recsys.db.credentials.build_credential", fake_build)
    settings = load_settings({"RECSYS_ENTRA_CLIENT_ID": "query-id", "RECSYS_LOADER_ENTRA_CLIENT_ID": "loader-id"})
    entra_password_provider(settings, purpose="query")
    entra_password_provider(settings, purpose="loader")
    shared = load_settings({"RECSYS_ENTRA_CLIENT_ID": "one-id"})
    entra_password_provider(shared, purpose="loader")
    assert chosen == ["query-id", "loader-id", "one-id"]


def test_without_a_valid_token_a_caller_waits_a_bounded_time_for_a_refresh_in_progress() -> None:
    clock = Clock()
    gate = threading.Event()
    credential = Credential(clock, gate=gate)
    provider = EntraPasswordProvider(credential, wait=0.05, clock=clock)
    stuck = threading.Thread(target=provider)
    stuck.start()
    while not credential.scopes:
        threading.Event().wait(0.01)
    with pytest.raises(TokenUnavailable, match="in progress"):
        provider()
    gate.set()
    stuck.join()
    assert provider() == "tok-1"
