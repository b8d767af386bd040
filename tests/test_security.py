"""The attack catalogue: every attack on a reader's chats is tried here, and refused.

Many attacks are already tried where the feature lives; this module names them, so the
catalogue is complete in one place, and adds the attempts nobody else makes.

Cross-site WebSocket hijacking (a page elsewhere opens /ws with the reader's cookie):
- test_hub.py: test_a_cross_site_upgrade_is_refused, test_an_upgrade_without_an_origin_is_refused,
  test_an_origin_listed_in_allowed_origins_may_connect
- test_accounts.py: test_every_cross_site_write_is_refused, test_a_cross_site_login_is_refused,
  test_a_cross_site_delete_is_refused (the same guard on REST writes)
- here: look-alike origins (suffixes, userinfo, another scheme or port) are refused too.

Other visitors' chats, over the WebSocket and REST:
- test_session.py: test_another_visitors_chat_is_not_found_whatever_the_message
- test_api.py: test_another_visitors_chat_is_not_found_and_reveals_nothing,
  test_another_visitor_cannot_delete_a_chat, test_another_visitor_cannot_rename_a_chat
- test_reliability.py: test_hostile_message_sequences_never_fail_internally_or_reveal_another_
  visitors_chat (a fuzzer: another's chat always gets the answer an unknown chat gets)
- here: a reused clientMessageId never reaches another's chat; a stranger connected while
  a chat streams hears nothing of it; the chat page of another's chat shows nothing of it.

Session cookie tampering:
- test_accounts.py: test_a_tampered_cookie_is_a_new_visitor (another's id under my signature,
  a broken signature, no signature, garbage), test_a_cookie_signed_with_another_key_is_a_new_
  visitor, test_the_websocket_refuses_a_forged_cookie, test_logout_revokes_the_login_even_for_
  a_replayed_cookie, test_after_signing_in_the_account_continues_its_moved_chat_over_the_websocket
  (the old anonymous cookie no longer reaches a moved chat over the socket)
- test_hub.py: test_an_upgrade_with_a_forged_cookie_is_refused,
  test_an_upgrade_without_a_session_cookie_is_refused
- here: the old anonymous cookie reaches none of the moved chats over REST either.

Model-policy bypass (anonymous visitors get Haiku, and nothing else reaches the provider):
- test_session.py: test_anonymous_visitors_get_haiku_only
- test_api.py: test_anonymous_visitors_may_use_haiku_only
- test_claude_engine.py: test_anonymous_opus_is_refused_and_a_registered_users_opus_reaches_
  the_provider
- here: other spellings and full model ids are refused; a persona whose default model is
  Opus still gives an anonymous visitor Haiku; on the Claude engine, no anonymous attempt
  (Opus persona, Opus or Sonnet on a new or an existing chat) sends the provider anything
  but the Haiku model id.

Tool calls outside the persona's tools:
- test_claude_engine.py: test_the_model_gets_the_personas_prompt_only_its_tools_and_thinking,
  test_a_tool_the_persona_does_not_list_cannot_be_reached
- test_anthropic_server.py: test_request_carries_the_system_prompt_and_only_the_blog_tools
- here: the server refuses a tool the persona does not list whoever asks for it; the model
  asking for every CLI built-in (Read, Write, Edit, Bash, Glob, Grep, WebFetch, WebSearch,
  Task, Agent, NotebookEdit), another MCP server's tool and a blog tool outside its persona,
  at once, reads, writes, runs and fetches nothing.

Password guessing and mass sign-ups:
- test_accounts.py: test_after_ten_failed_sign_ins_the_account_refuses_even_the_right_password,
  test_parallel_guesses_cannot_get_past_the_limit, test_after_ten_failed_sign_ins_from_one_
  address_it_may_try_no_account, test_ten_registrations_per_address_per_hour_and_then_the_
  window_moves, test_x_forwarded_for_from_an_untrusted_peer_does_not_change_the_address,
  test_register_refuses_a_weak_password_with_a_clear_message (zxcvbn)
- test_settings.py, test_cli.py: a signing key under 32 characters is refused.

Resource exhaustion over HTTP (big bodies, slow bodies, slowloris):
- test_bodies.py: test_a_declared_body_over_the_cap_is_refused_before_it_is_read (every
  route), test_a_streamed_body_is_refused_as_it_passes_the_cap, test_a_body_that_trickles_
  in_too_slowly_gets_408_and_the_connection_closes
- test_connections.py: test_a_client_that_sends_half_a_header_line_is_answered_408_and_
  disconnected, test_many_slow_clients_are_all_dropped_and_others_are_served_meanwhile

Framing, sniffing and injected script (security headers):
- test_headers.py: the CSP on every response, no inline script or style in any template or
  script, the pages and a chat under the CSP in Chromium with no violation, no other site
  can frame a page, and the API docs load nothing from another origin.

XSS through blog content and model output:
- test_rendering.py: test_raw_html_and_dangerous_urls_come_out_inert (every renderer)
- test_pages.py: test_raw_html_in_a_post_is_shown_as_text_never_run
- here: a hostile post quoted into a chat answer is inert in `done`, in the history and in
  a real browser; so is hostile model output (thinking, a tool's name and input, the answer)
  on the Claude engine, in `done`, the history and a real browser.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from blogchat.app import load_content
from blogchat.settings import Settings
from tests.support.anthropic_server import reply, text, thinking, tool_use
from tests.support.claude import claude_server_for
from tests.support.client import COOKIE, Event, Reader, transcript
from tests.support.load import rest_get
from tests.support.server import REPO, LiveServer, running
from tests.test_rendering import assert_inert

# --- cross-site WebSocket hijacking --------------------------------------------------------


async def upgrade_status(server: LiveServer, cookie: str, origin: str) -> int:
    """The HTTP status of an upgrade carrying the reader's cookie from `origin` (101: open)."""
    try:
        async with connect(
            server.ws_url,
            origin=origin,  # type: ignore[arg-type]
            additional_headers={"Cookie": f"{COOKIE}={cookie}"},
            open_timeout=10,
        ):
            return 101
    except InvalidStatus as refused:
        status: int = refused.response.status_code
        return status


