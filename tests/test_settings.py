"""Settings: documented, validated with the variable named, normalized, and the secret key."""

from __future__ import annotations

import os
import re
import stat
import threading
from pathlib import Path

import pytest

from blogchat.settings import Settings, SettingsError, load_settings
from tests.support.server import REPO

ENV_NAMES = {field: Settings.env_name(field) for field in Settings.model_fields}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No setting leaks in from the test machine, and no stray `.env` is read."""
    for name in ENV_NAMES.values():
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def documentation() -> str:
    files = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    return "\n".join(path.read_text(encoding="utf-8") for path in files if path.is_file())


# --- documentation -------------------------------------------------------------------------------


@pytest.mark.parametrize("field", sorted(ENV_NAMES))
def test_every_setting_is_documented(field: str) -> None:
    name = ENV_NAMES[field]
    assert re.search(rf"\b{re.escape(name)}\b", documentation()), (
        f"{name} (Settings.{field}) is not mentioned in README.md or docs/; "
        "document it in docs/configuration.md"
    )


def test_the_configuration_reference_names_no_setting_that_does_not_exist() -> None:
    text = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    mentioned = set(re.findall(r"\bBLOGCHAT_[A-Z0-9_]+\b", text))
    assert mentioned, "docs/configuration.md names no BLOGCHAT_ variable"
    assert mentioned <= set(ENV_NAMES.values())


def test_every_setting_has_its_own_variable_and_a_description() -> None:
    assert len(set(ENV_NAMES.values())) == len(ENV_NAMES)
    for field, info in Settings.model_fields.items():
        assert info.description, f"Settings.{field} has no description"


# --- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BLOGCHAT_MAX_FRAME_BYTES", "abc"),
        ("BLOGCHAT_MAX_FRAME_BYTES", "100"),
        ("BLOGCHAT_ALLOWED_ORIGINS", "ftp://x"),
        ("BLOGCHAT_ALLOWED_ORIGINS", "https://ok.example, javascript:alert(1)"),
        ("BLOGCHAT_LOG_LEVEL", "LOUD"),
        ("DATABASE_URL", "mysql://root@localhost/blog"),
        ("BLOGCHAT_DATABASE_SCHEMA", "Robert'); DROP TABLE users;--"),
        ("BLOGCHAT_WS_PING_INTERVAL", "0"),
        ("BLOGCHAT_SESSION_IDLE_SECONDS", "-5"),
        ("BLOGCHAT_MAX_TURNS", "0"),
        ("BLOGCHAT_MAX_LIVE_CLIENTS", "many"),
        ("BLOGCHAT_THINKING_BUDGET", "-1"),
        ("BLOGCHAT_OFFLINE_TOKENS_PER_SECOND", "fast"),
        ("BLOGCHAT_SEND_QUEUE_LIMIT", "1.5"),
        ("BLOGCHAT_SECRET_KEY", "k"),
        ("BLOGCHAT_SECRET_KEY", "x" * 31),
        ("BLOGCHAT_LOGIN_FAILURE_LIMIT", "0"),
        ("BLOGCHAT_LOGIN_FAILURE_WINDOW", "0"),
        ("BLOGCHAT_REGISTRATION_LIMIT", "none"),
        ("BLOGCHAT_MAX_BODY_BYTES", "100"),
        ("BLOGCHAT_BODY_TIMEOUT", "0"),
        ("BLOGCHAT_HEADER_TIMEOUT", "-1"),
        ("FORWARDED_ALLOW_IPS", "proxy.internal"),
        ("FORWARDED_ALLOW_IPS", "10.0.0.1, 10.0.0.0/33"),
        ("BLOGCHAT_API_DOCS", "maybe"),
    ],
)
def test_a_bad_value_is_a_settings_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as failure:
        load_settings(_env_file=None)
    message = str(failure.value)
    assert name in message
    # Only the broken variable is blamed.
    named = r"\b(?:BLOGCHAT_[A-Z0-9_]+|DATABASE_URL|FORWARDED_ALLOW_IPS)\b"
    assert set(re.findall(named, message)) == {name}


def test_every_bad_variable_is_named_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLOGCHAT_MAX_FRAME_BYTES", "abc")
    monkeypatch.setenv("BLOGCHAT_ALLOWED_ORIGINS", "ftp://x")
    with pytest.raises(SettingsError) as failure:
        load_settings(_env_file=None)
    assert "BLOGCHAT_MAX_FRAME_BYTES" in str(failure.value)
    assert "BLOGCHAT_ALLOWED_ORIGINS" in str(failure.value)


def test_values_are_parsed_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLOGCHAT_ALLOWED_ORIGINS", " https://a.example/ ,, http://b.example:8080")
    monkeypatch.setenv("BLOGCHAT_MAX_FRAME_BYTES", "131072")
    monkeypatch.setenv("BLOGCHAT_LOG_LEVEL", "debug")
    monkeypatch.setenv("BLOGCHAT_DATA_DIR", "/srv/blog/data")
    monkeypatch.setenv("BLOGCHAT_DATABASE_SCHEMA", "blog_one")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    settings = load_settings(_env_file=None)
    assert settings.allowed_origins == ["https://a.example", "http://b.example:8080"]
    assert settings.max_frame_bytes == 131072
    assert settings.log_level == "DEBUG"
    assert settings.data_dir == Path("/srv/blog/data")
    assert settings.database_schema == "blog_one"
    assert settings.claude_enabled
    assert "sk-ant-test" not in repr(settings), "secrets must not show in logs"


def test_the_defaults_need_no_configuration() -> None:
    settings = load_settings(_env_file=None)
    assert settings.max_frame_bytes == 65536
    assert settings.allowed_origins == []
    assert settings.database_schema is None
    assert not settings.claude_enabled
    assert settings.database == f"sqlite+aiosqlite:///{Path('data') / 'blogchat.db'}"


def test_an_empty_api_key_means_the_offline_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "")
    assert not load_settings(_env_file=None).claude_enabled


def test_the_engine_is_the_agent_sdk_unless_the_messages_engine_is_chosen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert load_settings(_env_file=None).engine == "agent-sdk"
    monkeypatch.setenv("BLOGCHAT_ENGINE", "messages")
    assert load_settings(_env_file=None).engine == "messages"


def test_an_unknown_engine_is_refused_by_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLOGCHAT_ENGINE", "chainlit")
    with pytest.raises(SettingsError, match="BLOGCHAT_ENGINE"):
        load_settings(_env_file=None)


# --- the .env file ----------------------------------------------------------------------------


def test_a_dotenv_file_in_the_working_directory_is_read(
    clean_environment: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (clean_environment / ".env").write_text(
        "# local overrides\n"
        "BLOGCHAT_SITE_TITLE='Crumbs & Code'\n"
        "BLOGCHAT_MAX_TURNS=3\n"
        "SOMETHING_UNRELATED=1\n"
    )
    settings = load_settings()
    assert (settings.site_title, settings.max_turns) == ("Crumbs & Code", 3)
    monkeypatch.setenv("BLOGCHAT_MAX_TURNS", "5")
    assert load_settings().max_turns == 5, "the environment wins over .env"


def test_a_bad_value_in_the_dotenv_file_names_the_variable(clean_environment: Path) -> None:
    (clean_environment / ".env").write_text("BLOGCHAT_MAX_FRAME_BYTES=lots\n")
    with pytest.raises(SettingsError, match="BLOGCHAT_MAX_FRAME_BYTES"):
        load_settings()


# --- the database URL ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "normalized"),
    [
        (
            "postgres://blog:pw@db.internal:5432/blog",
            "postgresql+asyncpg://blog:pw@db.internal:5432/blog",
        ),
        ("postgresql://blog@db.internal/blog", "postgresql+asyncpg://blog@db.internal/blog"),
        (
            "postgresql+asyncpg://blog@db.internal/blog",
            "postgresql+asyncpg://blog@db.internal/blog",
        ),
        ("sqlite:///data/blog.db", "sqlite+aiosqlite:///data/blog.db"),
        ("sqlite:////var/lib/blogchat/blog.db", "sqlite+aiosqlite:////var/lib/blogchat/blog.db"),
        ("sqlite+aiosqlite:///blog.db", "sqlite+aiosqlite:///blog.db"),
    ],
)
def test_database_url_forms_are_normalized_to_async_drivers(
    monkeypatch: pytest.MonkeyPatch, given: str, normalized: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", given)
    assert load_settings(_env_file=None).database == normalized


def test_without_database_url_the_database_is_a_sqlite_file_in_the_data_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("BLOGCHAT_DATA_DIR", str(tmp_path / "state"))
    settings = load_settings(_env_file=None)
    assert settings.database == f"sqlite+aiosqlite:///{tmp_path / 'state' / 'blogchat.db'}"


# --- the secret key ----------------------------------------------------------------------------


def test_a_generated_secret_key_is_created_once_private_and_reused(tmp_path: Path) -> None:
    data_dir = tmp_path / "fresh" / "data"
    first = load_settings(_env_file=None, data_dir=data_dir)
    key = first.signing_key()
    path = data_dir / "secret_key"
    assert path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(key) >= 32
    assert first.signing_key() == key
    # A restart (a new Settings) signs with the same key, so cookies stay valid.
    assert load_settings(_env_file=None, data_dir=data_dir).signing_key() == key
    # Another data dir is another installation.
    assert load_settings(_env_file=None, data_dir=tmp_path / "other").signing_key() != key


def test_a_configured_secret_key_is_used_and_nothing_is_written(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("BLOGCHAT_SECRET_KEY", "a-configured-secret-key-of-decent-length")
    settings = load_settings(_env_file=None, data_dir=tmp_path / "data")
    assert settings.signing_key() == "a-configured-secret-key-of-decent-length"
    assert not (tmp_path / "data").exists()
    assert "a-configured-secret-key" not in repr(settings)


def test_a_short_secret_key_is_refused_with_how_to_make_a_good_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BLOGCHAT_SECRET_KEY", "k")
    with pytest.raises(SettingsError) as failure:
        load_settings(_env_file=None)
    message = str(failure.value)
    assert "BLOGCHAT_SECRET_KEY" in message
    assert "at least 32 characters" in message
    assert "secrets.token_urlsafe" in message
    assert "'k'" not in message, "the rejected key is not repeated in the message"


def test_a_secret_key_of_32_characters_is_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLOGCHAT_SECRET_KEY", "k" * 32)
    assert load_settings(_env_file=None).signing_key() == "k" * 32


def test_an_empty_secret_key_means_a_generated_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("BLOGCHAT_SECRET_KEY", "")
    settings = load_settings(_env_file=None, data_dir=tmp_path / "data")
    assert settings.signing_key() == (tmp_path / "data" / "secret_key").read_text().strip()


def test_the_limits_have_the_documented_defaults() -> None:
    settings = load_settings(_env_file=None)
    assert (settings.login_failure_limit, settings.login_failure_window) == (10, 900)
    assert (settings.registration_limit, settings.registration_window) == (10, 3600)
    assert settings.max_body_bytes == 1024 * 1024
    assert settings.body_timeout == settings.header_timeout == 10
    assert settings.forwarded_allow_ips == ["127.0.0.1", "::1"]
    assert settings.api_docs is False


def test_trusted_proxies_are_addresses_or_networks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", " 10.0.0.1 ,192.168.0.0/16,, fd00::/8")
    assert load_settings(_env_file=None).forwarded_allow_ips == [
        "10.0.0.1",
        "192.168.0.0/16",
        "fd00::/8",
    ]
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "*")
    assert load_settings(_env_file=None).forwarded_allow_ips == ["*"]


def test_servers_starting_together_agree_on_one_generated_secret_key(tmp_path: Path) -> None:
    # Several workers sharing a data dir may all find no key at start-up.
    data_dir = tmp_path / "data"
    workers = 16
    barrier = threading.Barrier(workers)
    keys: list[str] = []

    def start() -> None:
        settings = load_settings(_env_file=None, data_dir=data_dir)
        barrier.wait()
        keys.append(settings.signing_key())

    threads = [threading.Thread(target=start) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(keys) == workers
    assert set(keys) == {(data_dir / "secret_key").read_text().strip()}
    assert stat.S_IMODE((data_dir / "secret_key").stat().st_mode) == 0o600
    assert [path.name for path in data_dir.iterdir()] == ["secret_key"]


# --- several instances ----------------------------------------------------------------------


def test_without_redis_there_is_one_instance_and_the_counters_stay_in_memory() -> None:
    settings = load_settings(_env_file=None)
    assert settings.redis_url is None
    assert not settings.clustered
    assert settings.rate_limit_storage == "memory://"
    assert settings.redis_prefix == "blogchat"
    assert settings.chat_lease_seconds == 5
    assert settings.instance_id.endswith(f"-{os.getpid()}")


def test_redis_turns_on_cluster_mode_and_the_counters_move_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://blog@db.internal/blog")
    monkeypatch.setenv("BLOGCHAT_REDIS_URL", "redis://cache.internal:6379/2")
    monkeypatch.setenv("BLOGCHAT_REDIS_PREFIX", "blog-one")
    monkeypatch.setenv("BLOGCHAT_CHAT_LEASE_SECONDS", "3")
    monkeypatch.setenv("BLOGCHAT_INSTANCE_ID", "web-2")
    settings = load_settings(_env_file=None)
    assert settings.clustered
    assert settings.rate_limit_storage == "redis://cache.internal:6379/2"
    assert settings.redis_prefix == "blog-one"
    assert settings.chat_lease_seconds == 3
    assert settings.instance_id == "web-2"


@pytest.mark.parametrize("database_url", ["", "sqlite:///data/blog.db"])
def test_cluster_mode_refuses_sqlite_naming_both_settings(
    monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("BLOGCHAT_REDIS_URL", "redis://127.0.0.1:6379/0")
    with pytest.raises(SettingsError) as failure:
        load_settings(_env_file=None)
    message = str(failure.value)
    assert "BLOGCHAT_REDIS_URL" in message
    assert "requires PostgreSQL" in message
    assert "DATABASE_URL" in message


def test_blogchat_check_refuses_cluster_mode_on_sqlite(monkeypatch: pytest.MonkeyPatch) -> None:
    from blogchat.cli import main

    monkeypatch.setenv("BLOGCHAT_REDIS_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("BLOGCHAT_CONTENT_DIR", str(REPO / "content"))
    monkeypatch.setenv("BLOGCHAT_PERSONAS_FILE", str(REPO / "config" / "personas.yaml"))
    assert main(["check"]) == 2


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BLOGCHAT_REDIS_URL", "http://cache.internal"),
        ("BLOGCHAT_REDIS_PREFIX", "has space"),
        ("BLOGCHAT_REDIS_PREFIX", ""),
        ("BLOGCHAT_CHAT_LEASE_SECONDS", "0.5"),
        ("BLOGCHAT_INSTANCE_ID", "web/1"),
    ],
)
def test_bad_cluster_settings_are_named(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://blog@db.internal/blog")
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as failure:
        load_settings(_env_file=None)
    assert name in str(failure.value)
