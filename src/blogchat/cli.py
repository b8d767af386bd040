"""The `blogchat` command: `serve` the blog, `db upgrade` the schema, `check` the content,
and `usage` for what the assistant's turns have cost."""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import socket
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import uvicorn
from fastapi import FastAPI
from sqlalchemy.exc import SQLAlchemyError

from blogchat.content import ContentError
from blogchat.personas import PersonaError
from blogchat.settings import Settings, SettingsError, load_settings

if TYPE_CHECKING:
    from blogchat.store.usage import UsageReport
from blogchat.web.connections import HeaderDeadlineProtocol

log = logging.getLogger("blogchat")


def uvicorn_config(app: FastAPI, settings: Settings, *, host: str, port: int) -> uvicorn.Config:
    """The server configuration `blogchat serve` uses (tests start servers with it too)."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        # Frames up to this size reach the hub, which answers an oversize one with a
        # `too_large` error and keeps the connection; beyond it the server closes with 1009.
        ws_max_size=max(4 * settings.max_frame_bytes, 1 << 20),
        ws_ping_interval=settings.ws_ping_interval,
        ws_ping_timeout=settings.ws_ping_interval,
        http=HeaderDeadlineProtocol.with_header_timeout(settings.header_timeout),
        # X-Forwarded-For and -Proto are believed only from these peers (uvicorn's own
        # default is FORWARDED_ALLOW_IPS too, read behind our back; here it is a setting).
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=5,
        lifespan="on",
    )


def _configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    # Migrations announce every plugin they load; only their problems are news.
    logging.getLogger("alembic").setLevel(
        max(logging.WARNING, logging.getLevelName(settings.log_level))
    )


def _serve(settings: Settings, host: str, port: int) -> int:
    from blogchat.app import create_app, load_content

    content = load_content(settings)  # fail fast, with a clear message, on broken content
    _migrate(settings)  # and on a database that cannot be reached
    log.info(
        "serving %d posts by %d authors on http://%s:%d",
        len(content.blog.posts),
        len(content.blog.authors),
        host,
        port,
    )
    app = create_app(settings)
    Server(uvicorn_config(app, settings, host=host, port=port), app).run()
    return 0


class Server(uvicorn.Server):
    """uvicorn's server, which on shutdown (SIGTERM, SIGINT) first lets the app end its
    running turns and send their ends, while the readers are still connected: uvicorn closes
    every connection before the app's own shutdown runs."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.app = app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        drain = getattr(self.app.state, "drain", None)
        if drain is not None:
            try:
                await drain()
            except Exception:
                log.exception("the running turns could not be ended before shutdown")
        await super().shutdown(sockets)


def _migrate(settings: Settings) -> None:
    from blogchat.store import Store

    async def run() -> None:
        store = await Store.open(settings.database, schema=settings.database_schema)
        await store.close()

    asyncio.run(run())


def _upgrade(settings: Settings) -> int:
    _migrate(settings)
    log.info("database is up to date")
    return 0


def _check(settings: Settings) -> int:
    from blogchat.app import load_content

    content = load_content(settings)
    print(
        f"ok: {len(content.blog.posts)} posts, {len(content.blog.authors)} authors, "
        f"{len(content.personas)} personas"
    )
    return 0


_SPAN = re.compile(r"^(\d+)([mhdw])$")
_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _duration(text: str) -> timedelta:
    """`30m`, `24h`, `7d` or `2w`."""
    match = _SPAN.match(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a span such as 30m, 24h, 7d or 2w")
    return timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])


def _usage(settings: Settings, span: timedelta, top: int) -> int:
    from blogchat.store import Store

    async def run() -> UsageReport:
        store = await Store.open(settings.database, schema=settings.database_schema)
        try:
            return await store.usage.report(datetime.now(UTC) - span, top=top)
        finally:
            await store.close()

    report = asyncio.run(run())
    print(f"Usage since {report.since:%Y-%m-%d %H:%M} UTC")
    print(f"  in all: {report.total.turns:,} turns, {report.total.tokens:,} tokens")
    for heading, rows in (
        ("By visitor", report.by_visitor),
        ("By client address", report.by_address),
        ("The most expensive chats", report.costliest_chats),
    ):
        print(f"\n{heading}:")
        if not rows:
            print("  (none)")
        for row in rows:
            label = f"  {row.label!r}" if row.label else ""
            print(f"  {row.tokens:>12,} tokens {row.turns:>6,} turns  {row.key}{label}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `blogchat` console script."""
    parser = argparse.ArgumentParser(prog="blogchat", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the blog and the chat")
    serve.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    db = commands.add_parser("db", help="database maintenance")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser("upgrade", help="apply pending migrations")
    commands.add_parser("check", help="validate settings, content and personas")
    usage = commands.add_parser(
        "usage", help="turns and tokens by visitor, by address, and the most expensive chats"
    )
    usage.add_argument(
        "--since", type=_duration, default=timedelta(hours=24), help="span: 30m, 24h, 7d, 2w"
    )
    usage.add_argument("--top", type=int, default=10, help="rows per table (default 10)")
    args = parser.parse_args(argv)

    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"blogchat: {exc}", file=sys.stderr)
        return 2
    _configure_logging(settings)
    try:
        if args.command == "serve":
            return _serve(settings, args.host, args.port)
        if args.command == "db":
            return _upgrade(settings)
        if args.command == "usage":
            return _usage(settings, args.since, args.top)
        return _check(settings)
    except (ContentError, PersonaError) as exc:
        print(f"blogchat: {exc}", file=sys.stderr)
        return 1
    except (OSError, SQLAlchemyError) as exc:
        # An unreachable or misconfigured database: one line, naming the setting.
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        print(f"blogchat: cannot use the database (DATABASE_URL): {reason}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
