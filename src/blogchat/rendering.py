"""Markdown to sanitized HTML, for blog posts and for the assistant's answers."""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from html import escape
from typing import Final

import nh3
from markdown_it import MarkdownIt
from markdown_it.token import Token
from markdown_it.utils import EnvType, OptionsDict
from mdit_py_plugins.anchors import anchors_plugin
from mdit_py_plugins.anchors.index import slugify
from pygments.lexer import Lexer
from pygments.lexers import get_lexer_by_name
from pygments.token import STANDARD_TYPES, _TokenType
from pygments.util import ClassNotFound

__all__ = [
    "EXTERNAL_LINK_REL",
    "HIGHLIGHT_CLASSES",
    "MAX_HIGHLIGHT_CHARS",
    "heading_anchor",
    "highlight",
    "parse_markdown",
    "plain_text",
    "render_answer",
    "render_markdown",
    "render_tokens",
]

EXTERNAL_LINK_REL: Final = "nofollow noopener noreferrer"
"""The `rel` every link that leaves the site carries."""

_ALLOWED_TAGS: Final = frozenset(
    {
        "a",
        "blockquote",
        "br",
        "code",
        "del",
        "em",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "hr",
        "img",
        "li",
        "ol",
        "p",
        "pre",
        "s",
        "span",
        "strong",
        "table",
        "tbody",
        "td",
        "th",
        "thead",
        "tr",
        "ul",
    }
)
_ALLOWED_ATTRIBUTES: Final = {
    "a": {"href", "title"},
    "img": {"src", "alt", "title"},
    "h2": {"id"},
    "h3": {"id"},
    "ol": {"start"},
    "code": {"class"},
    "span": {"class"},
}
# Attributes whose whole value must come from a fixed set; nh3 wants these kept out of
# `attributes`.
_FIXED_ATTRIBUTE_VALUES: Final = {
    "a": {"rel": {EXTERNAL_LINK_REL}},
    "td": {"align": {"left", "center", "right"}},
    "th": {"align": {"left", "center", "right"}},
}
# Relative URLs pass through nh3 untouched; absolute ones must use one of these schemes.
_URL_SCHEMES: Final = frozenset({"http", "https", "mailto"})
_EXTERNAL_URL = re.compile(r"^(?:https?:)?//", re.IGNORECASE)
_CODE_CLASS = re.compile(r"^language-[A-Za-z0-9_+#.-]{1,40}$")
_TEXT_ALIGN = re.compile(r"^text-align:(left|center|right)$")

HIGHLIGHT_CLASSES: Final = frozenset(name for name in STANDARD_TYPES.values() if name)
"""Pygments' short CSS class names (`k` keyword, `s2` string, `c1` comment, ...): the only
classes a highlighted piece of code carries, styled by chat.css."""
MAX_HIGHLIGHT_CHARS: Final = 20_000
"""Longer code is shown plain: a lexer's cost grows with its input."""


def heading_anchor(title: str) -> str:
    """The anchor id for a heading's text, before de-duplication within its document."""
    # An all-punctuation or emoji heading would otherwise get id="", which no URL can target.
    return slugify(title) or "section"


def _attribute_filter(tag: str, attribute: str, value: str) -> str | None:
    if tag == "code" and attribute == "class":
        return value if _CODE_CLASS.match(value) else None
    if tag == "span" and attribute == "class":
        return value if value in HIGHLIGHT_CLASSES else None
    return value


@lru_cache(maxsize=64)
def _lexer(language: str) -> Lexer | None:
    try:
        # stripnl/ensurenl off: the pieces must join back to exactly the code that was given.
        return get_lexer_by_name(language, stripnl=False, ensurenl=False, stripall=False)
    except ClassNotFound:
        return None


def _css_class(token_type: _TokenType) -> str:
    # Pygments names only its standard token types; a lexer's own subtypes take their
    # nearest standard ancestor's name, so the set of classes (and of CSS rules) stays fixed.
    current: _TokenType | None = token_type
    while current is not None and current not in STANDARD_TYPES:
        current = current.parent
    return STANDARD_TYPES[current] if current is not None else ""


def highlight(code: str, language: str) -> list[tuple[str, str]]:
    """Code as Pygments reads it: (CSS class, text) pieces that join back to `code` exactly.

    The class is "" for plain text. A language Pygments does not know, or code longer than
    MAX_HIGHLIGHT_CHARS, gives one plain piece. The final rendering of an answer and the
    live one (`POST /api/highlight`) both come from here, so they cannot differ.
    """
    lexer = _lexer(language.lower()) if language and len(code) <= MAX_HIGHLIGHT_CHARS else None
    if lexer is None:
        return [("", code)] if code else []
    pieces: list[tuple[str, str]] = []
    for token_type, text in lexer.get_tokens(code):
        if not text:
            continue
        css = _css_class(token_type)
        if css == "w":
            css = ""  # whitespace needs no colour
        if pieces and pieces[-1][0] == css:
            pieces[-1] = (css, pieces[-1][1] + text)
        else:
            pieces.append((css, text))
    if "".join(text for _, text in pieces) != code:
        # A lexer that rewrote its input (tabs, line ends): show the code as it was given.
        return [("", code)]
    return pieces


def _highlight_html(code: str, language: str, attributes: str) -> str:
    return "".join(
        f'<span class="{css}">{escape(text, quote=False)}</span>'
        if css
        else escape(text, quote=False)
        for css, text in highlight(code, language)
    )


