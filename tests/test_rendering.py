"""Markdown rendering: sanitized HTML for posts and for the assistant's answers."""

from __future__ import annotations

from collections.abc import Callable
from html.parser import HTMLParser

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blogchat.rendering import (
    EXTERNAL_LINK_REL,
    HIGHLIGHT_CLASSES,
    MAX_HIGHLIGHT_CHARS,
    heading_anchor,
    highlight,
    plain_text,
    render_answer,
    render_markdown,
)

Renderer = Callable[[str], str]
RENDERERS = pytest.mark.parametrize("render", [render_markdown, render_answer])

ALLOWED_SCHEMES = ("http:", "https:", "mailto:")


class _Elements(HTMLParser):
    """Every start tag in a fragment with its attributes."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {name: value or "" for name, value in attrs}))


def elements(html: str) -> list[tuple[str, dict[str, str]]]:
    parser = _Elements()
    parser.feed(html)
    parser.close()
    return parser.elements


def assert_inert(html: str) -> None:
    """No element or attribute in `html` can run script or restyle the page."""
    assert "<script" not in html.lower()
    for tag, attrs in elements(html):
        assert tag not in {"script", "style", "iframe", "object", "embed", "form", "svg", "math"}
        for name, value in attrs.items():
            assert not name.startswith("on"), (tag, name)
            assert name != "style", tag
            if name in {"href", "src"}:
                url = "".join(value.split()).lower()
                assert ":" not in url.split("/")[0] or url.startswith(ALLOWED_SCHEMES), url


@RENDERERS
@pytest.mark.parametrize(
    "source",
    [
        "<script>alert(1)</script>",
        "<img src=x onerror=alert(1)>",
        '<a href="javascript:alert(1)">x</a>',
        "[x](javascript:alert(1))",
        "[x](JaVaScRiPt:alert(1))",
        "[x](java\tscript:alert(1))",
        "![x](javascript:alert(1))",
        "[x](data:text/html;base64,PHNjcmlwdD4=)",
        "![x](data:image/png;base64,iVBORw0KGgo=)",
        '<div style="position:fixed">x</div>',
        "<style>body{display:none}</style>",
        "<iframe src=https://evil.example></iframe>",
        "<svg onload=alert(1)>",
        '[x](https://ok.example "title" onmouseover=alert(1))',
        "```js\n</code><script>alert(1)</script>\n```",
        '```python" onclick="alert(1)\ncode\n```',
        "<!-- <script>alert(1)</script> -->",
        "<<script>script>alert(1)<</script>/script>",
    ],
)
def test_raw_html_and_dangerous_urls_come_out_inert(render: Renderer, source: str) -> None:
    assert_inert(render(source))


@RENDERERS
def test_raw_html_is_shown_as_text(render: Renderer) -> None:
    html = render("Use <b>bold</b> and <script>alert(1)</script>.")
    assert html == (
        "<p>Use &lt;b&gt;bold&lt;/b&gt; and &lt;script&gt;alert(1)&lt;/script&gt;.</p>\n"
    )


@RENDERERS
def test_external_links_get_rel_and_local_ones_do_not(render: Renderer) -> None:
    html = render(
        "[a](https://example.org/x) [b](//example.org) [c](/posts/x#part) "
        "[d](#part) [e](mailto:me@example.org) [f](ftp://example.org)"
    )
    links = [attrs for tag, attrs in elements(html) if tag == "a"]
    assert links == [
        {"href": "https://example.org/x", "rel": EXTERNAL_LINK_REL},
        {"href": "//example.org", "rel": EXTERNAL_LINK_REL},
        {"href": "/posts/x#part"},
        {"href": "#part"},
        {"href": "mailto:me@example.org"},
        {},
    ]


def test_post_headings_get_anchor_ids_only_at_levels_two_and_three() -> None:
    html = render_markdown("# One\n\n## Two words\n\n### Three?\n\n#### Four\n\n## Two words\n")
    assert html == (
        "<h1>One</h1>\n"
        '<h2 id="two-words">Two words</h2>\n'
        '<h3 id="three">Three?</h3>\n'
        "<h4>Four</h4>\n"
        '<h2 id="two-words-1">Two words</h2>\n'
    )


def test_heading_anchor_is_never_empty() -> None:
    assert heading_anchor("What's *new*?") == "whats-new"
    assert heading_anchor("🎉!") == "section"


@RENDERERS
def test_tables_keep_their_alignment_without_style(render: Renderer) -> None:
    html = render("| a | b | c |\n|:--|:-:|--:|\n| 1 | 2 | 3 |\n")
    cells = [(tag, attrs) for tag, attrs in elements(html) if tag in {"th", "td"}]
    aligns = ["left", "center", "right"]
    assert cells == [("th", {"align": a}) for a in aligns] + [("td", {"align": a}) for a in aligns]


def test_code_blocks_keep_their_language_and_escape_their_content() -> None:
    html = render_markdown("```python\nif a < b:\n    print('<b>')\n```\n\n    indented <i>\n")
    assert html == (
        '<pre><code class="language-python">if a &lt; b:\n'
        "    print('&lt;b&gt;')\n</code></pre>\n"
        "<pre><code>indented &lt;i&gt;\n</code></pre>\n"
    )


def test_fenced_code_in_an_answer_is_highlighted_with_pygments_classes_only() -> None:
    html = render_answer("```python\nif a < b:\n    print('<b>')  # hi\n```\n\n    indented <i>\n")
    assert html == (
        '<pre><code class="language-python"><span class="k">if</span> '
        '<span class="n">a</span> <span class="o">&lt;</span> <span class="n">b</span>'
        '<span class="p">:</span>\n    <span class="nb">print</span><span class="p">(</span>'
        '<span class="s1">\'&lt;b&gt;\'</span><span class="p">)</span>  '
        '<span class="c1"># hi</span>\n</code></pre>\n'
        "<pre><code>indented &lt;i&gt;\n</code></pre>\n"
    )
    for tag, attrs in elements(html):
        assert tag != "span" or attrs["class"] in HIGHLIGHT_CLASSES


def test_code_in_an_unknown_language_keeps_its_class_and_stays_plain() -> None:
    html = render_answer("```no-such-language\na < b\n```\n")
    assert html == '<pre><code class="language-no-such-language">a &lt; b\n</code></pre>\n'


def test_spans_written_in_an_answer_are_text_not_markup() -> None:
    html = render_answer('<span class="k">x</span> and <span class="evil">y</span>')
    assert "span" not in [tag for tag, _ in elements(html)]


@settings(max_examples=200)
@given(
    code=st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=200),
    language=st.sampled_from(["python", "js", "bash", "sql", "json", "html", "rust", "nope", ""]),
)
def test_highlighted_pieces_join_back_to_the_code_exactly(code: str, language: str) -> None:
    pieces = highlight(code, language)
    assert "".join(text for _, text in pieces) == code
    assert all(css == "" or css in HIGHLIGHT_CLASSES for css, _ in pieces)
    assert all(text for _, text in pieces), "no empty pieces"


def test_code_too_long_to_lex_is_one_plain_piece() -> None:
    code = "x = 1\n" * (MAX_HIGHLIGHT_CHARS // 6 + 1)
    assert highlight(code, "python") == [("", code)]


@RENDERERS
def test_lists_quotes_emphasis_and_strikethrough(render: Renderer) -> None:
    html = render("> *quoted* **strong** ~~gone~~ `code`\n\n3. three\n4. four\n\n- x\n")
    assert html == (
        "<blockquote>\n<p><em>quoted</em> <strong>strong</strong> <s>gone</s> "
        "<code>code</code></p>\n</blockquote>\n"
        '<ol start="3">\n<li>three</li>\n<li>four</li>\n</ol>\n<ul>\n<li>x</li>\n</ul>\n'
    )


def test_posts_show_images() -> None:
    html = render_markdown('![A map](/static/map.png "The loop")')
    assert elements(html) == [
        ("p", {}),
        ("img", {"src": "/static/map.png", "alt": "A map", "title": "The loop"}),
    ]


def test_answers_link_to_images_instead_of_loading_them() -> None:
    html = render_answer("![a <b> chart](https://tracker.example/p.png?q=1&r=2)")
    assert elements(html) == [
        ("p", {}),
        ("a", {"href": "https://tracker.example/p.png?q=1&r=2", "rel": EXTERNAL_LINK_REL}),
    ]
    assert "a &lt;b&gt; chart</a>" in html


def test_answers_get_no_heading_ids() -> None:
    assert render_answer("## Summary\n") == "<h2>Summary</h2>\n"


def test_plain_text_drops_markup_but_keeps_words_and_code() -> None:
    source = (
        "Some *emphasis*, a [link](https://x.example) and `code`.\n"
        "Same paragraph.\n\n"
        "- one\n- two\n\n"
        "| a | b |\n|---|---|\n| 1 | 2 |\n\n"
        "```\nx = 1\n```\n"
    )
    assert plain_text(source) == (
        "Some emphasis, a link and code. Same paragraph.\n\none\n\ntwo\n\na | b\n1 | 2\n\nx = 1"
    )


_FRAGMENTS = st.sampled_from(
    [
        "<script>",
        "</script>",
        "<img src=x onerror=alert(1)>",
        "javascript:alert(1)",
        "[x](",
        "](",
        ")",
        "![",
        '"',
        "'",
        "<",
        ">",
        "&",
        "`",
        "```",
        "\n",
        "\n\n",
        "## ",
        "| a |\n|---|\n",
        "style=",
        " onload=",
        "data:text/html,",
        "<a href=",
        "\t",
        "&#106;avascript:",
        "%6a",
    ]
)
_MARKDOWNISH = st.lists(st.one_of(_FRAGMENTS, st.text(max_size=8)), max_size=30).map("".join)


@RENDERERS
@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(source=st.one_of(st.text(), _MARKDOWNISH))
def test_no_input_yields_script_event_handlers_styles_or_script_urls(
    render: Renderer, source: str
) -> None:
    assert_inert(render(source))
