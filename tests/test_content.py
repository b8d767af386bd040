"""Loading and validating the blog's content: authors.yaml and posts/*.md."""

from __future__ import annotations

import datetime as dt
import textwrap
from collections.abc import Mapping
from pathlib import Path

import pytest

from blogchat.content import Author, Blog, ContentError, Link, Section

REAL_CONTENT = Path(__file__).resolve().parents[1] / "content"

AUTHORS = """\
ada:
  name: Ada Byron
  bio: Writes about engines.
  links:
    - label: Website
      url: https://ada.example.org
bo:
  name: Bo Lindgren
  bio: Writes about bread.
"""

FRONT_MATTER = {
    "title": "A post",
    "slug": "a-post",
    "date": "2025-03-01",
    "author": "ada",
    "tags": "[engines, history]",
    "summary": "What the post is about.",
}

BODY = """\
The intro paragraph.

## First part

Some text.
"""


def write_post(
    content: Path,
    name: str = "a-post",
    body: str = BODY,
    *,
    drop: tuple[str, ...] = (),
    fields: Mapping[str, str] | None = None,
    **overrides: str,
) -> Path:
    """Write posts/<name>.md from FRONT_MATTER, with raw YAML values from fields/overrides."""
    values = {**FRONT_MATTER, "slug": name, **(fields or {}), **overrides}
    lines = [f"{key}: {value}" for key, value in values.items() if key not in drop]
    path = content / "posts" / f"{name}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("---\n" + "\n".join(lines) + "\n---\n\n" + body, encoding="utf-8")
    return path


@pytest.fixture
def content(tmp_path: Path) -> Path:
    (tmp_path / "authors.yaml").write_text(AUTHORS, encoding="utf-8")
    (tmp_path / "posts").mkdir()
    return tmp_path


def load_error(content: Path) -> str:
    with pytest.raises(ContentError) as caught:
        Blog.load(content)
    return str(caught.value)


def test_the_real_content_dir_loads_consistently() -> None:
    blog = Blog.load(REAL_CONTENT)
    assert blog.posts
    assert [p.date for p in blog.posts] == sorted((p.date for p in blog.posts), reverse=True)
    for post in blog.posts:
        assert (REAL_CONTENT / "posts" / f"{post.slug}.md").is_file()
        assert post.author is blog.authors[post.author.id]
        assert post.sections
        for section in post.sections:
            if section.heading is not None:
                assert f'id="{section.anchor}"' in post.html


def test_a_post_carries_its_front_matter_author_and_rendered_body(content: Path) -> None:
    write_post(content)
    post = Blog.load(content).posts[0]
    assert post.slug == "a-post"
    assert post.title == "A post"
    assert post.date == dt.date(2025, 3, 1)
    assert post.author == Author(
        id="ada",
        name="Ada Byron",
        bio="Writes about engines.",
        links=(Link(label="Website", url="https://ada.example.org"),),
    )
    assert post.tags == ("engines", "history")
    assert post.summary == "What the post is about."
    assert post.body == BODY.strip()
    assert post.url == "/posts/a-post"
    assert post.reading_minutes == 1
    assert '<h2 id="first-part">First part</h2>' in post.html


def test_reading_minutes_grow_with_the_length_of_the_body(content: Path) -> None:
    write_post(content, body="word " * 1000)
    assert Blog.load(content).posts[0].reading_minutes == 5