def look_alikes(origin: str) -> list[str]:
    """Origins an attacker can own that resemble `origin`."""
    scheme, host = origin.split("://")
    other_scheme = "https" if scheme == "http" else "http"
    name, _, port = host.partition(":")
    other_port = f"{name}:{int(port) + 1}" if port else f"{name}:8443"
    candidates = [
        f"{origin}.evil.example",
        f"{scheme}://evil.example/{host}",
        f"{scheme}://{host}@evil.example",
        f"{scheme}://evil-{host}",
        f"{other_scheme}://{host}",
        f"{scheme}://{other_port}",
        f"{scheme}://{name}",
        f"{origin}/",
        origin.upper(),
    ]
    return [candidate for candidate in candidates if candidate != origin]


async def test_look_alike_origins_cannot_open_the_websocket_with_a_readers_cookie(
    server: LiveServer, reader: Reader
) -> None:
    assert await upgrade_status(server, reader.cookie, server.url) == 101
    for origin in look_alikes(server.url):
        status = await upgrade_status(server, reader.cookie, origin)
        # A trailing slash is the same origin; everything else is someone else's.
        assert status == (101 if origin == f"{server.url}/" else 403), origin


async def test_look_alikes_of_an_allowed_origin_are_refused(
    make_settings: Callable[..., Settings],
) -> None:
    allowed = "https://blog.example"
    with running(make_settings(allowed_origins=allowed)) as server:
        async with Reader(server.url) as reader:
            assert await upgrade_status(server, reader.cookie, allowed) == 101
            for origin in look_alikes(allowed):
                status = await upgrade_status(server, reader.cookie, origin)
                assert status == (101 if origin == f"{allowed}/" else 403), origin


# --- other visitors' chats -----------------------------------------------------------------