def _sanitize(html: str) -> str:
    return nh3.clean(
        html,
        tags=set(_ALLOWED_TAGS),
        clean_content_tags={"script", "style"},
        attributes={tag: set(names) for tag, names in _ALLOWED_ATTRIBUTES.items()},
        attribute_filter=_attribute_filter,
        link_rel=None,
        tag_attribute_values={
            tag: {name: set(values) for name, values in attrs.items()}
            for tag, attrs in _FIXED_ATTRIBUTE_VALUES.items()
        },
        url_schemes=set(_URL_SCHEMES),
    )


def _mark_external_links(tokens: Sequence[Token]) -> None:
    for token in tokens:
        if token.children:
            _mark_external_links(token.children)
        if token.type == "link_open":
            href = str(token.attrGet("href") or "")
            if _EXTERNAL_URL.match(href):
                token.attrSet("rel", EXTERNAL_LINK_REL)


def _table_alignment_as_attribute(tokens: Sequence[Token]) -> None:
    # markdown-it aligns table cells with `style`, which the sanitizer refuses on principle;
    # the `align` attribute says the same thing without opening the door to CSS.
    for token in tokens:
        if token.type in ("th_open", "td_open"):
            style = token.attrGet("style")
            if style is not None:
                del token.attrs["style"]
                match = _TEXT_ALIGN.match(str(style))
                if match:
                    token.attrSet("align", match.group(1))


def _image_as_link(
    self: object, tokens: Sequence[Token], idx: int, options: OptionsDict, env: EnvType
) -> str:
    # A model's answer could name any image URL; loading it would report the reader to a
    # third party, so the reader gets a link to follow instead.
    token = tokens[idx]
    src = str(token.attrGet("src") or "")
    alt = "".join(child.content for child in token.children or [])
    label = alt or src
    return f'<a href="{escape(src)}" rel="{EXTERNAL_LINK_REL}">{escape(label)}</a>'


def _new_parser(*, heading_ids: bool, highlight_code: bool = False) -> MarkdownIt:
    # html=False makes raw HTML in the source plain text, so it is shown, never run.
    options: dict[str, object] = {"html": False}
    if highlight_code:
        options["highlight"] = _highlight_html
    md = MarkdownIt("commonmark", options).enable(["table", "strikethrough"])
    if heading_ids:
        md.use(anchors_plugin, min_level=2, max_level=3, slug_func=heading_anchor)
    return md


_POST_PARSER: Final = _new_parser(heading_ids=True)
# Answers get no heading ids, so an answer shown next to a post cannot take over its anchors.
# Their fenced code is highlighted (the chat styles Pygments' classes; blog pages do not).
_ANSWER_PARSER: Final = _new_parser(heading_ids=False, highlight_code=True)
_ANSWER_PARSER.add_render_rule("image", _image_as_link)


def parse_markdown(text: str) -> list[Token]:
    """Parse blog Markdown into markdown-it tokens; `##`/`###` headings carry their anchor id."""
    return _POST_PARSER.parse(text)


def render_tokens(tokens: Sequence[Token]) -> str:
    """Render tokens from `parse_markdown` to sanitized HTML."""
    tokens = list(tokens)
    _mark_external_links(tokens)
    _table_alignment_as_attribute(tokens)
    return _sanitize(_POST_PARSER.renderer.render(tokens, _POST_PARSER.options, {}))


def render_markdown(text: str) -> str:
    """Render blog Markdown to sanitized HTML; raw HTML in the source comes out escaped."""
    return render_tokens(parse_markdown(text))


def render_answer(text: str) -> str:
    """Render an assistant's finished answer (untrusted Markdown) to sanitized HTML."""
    tokens = _ANSWER_PARSER.parse(text)
    _mark_external_links(tokens)
    _table_alignment_as_attribute(tokens)
    return _sanitize(_ANSWER_PARSER.renderer.render(tokens, _ANSWER_PARSER.options, {}))


def plain_text(text: str) -> str:
    """The readable text of a Markdown fragment: no markup, one block per paragraph."""
    blocks: list[str] = []
    # A table reads best as one block with a line per row and cells split by " | ".
    row: list[str] | None = None
    table: list[str] | None = None
    for token in _ANSWER_PARSER.parse(text):
        if token.type == "table_open":
            table = []
        elif token.type == "tr_open":
            row = []
        elif token.type == "inline" and row is not None:
            row.append(_inline_text(token.children or []))
        elif token.type == "tr_close" and row is not None and table is not None:
            table.append(" | ".join(row))
            row = None
        elif token.type == "table_close" and table is not None:
            blocks.append("\n".join(table))
            table = None
        elif token.type == "inline":
            blocks.append(_inline_text(token.children or []))
        elif token.type in ("fence", "code_block"):
            blocks.append(token.content.rstrip("\n"))
    return "\n\n".join(block for block in blocks if block)


def _inline_text(children: Sequence[Token]) -> str:
    parts: list[str] = []
    for child in children:
        if child.type in ("text", "code_inline", "html_inline"):
            parts.append(child.content)
        elif child.type == "softbreak":
            parts.append(" ")
        elif child.type == "hardbreak":
            parts.append("\n")
        elif child.type == "image":
            parts.append(_inline_text(child.children or []))
    return "".join(parts).strip()