def test_sections_split_at_h2_and_h3_and_keep_blocks_whole(content: Path) -> None:
    body = textwrap.dedent(
        """\
        Intro one.

        Intro two,
        on two lines.

        ## Kit: what to *bring*

        You need:

        - a tent
        - a stove

          with fuel

        | item | grams |
        |------|------:|
        | tent | 900   |

        #### A minor heading stays inside

        ```python
        print("hi")

        print("bye")
        ```

        ### Details

        > A quote.

        ## Kit: what to *bring*

        Again.
        """
    )
    write_post(content, body=body)
    intro, kit, details, again = Blog.load(content).posts[0].sections
    assert intro == Section(
        anchor="",
        heading=None,
        level=1,
        text="Intro one.\n\nIntro two,\non two lines.",
        paragraphs=("Intro one.", "Intro two,\non two lines."),
    )
    assert (kit.anchor, kit.heading, kit.level) == ("kit-what-to-bring", "Kit: what to bring", 2)
    assert kit.paragraphs == (
        "You need:",
        "- a tent\n- a stove\n\n  with fuel",
        "| item | grams |\n|------|------:|\n| tent | 900   |",
        "#### A minor heading stays inside",
        '```python\nprint("hi")\n\nprint("bye")\n```',
    )
    assert kit.text == "\n\n".join(kit.paragraphs)
    assert (details.anchor, details.level, details.paragraphs) == ("details", 3, ("> A quote.",))
    # The same heading twice gets distinct anchors, the same ones the HTML uses.
    assert again.anchor == "kit-what-to-bring-1"


def test_section_anchors_are_the_ids_of_the_rendered_headings(content: Path) -> None:
    body = "## Same\n\nx\n\n## Same\n\ny\n\n### 🎉\n\nz\n\n## Café & crème\n\nw\n"
    write_post(content, body=body)
    post = Blog.load(content).posts[0]
    anchors = [section.anchor for section in post.sections]
    assert anchors == ["same", "same-1", "section", "café--crème"]
    for anchor in anchors:
        assert f'id="{anchor}"' in post.html


def test_a_body_starting_with_a_heading_has_no_intro_section(content: Path) -> None:
    write_post(content, body="## Only\n\nText.\n")
    (section,) = Blog.load(content).posts[0].sections
    assert section.heading == "Only"


def test_blog_lookups_by_slug_tag_and_author(content: Path) -> None:
    write_post(content, "old", date="2024-01-01", tags="[bread]", author="bo")
    write_post(content, "new", date="2025-06-01", tags="[bread, engines]")
    write_post(content, "mid", date="2025-01-01", tags="[engines]")
    blog = Blog.load(content)
    assert [post.slug for post in blog.posts] == ["new", "mid", "old"]
    assert blog.post("mid") is blog.posts[1]
    assert blog.post("missing") is None
    assert [post.slug for post in blog.posts_tagged("bread")] == ["new", "old"]
    assert blog.posts_tagged("nothing") == ()
    assert [post.slug for post in blog.posts_by("ada")] == ["new", "mid"]
    assert blog.author("bo") == blog.authors["bo"]
    assert blog.author("nobody") is None
    assert list(blog.tag_counts.items()) == [("bread", 2), ("engines", 2)]


def test_an_empty_posts_dir_is_an_empty_blog(content: Path) -> None:
    blog = Blog.load(content)
    assert blog.posts == ()
    assert set(blog.authors) == {"ada", "bo"}


def test_a_bad_date_names_the_file_and_the_field(content: Path) -> None:
    path = write_post(content, date="tomorrow")
    assert load_error(content) == f"{path}: front matter field 'date': invalid date 'tomorrow'"


@pytest.mark.parametrize("field", sorted(FRONT_MATTER))
def test_a_missing_field_names_the_file_and_the_field(content: Path, field: str) -> None:
    path = write_post(content, drop=(field,))
    assert load_error(content) == f"{path}: front matter field '{field}': missing"


@pytest.mark.parametrize(
    ("fields", "field", "problem"),
    [
        ({"date": "2025-02-30"}, "date", "invalid date '2025-02-30'"),
        ({"date": "1700000000"}, "date", "invalid date 1700000000"),
        ({"date": "2025-03-01 10:00:00"}, "date", "invalid date"),
        ({"title": "1984"}, "title", "valid string"),
        ({"title": '""'}, "title", "at least 1 character"),
        ({"tags": "engines"}, "tags", "valid list"),
        ({"tags": "[Engines]"}, "tags.0", "lowercase"),
        ({"tags": "[a, a]"}, "tags", "repeated tag 'a'"),
        ({"summary": "[1, 2]"}, "summary", "valid string"),
        ({"tittle": "Typo"}, "tittle", "unknown field"),
        ({"author": "nobody"}, "author", "unknown author 'nobody'"),
    ],
)
def test_a_wrong_field_names_the_file_and_the_field(
    content: Path, fields: dict[str, str], field: str, problem: str
) -> None:
    path = write_post(content, fields=fields)
    message = load_error(content)
    assert message.startswith(f"{path}: front matter field '{field}': ")
    assert problem in message