async def test_a_client_message_id_another_visitor_used_starts_a_chat_of_ones_own(
    reader: Reader, other_reader: Reader
) -> None:
    victim = await reader.connect()
    await victim.chat("Tell me about the paperclip", clientMessageId="shared-id")
    theirs = (await victim.expect("chat_created"))["chatId"]
    await victim.until("done")

    attacker = await other_reader.connect()
    await attacker.chat("sourdough", clientMessageId="shared-id")
    created = await attacker.expect("chat_created")
    assert created["chatId"] != theirs
    events = await attacker.until("done")
    assert all(event.get("chatId") in (None, created["chatId"]) for event in events)
    assert "paperclip" not in str(events)
    # Naming the victim's chat with the same id gets what an unknown chat gets.
    await attacker.chat("sourdough", theirs, clientMessageId="shared-id")
    assert (await attacker.expect("error"))["code"] in ("not_found", "bad_request")
    listed = (await rest_get(other_reader, "/api/chats")).json()
    assert [chat["id"] for chat in listed] == [created["chatId"]]


async def test_a_stranger_connected_while_a_chat_streams_hears_nothing_of_it(
    make_settings: Callable[..., Settings],
) -> None:
    with running(make_settings(offline_tokens_per_second=400)) as server:
        async with Reader(server.url) as owner, Reader(server.url) as stranger:
            snoop = await stranger.connect()
            ws = await owner.connect()
            await ws.chat("How warm should a sourdough starter be kept?")
            chat_id = (await ws.expect("chat_created"))["chatId"]
            await ws.expect("user_message")
            # Mid-answer, the stranger tries everything it can name.
            for message in (
                {"type": "subscribe", "chatId": chat_id},
                {"type": "subscribe", "chatId": chat_id, "afterSeq": 0},
                {"type": "stop", "chatId": chat_id},
            ):
                await snoop.send(**message)
                assert (await snoop.expect("error"))["code"] == "not_found"
            done = (await ws.until("done"))[-1]
            assert done["reason"] == "complete", "a stranger's stop stopped the owner's answer"
            assert await snoop.silent(0.3)


async def test_the_chat_page_of_another_visitors_chat_shows_nothing_of_it(
    reader: Reader, other_reader: Reader
) -> None:
    ws = await reader.connect()
    await ws.chat("Lacto-fermented hot sauce, zanzibarian style")
    chat_id = (await ws.expect("chat_created"))["chatId"]
    await ws.until("done")
    own = await rest_get(reader, f"/chat/{chat_id}")
    assert "zanzibarian" in own.text
    theirs = await rest_get(other_reader, f"/chat/{chat_id}")
    assert theirs.status_code == 200
    assert "zanzibarian" not in theirs.text.lower()


# --- cookies -------------------------------------------------------------------------------


async def test_the_old_anonymous_cookie_reaches_no_moved_chat_over_rest(
    server: LiveServer, reader: Reader
) -> None:
    ws = await reader.connect()
    await ws.chat("sourdough starter temperature")
    chat_id = (await ws.expect("chat_created"))["chatId"]
    await ws.until("done")
    anonymous_cookie = reader.cookie
    await reader.register()
    async with Reader(server.url, cookie=anonymous_cookie) as replayed:
        assert (await rest_get(replayed, "/api/chats")).json() == []
        for method in ("GET", "DELETE"):
            response = await replayed.http.request(method, f"/api/chats/{chat_id}")
            assert response.status_code == 404
        rename = await replayed.http.patch(f"/api/chats/{chat_id}", json={"title": "mine"})
        assert rename.status_code == 404
    assert (await rest_get(reader, f"/api/chats/{chat_id}")).status_code == 200


# --- model policy --------------------------------------------------------------------------


async def test_other_spellings_of_a_model_are_refused_and_start_nothing(reader: Reader) -> None:
    ws = await reader.connect()
    for model in ("OPUS", "Opus", "opus ", "claude-opus-4-1", "claude-sonnet-4-5", ""):
        await ws.chat("sourdough", model=model)
        assert (await ws.expect("error"))["code"] == "bad_request", model
    for model in ("sonnet", "opus"):
        await ws.chat("sourdough", model=model)
        assert (await ws.expect("error"))["code"] == "model_not_allowed"
    assert (await rest_get(reader, "/api/chats")).json() == []


def personas_with_an_opus_default(folder: Path) -> Path:
    """The repo's personas plus one whose default model is Opus."""
    personas = yaml.safe_load((REPO / "config" / "personas.yaml").read_text())
    extra = dict(personas["personas"][0])
    extra.update(id="opus-fan", name="Opus fan", model="opus")
    personas["personas"].append(extra)
    path = folder / "personas.yaml"
    path.write_text(yaml.safe_dump(personas))
    return path


