"""The `blogchat` command, run as a subprocess with a clean environment."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from blogchat.settings import Settings
from blogchat.store import Database
from blogchat.store.database import alembic_config
from blogchat.store.tables import metadata
from tests.support.server import REPO
from tests.support.server import Database as Backend

SETTING_NAMES = {Settings.env_name(field) for field in Settings.model_fields}
TABLES = {table.name for table in metadata.sorted_tables}
HEAD = ScriptDirectory.from_config(alembic_config()).get_current_head()


def clean_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    """The test process's environment without any blogchat setting, plus these."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in SETTING_NAMES and not name.startswith("BLOGCHAT_")
    }
    env.update(
        BLOGCHAT_DATA_DIR=str(tmp_path / "data"),
        BLOGCHAT_CONTENT_DIR=str(REPO / "content"),
        BLOGCHAT_PERSONAS_FILE=str(REPO / "config" / "personas.yaml"),
        PYTHONUNBUFFERED="1",
    )
    env.update(settings)
    return env


def blogchat(tmp_path: Path, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    """`python -m blogchat ...` in an empty working directory (so no stray `.env` is read)."""
    return subprocess.run(
        [sys.executable, "-m", "blogchat", *args],
        cwd=tmp_path,
        env=clean_env(tmp_path, **settings),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def assert_clean_failure(result: subprocess.CompletedProcess[str], status: int) -> str:
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("blogchat: ")
    return result.stderr


# --- help and check -----------------------------------------------------------------------------


def test_uv_run_blogchat_help_lists_the_commands(tmp_path: Path) -> None:
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not installed")
    result = subprocess.run(
        [uv, "run", "--no-sync", "--project", str(REPO), "blogchat", "--help"],
        cwd=tmp_path,
        env=clean_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: blogchat")
    for command in ("serve", "db", "check"):
        assert command in result.stdout


def test_the_console_script_is_installed(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "blogchat"
    result = subprocess.run(
        [str(script), "db", "--help"],
        cwd=tmp_path,
        env=clean_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "upgrade" in result.stdout


def test_check_accepts_the_repository_content(tmp_path: Path) -> None:
    result = blogchat(tmp_path, "check")
    assert result.returncode == 0, result.stderr
    posts = len(list((REPO / "content" / "posts").glob("*.md")))
    authors = (REPO / "content" / "authors.yaml").read_text().count("\n  name: ")
    personas = (REPO / "config" / "personas.yaml").read_text().count("\n  - id: ")
    assert result.stdout.strip() == f"ok: {posts} posts, {authors} authors, {personas} personas"
    assert not (tmp_path / "data").exists(), "check must not create any data"


def test_a_command_is_required(tmp_path: Path) -> None:
    result = blogchat(tmp_path)
    assert result.returncode == 2
    assert "usage: blogchat" in result.stderr


# --- broken settings ------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["check"], ["serve", "--port", "1"], ["db", "upgrade"]])
@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BLOGCHAT_MAX_FRAME_BYTES", "abc"),
        ("BLOGCHAT_ALLOWED_ORIGINS", "ftp://x"),
        ("DATABASE_URL", "mysql://root@localhost/blog"),
        ("BLOGCHAT_SECRET_KEY", "k"),
        # An alias the agent program would resolve to a model of its own choosing.
        ("BLOGCHAT_MODEL_OPUS", "opus[1m]"),
    ],
)
def test_a_broken_setting_exits_2_naming_the_variable(
    tmp_path: Path, command: list[str], name: str, value: str
) -> None:
    result = blogchat(tmp_path, *command, **{name: value})
    assert name in assert_clean_failure(result, 2)
    assert not (tmp_path / "data").exists()


def test_a_broken_setting_in_dotenv_exits_2_naming_the_variable(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("BLOGCHAT_LOG_LEVEL=chatty\n")
    result = blogchat(tmp_path, "check")
    assert "BLOGCHAT_LOG_LEVEL" in assert_clean_failure(result, 2)


# --- broken content -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("find", "replace", "persona", "field"),
    [
        (
            "  - id: explainer\n",
            "  - id: explainer\n    temperature: 2\n",
            "explainer",
            "temperature",
        ),
        ("    model: haiku\n", "    model: gpt-5\n", "explainer", "model"),
        ("      - getCurrentDateTime\n", "      - Bash\n", "blog-assistant", "allowed_tools"),
        ("  - id: reading-guide\n", "  - id: Reading Guide\n", "Reading Guide", "id"),
        ("  - id: explainer\n", "  - id: blog-assistant\n", "blog-assistant", "id"),
        ("    name: Reading guide\n", '    name: ""\n', "reading-guide", "name"),
    ],
)
def test_a_broken_personas_file_exits_1_naming_the_file_persona_and_field(
    tmp_path: Path, find: str, replace: str, persona: str, field: str
) -> None:
    original = (REPO / "config" / "personas.yaml").read_text()
    assert find in original, "the personas file changed; update this test's edit"
    broken = tmp_path / "broken-personas.yaml"
    broken.write_text(original.replace(find, replace, 1))
    result = blogchat(tmp_path, "check", BLOGCHAT_PERSONAS_FILE=str(broken))
    message = assert_clean_failure(result, 1)
    assert str(broken) in message
    assert f"'{persona}'" in message
    assert f"'{field}'" in message


def test_a_personas_file_that_is_not_yaml_exits_1_naming_the_file(tmp_path: Path) -> None:
    broken = tmp_path / "personas.yaml"
    broken.write_text("personas: [\n  - id: x\n")
    result = blogchat(tmp_path, "check", BLOGCHAT_PERSONAS_FILE=str(broken))
    assert str(broken) in assert_clean_failure(result, 1)


def _content_copy(tmp_path: Path) -> Path:
    content = tmp_path / "content"
    shutil.copytree(REPO / "content", content)
    return content


@pytest.mark.parametrize(
    ("find", "replace", "field"),
    [
        ("\ndate: ", "\ndate: 2026-13-45\n# was: ", "date"),
        ("\ntitle: ", "\n# title: ", "title"),
        ("\nauthor: ", "\nauthor: nobody-we-know\n# was: ", "author"),
    ],
)
def test_a_broken_post_exits_1_naming_the_file_and_the_field(
    tmp_path: Path, find: str, replace: str, field: str
) -> None:
    content = _content_copy(tmp_path)
    post = sorted((content / "posts").glob("*.md"))[0]
    original = post.read_text()
    assert find in original
    post.write_text(original.replace(find, replace, 1))
    result = blogchat(tmp_path, "check", BLOGCHAT_CONTENT_DIR=str(content))
    message = assert_clean_failure(result, 1)
    assert post.name in message
    assert f"'{field}'" in message


def test_serve_refuses_to_start_on_broken_content(tmp_path: Path) -> None:
    content = _content_copy(tmp_path)
    post = sorted((content / "posts").glob("*.md"))[0]
    post.write_text(post.read_text().replace("\ntitle: ", "\nheadline: ", 1))
    result = blogchat(tmp_path, "serve", "--port", "1", BLOGCHAT_CONTENT_DIR=str(content))
    message = assert_clean_failure(result, 1)
    assert post.name in message


# --- db upgrade -----------------------------------------------------------------------------


def test_db_upgrade_creates_the_schema_in_a_fresh_sqlite_file(tmp_path: Path) -> None:
    database = tmp_path / "data" / "blogchat.db"
    assert not database.exists()
    result = blogchat(tmp_path, "db", "upgrade")
    assert result.returncode == 0, result.stderr
    with sqlite3.connect(database) as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
        [(version,)] = connection.execute("SELECT version_num FROM alembic_version").fetchall()
    assert TABLES | {"alembic_version"} <= tables
    assert version == HEAD
    again = blogchat(tmp_path, "db", "upgrade")
    assert again.returncode == 0, again.stderr


def test_db_upgrade_uses_database_url(tmp_path: Path, database: Backend) -> None:
    result = blogchat(tmp_path, "db", "upgrade", **database.env())
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "data" / "blogchat.db").exists()

    async def tables() -> set[str]:
        url = Settings(_env_file=None, database_url=database.url).database
        db = Database(url, schema=database.schema)
        try:
            async with db.engine.connect() as connection:
                names = await connection.run_sync(lambda sync: inspect(sync).get_table_names())
        finally:
            await db.dispose()
        return set(names)

    assert asyncio.run(tables()) == TABLES | {"alembic_version"}


# --- usage ------------------------------------------------------------------------------------


def test_usage_prints_turns_and_tokens_by_visitor_by_address_and_the_costliest_chats(
    tmp_path: Path, database: Backend
) -> None:
    from blogchat.store import ChatRecord, MessageRecord, Store

    async def seed() -> None:
        url = Settings(_env_file=None, database_url=database.url).database
        store = await Store.open(url, schema=database.schema)
        try:
            for owner, address, title, tokens in [
                ("visitor-a", "203.0.113.1", "Sourdough", [1000, 500]),
                ("visitor-a", "203.0.113.1", "Espresso", [200]),
                ("visitor-b", "198.51.100.2", "Cheap", [10]),
            ]:
                chat = await store.chats.create_chat(
                    ChatRecord(
                        id=str(uuid.uuid4()),
                        owner_id=owner,
                        title=title,
                        persona="blog-assistant",
                        model="haiku",
                    )
                )
                for seq, spent in enumerate(tokens, start=1):
                    await store.chats.add_message(
                        MessageRecord(
                            id=str(uuid.uuid4()),
                            chat_id=chat.id,
                            role="assistant",
                            seq_start=seq,
                            seq_end=seq,
                            text="An answer.",
                            input_tokens=spent - 10,
                            output_tokens=10,
                            client_address=address,
                        )
                    )
            # An answer from two days ago: outside the last 24 hours.
            await store.chats.add_message(
                MessageRecord(
                    id=str(uuid.uuid4()),
                    chat_id=chat.id,
                    role="assistant",
                    seq_start=9,
                    seq_end=9,
                    text="Old.",
                    input_tokens=99_990,
                    output_tokens=10,
                    client_address="198.51.100.2",
                    created_at=datetime.now(UTC) - timedelta(days=2),
                )
            )
        finally:
            await store.close()

    asyncio.run(seed())
    result = blogchat(tmp_path, "usage", "--since", "24h", **database.env())
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "  in all: 4 turns, 1,710 tokens" in lines
    by_visitor = lines[lines.index("By visitor:") + 1 : lines.index("By visitor:") + 3]
    assert [line.split() for line in by_visitor] == [
        ["1,700", "tokens", "3", "turns", "visitor-a"],
        ["10", "tokens", "1", "turns", "visitor-b"],
    ]
    by_address = lines[lines.index("By client address:") + 1]
    assert by_address.split() == ["1,700", "tokens", "3", "turns", "203.0.113.1"]
    costliest = lines[lines.index("The most expensive chats:") + 1]
    assert costliest.split()[:4] == ["1,500", "tokens", "2", "turns"]
    assert costliest.endswith("'Sourdough'")
    # Older usage counts once the span reaches back to it.
    week = blogchat(tmp_path, "usage", "--since", "7d", **database.env())
    assert "  in all: 5 turns, 101,710 tokens" in week.stdout.splitlines()
    bad = blogchat(tmp_path, "usage", "--since", "yesterday", **database.env())
    assert bad.returncode == 2
    assert "is not a span such as 30m, 24h, 7d or 2w" in bad.stderr