def test_a_slug_that_differs_from_the_file_name_is_refused(content: Path) -> None:
    path = write_post(content, "a-post", slug="another-post")
    message = load_error(content)
    assert message.startswith(f"{path}: front matter field 'slug': 'another-post'")
    assert "a-post" in message


def test_a_malformed_slug_is_refused(content: Path) -> None:
    path = write_post(content, "a-post", slug="A_Post")
    assert load_error(content).startswith(f"{path}: front matter field 'slug': invalid slug")


def test_a_duplicate_slug_names_both_files(content: Path) -> None:
    first = write_post(content, "a-post")
    copy = write_post(content, "b-copy", slug="a-post")
    message = load_error(content)
    assert message.startswith(f"{copy}: front matter field 'slug': duplicate slug 'a-post'")
    assert str(first) in message


def test_unparseable_front_matter_names_the_file_and_the_line(content: Path) -> None:
    path = write_post(content, summary="[unclosed")
    message = load_error(content)
    assert message.startswith(f"{path}: front matter is not valid YAML at line ")


def test_front_matter_that_is_not_a_mapping_is_refused(content: Path) -> None:
    path = content / "posts" / "a-post.md"
    path.write_text("---\n- a list\n---\n\nBody.\n", encoding="utf-8")
    assert load_error(content).startswith(f"{path}: front matter must be a mapping")


def test_a_post_without_front_matter_is_refused(content: Path) -> None:
    path = content / "posts" / "a-post.md"
    path.write_text("# Just Markdown\n", encoding="utf-8")
    assert load_error(content).startswith(f"{path}: no front matter")


def test_a_post_without_a_body_is_refused(content: Path) -> None:
    path = write_post(content, body="\n\n")
    assert load_error(content).startswith(f"{path}: body:")


@pytest.mark.parametrize(
    ("authors", "expected"),
    [
        ("ada:\n  bio: No name.\n", "author 'ada' field 'name': missing"),
        (
            "ada:\n  name: Ada\n  bio: B.\n"
            "  links:\n    - label: X\n      url: javascript:alert(1)\n",
            "author 'ada' field 'links.0.url': must start with",
        ),
        ("ada:\n  name: Ada\n  bio: B.\n  email: a@b.c\n", "author 'ada' field 'email': unknown"),
        ("Ada Byron:\n  name: Ada\n  bio: B.\n", "author id 'Ada Byron': invalid slug"),
        ("- ada\n", "expected a mapping of author id to author"),
        ("ada: [unclosed\n", "authors file is not valid YAML at line 2"),
    ],
)
def test_broken_authors_name_the_file_and_the_field(
    content: Path, authors: str, expected: str
) -> None:
    path = content / "authors.yaml"
    path.write_text(authors, encoding="utf-8")
    message = load_error(content)
    assert message.startswith(f"{path}: ")
    assert expected in message


def test_a_post_that_is_not_utf8_is_refused(content: Path) -> None:
    path = content / "posts" / "a-post.md"
    path.write_bytes(b"---\ntitle: caf\xe9\n---\n")
    assert load_error(content).startswith(f"{path}: not UTF-8 text")


def test_a_missing_authors_file_is_a_content_error(tmp_path: Path) -> None:
    (tmp_path / "posts").mkdir()
    assert load_error(tmp_path).startswith(f"{tmp_path / 'authors.yaml'}: cannot read")