@pytest.fixture
def opus_persona_settings(make_settings: Callable[..., Settings], tmp_path: Path) -> Settings:
    """Settings whose personas include one that defaults to Opus."""
    return make_settings(personas_file=personas_with_an_opus_default(tmp_path))


async def test_a_persona_that_defaults_to_opus_still_gives_anonymous_visitors_haiku(
    opus_persona_settings: Settings,
) -> None:
    with running(opus_persona_settings) as server:
        async with Reader(server.url) as anonymous, Reader(server.url) as member:
            ws = await anonymous.connect()
            await ws.chat("sourdough", persona="opus-fan")
            assert (await ws.expect("chat_created"))["model"] == "haiku"
            await ws.until("done")

            await member.register()
            ws = await member.connect()
            await ws.chat("sourdough", persona="opus-fan")
            assert (await ws.expect("chat_created"))["model"] == "opus"
            await ws.until("done")


# --- tools ---------------------------------------------------------------------------------


def test_a_tool_outside_the_personas_list_is_refused_by_the_server(settings: Settings) -> None:
    content = load_content(settings)
    for persona in content.personas.values():
        allowed = persona.allowed_tools
        for name in sorted({*content.tools.names, "Bash", "Read", "WebFetch", "Task"}):
            if name in allowed:
                continue
            result = content.tools.call(name, {"query": "espresso"}, allowed)
            assert result.is_error, (persona.id, name)
            assert "espresso" not in result.output


# --- XSS through blog content --------------------------------------------------------------

HOSTILE_SECTION = """\
Zanzibarian espresso is pulled at dawn <script>window.__pwned = "script"</script> by hand.

<img src="x" onerror="window.__pwned = 'img'">

Read the [zanzibarian manual](javascript:window.__pwned='link') before you start.

<iframe src="https://evil.example"></iframe><svg onload="window.__pwned='svg'"></svg>
"""

HOSTILE_POST = f"""\
---
title: "Zanzibarian espresso <img src=x onerror=window.__pwned='title'>"
slug: zanzibarian-espresso
date: 2026-01-02
author: tomas-okafor
tags: [coffee]
summary: "How zanzibarian espresso is made <script>window.__pwned='summary'</script>."
---

{HOSTILE_SECTION}
"""


@pytest.fixture
def hostile_blog(make_settings: Callable[..., Settings], tmp_path: Path) -> Iterator[LiveServer]:
    """The sample blog plus a post full of markup that would run script if it were HTML."""
    content = tmp_path / "content"
    shutil.copytree(REPO / "content", content)
    (content / "posts" / "zanzibarian-espresso.md").write_text(HOSTILE_POST)
    with running(make_settings(content_dir=content, offline_tokens_per_second=400)) as live:
        yield live


def quoted_hostile_post(events: list[Event]) -> bool:
    """Whether an answer quoted the hostile post (else the test proves nothing)."""
    return "zanzibarian" in "".join(e["text"] for e in events if e["type"] == "token").lower()


async def test_a_hostile_post_quoted_into_an_answer_is_inert_in_done_and_in_the_history(
    hostile_blog: LiveServer,
) -> None:
    async with Reader(hostile_blog.url) as reader:
        ws = await reader.connect()
        await ws.chat("How is zanzibarian espresso made?")
        chat_id = (await ws.expect("chat_created"))["chatId"]
        events = await ws.until("done")
        assert quoted_hostile_post(events)
        assert "<script>" in "".join(e["text"] for e in events if e["type"] == "token")
        assert_inert(events[-1]["html"])
        for event in transcript(events):
            if event["type"] == "tool_result":
                # Tool output is data the client shows as text; it must reach it unchanged.
                assert "onerror" in event["output"]
        detail = (await rest_get(reader, f"/api/chats/{chat_id}")).json()
        assert_inert(detail["messages"][1]["html"])
        again = await reader.connect()
        await again.send(type="subscribe", chatId=chat_id)
        assert_inert((await again.expect("subscribed"))["messages"][1]["html"])


