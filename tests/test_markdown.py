"""The live Markdown renderer (static/js/markdown.js) in Chromium, against the server's.

The chat renders an answer while it streams with markdown.js and replaces it at `done` with
the server's HTML (rendering.render_answer). These tests hold the two to the same tree, node
for node (so nothing moves at `done`), and hold the live one to the server's safety rules.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from playwright.async_api import Page

from blogchat.content import Blog
from blogchat.rendering import EXTERNAL_LINK_REL, render_answer
from tests.support.lab import open_lab, run

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]

CONTENT = Path(__file__).resolve().parents[1] / "content"

LAB_SCRIPT = r"""
import * as md from "/static/js/markdown.js";

// A tree as text, attributes sorted: two trees are the same exactly when these are equal.
function canon(node) {
  if (node.nodeType === Node.TEXT_NODE) return JSON.stringify(node.data);
  const attrs = [...node.attributes].map((a) => `${a.name}=${JSON.stringify(a.value)}`).sort();
  const open = [node.localName, ...attrs].join(" ");
  return `<${open}>${[...node.childNodes].map(canon).join("")}</${node.localName}>`;
}

// The server's HTML, as the page would show it; code reduced to its text, because
// highlighting arrives separately (POST /api/highlight) and is compared on its own.
function server(html) {
  const template = document.createElement("template");
  template.innerHTML = html;
  for (const code of template.content.querySelectorAll("pre > code")) {
    code.textContent = code.textContent;
  }
  template.content.normalize();
  return [...template.content.childNodes].map(canon).join("");
}

function live(source) {
  return [...md.renderMarkdown(source).childNodes].map(canon).join("");
}

// Each (source, html) pair whose trees differ, with both trees.
function differences(pairs) {
  return pairs
    .map(([source, html]) => [source, server(html), live(source)])
    .filter(([, a, b]) => a !== b);
}

function elements(source) {
  const out = [];
  const walk = (node) => {
    for (const el of node.children) {
      const attrs = Object.fromEntries([...el.attributes].map((a) => [a.name, a.value]));
      out.push([el.localName, attrs]);
      walk(el);
    }
  };
  const root = document.createElement("div");
  root.append(md.renderMarkdown(source));
  walk(root);
  return out;
}

