"""The Claude Agent SDK's session transcripts, kept in our database.

The SDK mirrors every line of a session's transcript to a `SessionStore` and reads it back
to resume a session in a new CLI process (after an idle client was reclaimed, or after a
restart). This is that store, on SQLite and PostgreSQL. It passes the SDK's conformance
suite (`claude_agent_sdk.testing.run_session_store_conformance`).

With several instances its writes are fenced as the chat's message saves are: a session is
a chat (its id is the chat's), and only the chat's current owner may change its transcript.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from datetime import datetime
from itertools import groupby
from typing import Any, cast

from claude_agent_sdk import (
    SessionKey,
    SessionListSubkeysKey,
    SessionStore,
    SessionStoreEntry,
    SessionStoreListEntry,
    SessionSummaryEntry,
    fold_session_summary,
)
from sqlalchemy import delete, exists, func, select
from sqlalchemy.dialects import postgresql, sqlite

from blogchat.store.chats import StaleOwner, advance_fence
from blogchat.store.database import Database, runs_to_completion
from blogchat.store.tables import AgentTranscriptEntry, utcnow

log = logging.getLogger(__name__)

MAIN = ""  # The subpath of a session's main transcript.


def _subpath(key: SessionKey) -> str:
    return key.get("subpath") or MAIN


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _where(key: SessionKey | SessionListSubkeysKey) -> list[Any]:
    return [
        AgentTranscriptEntry.project_key == key["project_key"],
        AgentTranscriptEntry.session_id == key["session_id"],
    ]


# The token this instance holds for a chat, or None when it does not own the chat.
Fences = Callable[[str], int | None]


class TranscriptStore(SessionStore):
    """A SessionStore over the `agent_transcripts` table.

    With `fences` (several instances), a write to a chat's transcript lands only if this
    instance owns the chat and no higher token saved to it since (else StaleOwner): an
    owner paused past its lease cannot add its late turn, nor cut back the new owner's.
    """

    def __init__(self, db: Database, fences: Fences | None = None) -> None:
        self.db = db
        self.fences = fences

    async def _fence(self, session: Any, chat_id: str) -> None:
        """Within a write's transaction: refuse it unless this instance still owns the chat
        (the row lock taken here orders it with a new owner's claim)."""
        if self.fences is None:
            return
        fence = self.fences(chat_id)
        if fence is not None:
            with contextlib.suppress(StaleOwner):
                await advance_fence(session, chat_id, fence)
                return
        log.warning("chat %s: transcript write refused: another instance owns the chat", chat_id)
        raise StaleOwner(chat_id)

    @runs_to_completion
    async def append(self, key: SessionKey, entries: list[SessionStoreEntry]) -> None:
        """Add a batch of entries after the ones already stored, in order."""
        if not entries:
            return
        now = utcnow()
        subpath = _subpath(key)
        rows = [
            {
                "project_key": key["project_key"],
                "session_id": key["session_id"],
                "subpath": subpath,
                "uuid": uuid if isinstance(uuid := entry.get("uuid"), str) else None,
                "entry": dict(entry),
                "created_at": now,
            }
            for entry in entries
        ]
        async with self.db.session() as session:
            await self._fence(session, key["session_id"])
            dialect = postgresql if self.db.url.get_backend_name() == "postgresql" else sqlite
            # An entry's uuid is its identity: a batch retried after a timeout that did
            # land must not be stored twice.
            statement = dialect.insert(AgentTranscriptEntry).on_conflict_do_nothing()
            await session.execute(statement, rows)

    @runs_to_completion
    async def load(self, key: SessionKey) -> list[SessionStoreEntry] | None:
        """Every entry of a transcript in append order; None if it was never written."""
        async with self.db.session() as session:
            entries = (
                await session.scalars(
                    select(AgentTranscriptEntry.entry)
                    .where(*_where(key), AgentTranscriptEntry.subpath == _subpath(key))
                    .order_by(AgentTranscriptEntry.id)
                )
            ).all()
        if not entries:
            return None
        return [cast(SessionStoreEntry, entry) for entry in entries]

    @runs_to_completion
    async def list_sessions(self, project_key: str) -> list[SessionStoreListEntry]:
        """The main transcripts of a project with their last write time (epoch ms)."""
        async with self.db.session() as session:
            rows = (
                await session.execute(
                    select(
                        AgentTranscriptEntry.session_id,
                        func.max(AgentTranscriptEntry.created_at),
                    )
                    .where(
                        AgentTranscriptEntry.project_key == project_key,
                        AgentTranscriptEntry.subpath == MAIN,
                    )
                    .group_by(AgentTranscriptEntry.session_id)
                )
            ).all()
        return [{"session_id": session_id, "mtime": _ms(written)} for session_id, written in rows]

    @runs_to_completion
    async def list_session_summaries(self, project_key: str) -> list[SessionSummaryEntry]:
        """A summary of each main transcript of a project, folded from its entries on read.

        Rarely called (session listings), so there is no summary table to keep in step.
        """
        async with self.db.session() as session:
            rows = (
                await session.execute(
                    select(
                        AgentTranscriptEntry.session_id,
                        AgentTranscriptEntry.entry,
                        AgentTranscriptEntry.created_at,
                    )
                    .where(
                        AgentTranscriptEntry.project_key == project_key,
                        AgentTranscriptEntry.subpath == MAIN,
                    )
                    .order_by(AgentTranscriptEntry.session_id, AgentTranscriptEntry.id)
                )
            ).all()
        summaries: list[SessionSummaryEntry] = []
        for session_id, group in groupby(rows, key=lambda row: row[0]):
            lines = list(group)
            key: SessionKey = {"project_key": project_key, "session_id": session_id}
            entries = [cast(SessionStoreEntry, line[1]) for line in lines]
            summary = fold_session_summary(None, key, entries)
            summary["mtime"] = max(_ms(line[2]) for line in lines)
            summaries.append(summary)
        return summaries

    @runs_to_completion
    async def delete(self, key: SessionKey) -> None:
        """Delete a transcript; deleting a main transcript also deletes its subkeys."""
        conditions = _where(key)
        if subpath := key.get("subpath"):
            conditions.append(AgentTranscriptEntry.subpath == subpath)
        async with self.db.session() as session:
            await self._fence(session, key["session_id"])
            await session.execute(delete(AgentTranscriptEntry).where(*conditions))

    @runs_to_completion
    async def list_subkeys(self, key: SessionListSubkeysKey) -> list[str]:
        """The subpaths stored under a session (subagent transcripts)."""
        async with self.db.session() as session:
            subpaths = await session.scalars(
                select(AgentTranscriptEntry.subpath)
                .where(*_where(key), AgentTranscriptEntry.subpath != MAIN)
                .distinct()
                .order_by(AgentTranscriptEntry.subpath)
            )
            return list(subpaths)

    # --- beyond the SDK's protocol ------------------------------------------------------

    @runs_to_completion
    async def has_session(self, project_key: str, session_id: str) -> bool:
        """Whether a main transcript exists for this session (so it can be resumed)."""
        async with self.db.session() as session:
            found = await session.scalar(
                select(
                    exists().where(
                        AgentTranscriptEntry.project_key == project_key,
                        AgentTranscriptEntry.session_id == session_id,
                        AgentTranscriptEntry.subpath == MAIN,
                    )
                )
            )
            return bool(found)

    @runs_to_completion
    async def mark(self, project_key: str, session_id: str) -> int:
        """Where a session's stored transcript ends now (0 when there is none)."""
        async with self.db.session() as session:
            last = await session.scalar(
                select(func.max(AgentTranscriptEntry.id)).where(
                    AgentTranscriptEntry.project_key == project_key,
                    AgentTranscriptEntry.session_id == session_id,
                )
            )
            return int(last or 0)

    @runs_to_completion
    async def truncate(self, project_key: str, session_id: str, *, after: int) -> int:
        """Drop what a session's transcript gained after `mark` said `after`; returns how
        many entries went."""
        async with self.db.session() as session:
            await self._fence(session, session_id)
            result = await session.execute(
                delete(AgentTranscriptEntry).where(
                    AgentTranscriptEntry.project_key == project_key,
                    AgentTranscriptEntry.session_id == session_id,
                    AgentTranscriptEntry.id > after,
                )
            )
            return int(getattr(result, "rowcount", 0) or 0)