@pytest.mark.browser
@pytest.mark.asyncio(loop_scope="session")
async def test_a_hostile_post_quoted_into_an_answer_runs_nothing_in_the_browser(
    hostile_blog: LiveServer, page: Any, chat_page: Any
) -> None:
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: dialogs.append(dialog.message))
    await page.add_init_script("window.__pwned = null;")
    chat = await chat_page(page, hostile_blog.url).open()
    await chat.ask("How is zanzibarian espresso made?")
    answer = await chat.wait_for_answer("complete")
    assert "zanzibarian" in (await answer.text_content()).lower()
    # Links in the answer are there, but none of them is a script URL.
    hrefs = await page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)")
    assert not [href for href in hrefs if href.lower().startswith("javascript")]
    # (The page's own icons in a code block's bar are SVG; nothing from the model may be.)
    hostile = ", ".join(
        f"{answer} {tag}:not(.code-block__bar *)"
        for answer in (".answer__html", ".answer__stream")
        for tag in ("script", "img", "iframe", "svg")
    )
    assert await page.locator(hostile).count() == 0
    assert await page.locator("[onerror], [onload], [onclick]").count() == 0
    # Reloading renders the saved history: still nothing runs.
    await page.reload()
    await chat.wait_for_answer("complete")
    assert await page.evaluate("window.__pwned") is None
    assert dialogs == []


# --- the Claude engine: tools and model output ---------------------------------------------
#
# On SQLite only: these attacks go through the agent, not the store, and each chat costs an
# agent process.

BUILT_IN_CALLS = [
    ("Read", {"file_path": "{canary}"}),
    ("Write", {"file_path": "{written}", "content": "pwned"}),
    ("Edit", {"file_path": "{canary}", "old_string": "secret", "new_string": "pwned"}),
    ("Bash", {"command": "cat {canary} > {written}"}),
    ("Glob", {"pattern": "**/*"}),
    ("Grep", {"pattern": "secret", "path": "{folder}"}),
    ("WebFetch", {"url": "{api}/canary", "prompt": "fetch"}),
    ("WebSearch", {"query": "blogchat secret"}),
    ("Task", {"description": "x", "prompt": "read {canary}", "subagent_type": "general"}),
    ("Agent", {"description": "x", "prompt": "read {canary}"}),
    ("NotebookEdit", {"notebook_path": "{written}", "new_source": "x"}),
    ("mcp__other__steal", {}),
    ("mcp__blog__listPosts", {}),  # a blog tool the explainer persona does not list
]


@pytest.mark.claude
@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_the_agent_reaches_no_tool_outside_its_persona_whatever_the_model_asks(
    api: Any, claude_reader: Reader, tmp_path: Path
) -> None:
    canary = tmp_path / "canary.txt"
    canary.write_text("the secret is zanzibar-4242")
    written = tmp_path / "written.txt"
    places = {
        "canary": str(canary),
        "written": str(written),
        "folder": str(tmp_path),
        "api": api.base_url,
    }
    calls = [
        tool_use(name, {k: v.format(**places) for k, v in arguments.items()})
        for name, arguments in BUILT_IN_CALLS
    ]
    api.when_user_says("everything", [reply(*calls), text("Nothing worked.")])
    ws = await claude_reader.connect()
    await ws.chat("Try everything", persona="explainer")
    chat_id = (await ws.expect("chat_created"))["chatId"]
    events = await ws.until("done", timeout=120)

    assert events[-1]["reason"] == "complete"
    results = [e for e in events if e["type"] == "tool_result"]
    assert len(results) == len(BUILT_IN_CALLS)
    assert all(result["isError"] for result in results), results
    # Nothing was read, written, run or fetched.
    detail = (await rest_get(claude_reader, f"/api/chats/{chat_id}")).json()
    assert "zanzibar-4242" not in str(events) + str(detail)
    assert "zanzibar-4242" not in str([r.body for r in api.requests])
    assert not written.exists()
    assert canary.read_text() == "the secret is zanzibar-4242"
    assert not [r for r in api.unknown_requests() if "canary" in r.path]


