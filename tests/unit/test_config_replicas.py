"""Settings of a query path spread over read replicas with libpq's multi-host URLs."""

from __future__ import annotations

import pytest

from recsys.config import SettingsError, load_settings, redact

REPLICAS = (
    "postgresql://recsys-query:pw@replica-1:6432,replica-2:6432,primary:6432/recsys"
    "?target_session_attrs=prefer-standby&load_balance_hosts=random"
)
PRIMARY = "postgresql://recsys-loader:pw@primary:6432/recsys"


def test_a_query_path_over_replicas_with_the_loader_on_the_primary() -> None:
    settings = load_settings({"RECSYS_DATABASE_URL": REPLICAS, "RECSYS_LOADER_DATABASE_URL": PRIMARY})
    assert settings.url_for("query") == REPLICAS
    assert settings.url_for("loader") == PRIMARY


def test_the_loader_may_list_hosts_when_it_asks_for_the_primary() -> None:
    loader = "postgresql://l:pw@a:6432,b:6432/recsys?target_session_attrs=primary"
    assert load_settings({"RECSYS_LOADER_DATABASE_URL": loader}).url_for("loader") == loader
    key_value = "host=a,b port=6432,6433 dbname=recsys target_session_attrs=read-write"
    assert load_settings({"RECSYS_LOADER_DATABASE_URL": key_value}).url_for("loader") == key_value


@pytest.mark.parametrize(
    "query_url",
    [
        REPLICAS,
        "postgresql://q@replica:6432/recsys?target_session_attrs=standby",
        "postgresql://q@a:6432,b:6432/recsys",
    ],
)
def test_the_loader_url_must_be_set_when_the_query_url_may_reach_a_standby(query_url: str) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings({"RECSYS_DATABASE_URL": query_url})
    assert raised.value.name == "RECSYS_LOADER_DATABASE_URL"
    assert "primary" in str(raised.value)


@pytest.mark.parametrize(
    ("loader_url", "message"),
    [
        ("postgresql://l@replica:6432/recsys?target_session_attrs=prefer-standby", "must reach the primary"),
        ("postgresql://l@replica:6432/recsys?target_session_attrs=read-only", "must reach the primary"),
        ("postgresql://l@a:6432,b:6432/recsys", "target_session_attrs=primary"),
        ("postgresql://l@a:6432,b:6432/recsys?target_session_attrs=any", "target_session_attrs=primary"),
    ],
)
def test_the_loader_never_writes_to_a_standby(loader_url: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message) as raised:
        load_settings({"RECSYS_DATABASE_URL": REPLICAS, "RECSYS_LOADER_DATABASE_URL": loader_url})
    assert raised.value.name == "RECSYS_LOADER_DATABASE_URL"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://q@a,b,c:6432/recsys?port=1,2", "3 hosts but 2 ports"),
        ("host=a,b port=6432,6433,6434 dbname=recsys", "2 hosts but 3 ports"),
        ("postgresql://q@a:6432/recsys?target_session_attrs=replica", "target_session_attrs must be one of"),
        ("postgresql://q@a:6432/recsys?load_balance_hosts=round-robin", "load_balance_hosts must be one of"),
        ("postgresql://q@a:6432/recsys?nonsense=1", "not a valid libpq connection string"),
        ("host=a port=web dbname=recsys", "port that is not a number"),
    ],
)
def test_a_bad_multi_host_url_names_the_setting(url: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message) as raised:
        load_settings({"RECSYS_DATABASE_URL": url, "RECSYS_LOADER_DATABASE_URL": PRIMARY})
    assert raised.value.name == "RECSYS_DATABASE_URL"


def test_the_password_of_a_multi_host_url_is_redacted() -> None:
    settings = load_settings({"RECSYS_DATABASE_URL": REPLICAS, "RECSYS_LOADER_DATABASE_URL": PRIMARY})
    assert ":pw@" not in repr(settings)
    assert redact(REPLICAS).startswith("postgresql://recsys-query:***@replica-1:6432,replica-2:6432,")


def test_housekeeping_follows_the_loader_to_the_primary_and_never_to_a_standby() -> None:
    settings = load_settings({"RECSYS_DATABASE_URL": REPLICAS, "RECSYS_LOADER_DATABASE_URL": PRIMARY})
    assert settings.url_for("maintenance") == PRIMARY
    with pytest.raises(SettingsError, match="must reach the primary") as raised:
        load_settings({
            "RECSYS_DATABASE_URL": REPLICAS,
            "RECSYS_LOADER_DATABASE_URL": PRIMARY,
            "RECSYS_MAINTENANCE_DATABASE_URL": "postgresql://m@replica:6432/recsys?target_session_attrs=standby",
        })
    assert raised.value.name == "RECSYS_MAINTENANCE_DATABASE_URL"