window.lab = { md, differences, elements, ready: true };
"""


@pytest_asyncio.fixture(loop_scope="session")
async def lab(page: Page) -> Page:
    """A page with markdown.js loaded (`window.lab.md`) and the comparison helpers."""
    return await open_lab(page, LAB_SCRIPT)


async def differences(lab: Page, sources: list[str]) -> list[list[str]]:
    pairs = [[source, render_answer(source)] for source in sources]
    found: list[list[str]] = await run(lab, "return lab.differences(arg);", pairs)
    return found


# Answers as they really read, and the corners of CommonMark an answer can wander into.
ANSWER_SHAPES = [
    "*a **b** c*",
    "**bold**text and foo*bar* and _foo_bar_ and ***x*** and *x **y*** z and a * b * c",
    '[link](https://x.example/a?b=c&d=e "T") [l](</a b>) <https://x.example/%20z> <me@x.org>',
    "![img *alt*](/x.png) ![x](data:image/png;base64,AA) [a](javascript:alert(1)) [a](ftp://x)",
    '[x][ref] and [ref]\n\n[ref]: /url "title"',
    "&copy; &nbsp; &#65; &#x41; &bogus; a\\*b\\",
    "line  \nbreak\\\nnext",
    "- a\n- b\n\n- c\n\n1. x\n2. y\n   - z\n\n3) three\n4) four",
    "* a\n\n  b\n* c\n- a\n -b\n- [ ] task",
    "> q\n> > nested\n\nafter\n\n> ```py\n> x = 1\n> ```",
    "Setext\n===\n\nSub\n---\n\n# H1 #\n## H2\n###### H6\n\n***\n---\n___",
    "| a | b |\n|:-|-:|\n| 1 | 2 |\n| 3 |\n\n| `x|y` | z |\n|---|---|",
    "    indented\n    code\n\npara\n    not code",
    "~~del~~ ~single~ ~~~x~~~ Emoji *😀* and **—dash—**",
    "```\nunclosed",
    "Text with `code` and ``co`de`` and <b>raw</b> <!-- c -->",
    "- item\n  ```js\n  const a = 1;\n  ```\n- next",
]


async def test_the_live_tree_is_the_servers_for_every_post_and_answer_shape(lab: Page) -> None:
    posts = [post.body for post in Blog.load(CONTENT).posts]
    assert len(posts) > 10
    assert await differences(lab, posts + ANSWER_SHAPES) == []


async def test_the_live_tree_is_the_servers_at_every_point_a_post_could_be_cut(
    lab: Page,
) -> None:
    # While an answer streams, it is any prefix of itself: half a table, an open fence, a
    # list item with no text yet. Every prefix must read as the server would read it.
    prefixes = [
        post.body[:end]
        for post in Blog.load(CONTENT).posts
        for end in range(0, len(post.body) + 1, 23)
    ]
    assert len(prefixes) > 1000
    assert await differences(lab, prefixes) == []


_PIECES = st.sampled_from(
    [
        *"*_~`[]()!<>&#|\\-+=.:; \t\n\"'xyz1é😀—",
        *["\n\n", "```", "    ", "&nbsp;", "&#x41;", "&copy;", "&lt;", "http://a.example/"],
        *["mailto:x@y.z", "[x]: /y", "> ", "1. ", "- ", "* ", "  \n", "**", "__", "~~"],
        *["| a | b |\n|---|---|\n", "![", "](", "## "],
    ]
)
_MARKDOWNISH = st.lists(_PIECES, max_size=60).map("".join)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(source=_MARKDOWNISH)
async def test_the_live_tree_is_the_servers_for_generated_markdown(lab: Page, source: str) -> None:
    assert await differences(lab, [source]) == []


_ALLOWED = {
    "a": {"href", "title", "rel"},
    "code": {"class"},
    "ol": {"start"},
    "th": {"align"},
    "td": {"align"},
    **{
        tag: set[str]()
        for tag in [
            *["blockquote", "br", "del", "em", "h1", "h2", "h3", "h4", "h5", "h6", "hr"],
            *["li", "p", "pre", "s", "strong", "table", "tbody", "thead", "tr", "ul"],
        ]
    },
}
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")
_HOSTILE = st.sampled_from(
    [
        "<script>alert(1)</script>",
        "<img src=x onerror=alert(1)>",
        "[x](javascript:alert(1))",
        "[x](JaVaScRiPt:alert(1))",
        "[x](java\tscript:alert(1))",
        "![x](javascript:alert(1))",
        "[x](data:text/html;base64,PHNjcmlwdD4=)",
        "![x](data:image/png;base64,iVBORw0KGgo=)",
        "<iframe src=https://evil.example></iframe>",
        '[x](https://ok.example "t" onmouseover=alert(1))',
        '```python" onclick="alert(1)\ncode\n```',
        "<x:y>",
        "[x](vbscript:msgbox)",
        "&#106;avascript:",
        "[x](&#106;avascript:alert(1))",
        "<javascript:alert(1)>",
    ]
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(source=st.lists(st.one_of(_HOSTILE, _PIECES), max_size=30).map("".join))
async def test_no_streamed_text_yields_script_handlers_styles_or_unsafe_links(
    lab: Page, source: str
) -> None:
    found: list[tuple[str, dict[str, str]]] = await run(lab, "return lab.elements(arg);", source)
    for tag, attrs in found:
        assert tag in _ALLOWED, tag
        assert set(attrs) <= _ALLOWED[tag], (tag, attrs)
        if "href" in attrs:
            # What a browser takes for a scheme (the href holds no spaces or controls).
            scheme = _SCHEME.match(attrs["href"])
            assert scheme is None or scheme[1].lower() in {"http", "https", "mailto"}, attrs
        if "rel" in attrs:
            assert attrs["rel"] == EXTERNAL_LINK_REL
        if tag == "code" and "class" in attrs:
            assert re.fullmatch(r"language-[A-Za-z0-9_+#.-]{1,40}", attrs["class"])


async def test_a_growing_answer_redraws_only_the_blocks_whose_text_changed(lab: Page) -> None:
    result: dict[str, Any] = await run(
        lab,
        """
        const box = document.createElement("div");
        const codes = [];
        const live = new lab.md.LiveMarkdown(box, { onCode: (pre, info) => codes.push(info) });
        const text = "First *paragraph*.\\n\\n- one\\n- two\\n\\n"
          + "```js\\nlet a = 1;\\n```\\n\\nLast one";
        const redrawn = [];
        let firstP = null;
        let kept = true;
        for (let end = 1; end <= text.length; end += 1) {
          redrawn.push(live.update(text.slice(0, end)));
          const p = box.querySelector("p");
          if (end > 20 && firstP === null) firstP = p;
          if (firstP !== null && p !== firstP) kept = false;
        }
        return {
          maxRedrawn: Math.max(...redrawn), kept, html: box.innerHTML,
          finalCodes: codes.filter((c) => c.final).map((c) => [c.language, c.code]),
          openCodes: codes.filter((c) => !c.final).length,
        };
        """,
    )
    # Each new character touches at most the block it lands in (and one it ends or starts).
    assert result["maxRedrawn"] <= 2
    assert result["kept"], "a finished paragraph keeps its node while later text streams"
    assert result["html"].startswith("<p>First <em>paragraph</em>.</p>\n<ul>")
    assert result["html"].endswith("<p>Last one</p>\n")
    # The code block is reported as final once its closing fence arrives, and only then.
    assert ("js", "let a = 1;\n") in [tuple(code) for code in result["finalCodes"]]
    assert result["openCodes"] > 0


async def test_an_unfinished_paragraph_shows_what_it_opened_as_already_closed(lab: Page) -> None:
    cases = {
        "*Offline mode: no language": "<p><em>Offline mode: no language</em></p>\n",
        "*Offline mode: no model, so ": "<p><em>Offline mode: no model, so</em></p>\n",
        "**[SQLite in prod": '<p><strong><a href="">SQLite in prod</a></strong></p>\n',
        "**[SQLite](/posts/sqlite-in": (
            '<p><strong><a href="/posts/sqlite-in">SQLite</a></strong></p>\n'
        ),
        "Run `pip inst": "<p>Run <code>pip inst</code></p>\n",
        "Done. **": "<p>Done.</p>\n",
        "Wow! ![": "<p>Wow!</p>\n",
        "Wow!": "<p>Wow!</p>\n",
        "> A quote with _emph": "<blockquote>\n<p>A quote with <em>emph</em></p>\n</blockquote>\n",
        # Not openers: nothing is added.
        "5 * 3 is": "<p>5 * 3 is</p>\n",
        "call snake_case_na": "<p>call snake_case_na</p>\n",
        "index a[0": "<p>index a[0</p>\n",
        "```python\nx = *y": '<pre><code class="language-python">x = *y</code></pre>\n',
        "**bold** and *em*": "<p><strong>bold</strong> and <em>em</em></p>\n",
    }
    result: dict[str, str] = await run(
        lab,
        """
        const out = {};
        for (const source of arg) {
          const box = document.createElement("div");
          new lab.md.LiveMarkdown(box).update(source);
          out[source] = box.innerHTML;
        }
        return out;
        """,
        list(cases),
    )
    assert result == cases


async def test_a_finished_text_is_rendered_exactly_as_written(lab: Page) -> None:
    # The completion is for growing text only: a finished answer that ends in an opener
    # keeps it, as the server does.
    result = await run(
        lab,
        """
        const box = document.createElement("div");
        const live = new lab.md.LiveMarkdown(box);
        live.update("Ends with *nix");
        const growing = box.innerHTML;
        live.update("Ends with *nix", { growing: false });
        return [growing, box.innerHTML];
        """,
    )
    assert result == ["<p>Ends with <em>nix</em></p>\n", "<p>Ends with *nix</p>\n"]