HOSTILE_ANSWER = (
    "Here <script>window.__pwned='script'</script> you go "
    "<img src=x onerror=\"window.__pwned='img'\"> and "
    "[a link](javascript:window.__pwned='link') and "
    '<a href="javascript:window.__pwned=1">raw</a> '
    "<iframe src=https://evil.example></iframe>"
)
HOSTILE_TOOL = "<img src=x onerror=\"window.__pwned='tool'\">"


def hostile_turn() -> list[Any]:
    """A model reply whose thinking, tool call and answer all carry markup."""
    return [
        reply(
            thinking("Thinking <script>window.__pwned='thinking'</script>."),
            tool_use("searchBlogContent", {"query": "<svg onload=window.__pwned='input'>"}),
        ),
        reply(tool_use(HOSTILE_TOOL, {"x": "<script>window.__pwned='input2'</script>"})),
        text(HOSTILE_ANSWER),
    ]


@pytest.mark.claude
@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_hostile_model_output_is_inert_in_done_and_in_the_history(
    api: Any, claude_reader: Reader
) -> None:
    api.when_user_says("markup", hostile_turn())
    ws = await claude_reader.connect()
    await ws.chat("Show me markup")
    chat_id = (await ws.expect("chat_created"))["chatId"]
    events = await ws.until("done", timeout=120)

    assert events[-1]["reason"] == "complete"
    streamed = "".join(e["text"] for e in events if e["type"] == "token")
    assert "<script>" in streamed, "the model's markup should reach the reader as text"
    assert_inert(events[-1]["html"])
    detail = (await rest_get(claude_reader, f"/api/chats/{chat_id}")).json()
    assert_inert(detail["messages"][-1]["html"])


@pytest.mark.claude
@pytest.mark.browser
@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_hostile_model_output_runs_nothing_in_the_browser(
    api: Any, claude_server: LiveServer, page: Any, chat_page: Any
) -> None:
    api.when_user_says("markup", hostile_turn())
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: dialogs.append(dialog.message))
    await page.add_init_script("window.__pwned = null;")
    chat = await chat_page(page, claude_server.url).open()
    await chat.ask("Show me markup")
    answer = await chat.wait_for_answer("complete", timeout=120_000)
    assert "you go" in (await answer.text_content() or "")
    # Open every tool card and the thinking, where the model's own strings are shown.
    for summary in await page.locator(".msg summary").all():
        await summary.click()
    shown = " ".join(await page.locator(".msg").all_text_contents())
    assert "window.__pwned='input2'" in shown, "the tool call's markup should show as text"
    # (The page's own icons are `svg.icon`; any on* attribute is caught below.)
    hostile = ", ".join(
        f".msg .answer__html {tag}, .msg .tool {tag}, .msg .thinking {tag}"
        for tag in ("script", "img", "iframe", "svg:not(.icon)")
    )
    found = await page.eval_on_selector_all(hostile, "els => els.map(e => e.outerHTML)")
    assert found == []
    assert await page.locator("[onerror], [onload], [onclick]").count() == 0
    hrefs = await page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)")
    assert not [href for href in hrefs if href.lower().startswith("javascript")]
    await page.reload()
    await chat.wait_for_answer("complete")
    assert await page.evaluate("window.__pwned") is None
    assert dialogs == []


@pytest.mark.claude
@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_no_anonymous_attempt_sends_the_provider_anything_but_haiku(
    api: Any, make_claude_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_claude_settings(personas_file=personas_with_an_opus_default(tmp_path))
    with claude_server_for(settings) as server:
        async with Reader(server.url) as reader:
            ws = await reader.connect()
            await ws.chat("Hello", persona="opus-fan")
            chat_id = (await ws.expect("chat_created"))["chatId"]
            await ws.until("done", timeout=60)
            for model in ("opus", "sonnet"):
                await ws.chat("Now with a better model", chat_id, model=model)
                assert (await ws.expect("error"))["code"] == "model_not_allowed"
                await ws.chat("A new chat with a better model", model=model)
                assert (await ws.expect("error"))["code"] == "model_not_allowed"
            await ws.chat("And again", chat_id)
            await ws.until("done", timeout=60)
    models = {request.model for request in api.main_requests()}
    assert models == {settings.model_haiku}
