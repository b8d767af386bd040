"""The blog's content: authors and posts loaded and validated from Markdown files."""

from __future__ import annotations

import datetime as dt
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Final

import yaml
from markdown_it.token import Token
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    StringConstraints,
    TypeAdapter,
    ValidationError,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from blogchat.rendering import parse_markdown, render_tokens

__all__ = ["Author", "Blog", "ContentError", "Link", "Post", "Section"]

AUTHORS_FILE: Final = "authors.yaml"
POSTS_DIR: Final = "posts"
WORDS_PER_MINUTE: Final = 230

_SLUG = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
_FRONT_MATTER = re.compile(
    r"\A---[ \t]*\r?\n(?P<yaml>.*?)^(?:---|\.\.\.)[ \t]*(?:\r?\n|\Z)", re.DOTALL | re.MULTILINE
)
_WORD = re.compile(r"\w+")
# libyaml's loader is several times faster than the pure-Python one, when it is built in.
_BaseLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _YamlLoader(_BaseLoader):  # type: ignore[valid-type,misc]
    """A safe loader that leaves dates as text, so the date check can name the field."""


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in _BaseLoader.yaml_implicit_resolvers.items()
}


class ContentError(Exception):
    """Broken content; the message names the file and the field at fault."""


@dataclass(frozen=True, slots=True)
class Link:
    """A link on an author's profile."""

    label: str
    url: str


@dataclass(frozen=True, slots=True)
class Author:
    """Someone who writes for the blog."""

    id: str
    name: str
    bio: str
    links: tuple[Link, ...]

    @property
    def url(self) -> str:
        """The author's page on the blog."""
        return f"/authors/{self.id}"


@dataclass(frozen=True, slots=True)
class Section:
    """A part of a post: the intro (no heading) or a `##`/`###` heading and its blocks."""

    anchor: str
    """The heading's HTML id; "" for the intro."""
    heading: str | None
    level: int
    """2 or 3 for headed sections, 1 for the intro."""
    text: str
    """The section's Markdown source, without its heading line."""
    paragraphs: tuple[str, ...]
    """The section's blocks (paragraphs, whole lists, tables, code blocks) as Markdown."""


@dataclass(frozen=True, slots=True)
class Post:
    """A published post."""

    slug: str
    title: str
    date: dt.date
    author: Author
    tags: tuple[str, ...]
    summary: str
    body: str
    html: str
    sections: tuple[Section, ...]
    reading_minutes: int

    @property
    def url(self) -> str:
        """The post's page on the blog."""
        return f"/posts/{self.slug}"


class Blog:
    """All posts (newest first) and authors, with lookups by slug, tag and author."""

    def __init__(self, posts: Iterable[Post], authors: Mapping[str, Author]) -> None:
        self.posts: tuple[Post, ...] = tuple(
            sorted(posts, key=lambda post: (post.date, post.slug), reverse=True)
        )
        self.authors: Mapping[str, Author] = MappingProxyType(dict(authors))
        self._by_slug = {post.slug: post for post in self.posts}
        counts = Counter(tag for post in self.posts for tag in post.tags)
        self.tag_counts: Mapping[str, int] = MappingProxyType(
            dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))
        )
        """Every tag in use with its number of posts, most used first."""

    @classmethod
    def load(cls, content_dir: Path) -> Blog:
        """Load and validate `authors.yaml` and `posts/*.md`; raises `ContentError`."""
        authors = _load_authors(content_dir / AUTHORS_FILE)
        paths = sorted(
            path for path in (content_dir / POSTS_DIR).glob("*.md") if not path.name.startswith(".")
        )
        drafts = [_read_post(path, authors) for path in paths]
        _check_slugs(drafts)
        return cls((draft.post for draft in drafts), authors)

    def post(self, slug: str) -> Post | None:
        """The post with this slug, if any."""
        return self._by_slug.get(slug)

    def author(self, author_id: str) -> Author | None:
        """The author with this id, if any."""
        return self.authors.get(author_id)

    def posts_tagged(self, tag: str) -> tuple[Post, ...]:
        """Posts carrying this tag, newest first."""
        return tuple(post for post in self.posts if tag in post.tags)

    def posts_by(self, author_id: str) -> tuple[Post, ...]:
        """Posts written by this author, newest first."""
        return tuple(post for post in self.posts if post.author.id == author_id)


# --- validation of the YAML -------------------------------------------------------------

_Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


def _check_url(url: str) -> str:
    if not url.startswith(("https://", "http://", "mailto:")):
        raise PydanticCustomError("url", "must start with https://, http:// or mailto:")
    return url


def _check_tag(tag: str) -> str:
    if tag != tag.lower() or tag != tag.strip() or not tag:
        raise PydanticCustomError("tag", "tags must be lowercase, got {tag}", {"tag": repr(tag)})
    return tag


def _check_tags(tags: list[str]) -> list[str]:
    repeated = sorted(tag for tag, count in Counter(tags).items() if count > 1)
    if repeated:
        raise PydanticCustomError("tags", "repeated tag {tag}", {"tag": repr(repeated[0])})
    return tags


def _check_slug(slug: str) -> str:
    if not _SLUG.match(slug):
        raise PydanticCustomError(
            "slug", "invalid slug {slug}: use lowercase words joined by '-'", {"slug": repr(slug)}
        )
    return slug


def _parse_date(value: object) -> object:
    # Numbers and timestamps with a time are refused rather than guessed at.
    if isinstance(value, str):
        try:
            return dt.date.fromisoformat(value.strip())
        except ValueError:
            pass
    raise PydanticCustomError("date", "invalid date {value}", {"value": repr(value)})


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _LinkModel(_Model):
    label: _Text
    url: Annotated[_Text, AfterValidator(_check_url)]


class _AuthorModel(_Model):
    name: _Text
    bio: _Text
    links: list[_LinkModel] = []


class _FrontMatter(_Model):
    title: _Text
    slug: Annotated[str, AfterValidator(_check_slug)]
    date: Annotated[dt.date, BeforeValidator(_parse_date)]
    author: _Text
    tags: Annotated[list[Annotated[str, AfterValidator(_check_tag)]], AfterValidator(_check_tags)]
    summary: _Text


_AUTHORS = TypeAdapter(dict[Annotated[str, AfterValidator(_check_slug)], _AuthorModel])


def _describe(error: ErrorDetails) -> str:
    if error["type"] == "missing":
        return "missing"
    if error["type"] == "extra_forbidden":
        return "unknown field"
    if error["type"] in ("date", "tag", "tags", "slug", "url"):
        return error["msg"]
    message = error["msg"]
    return f"{message[:1].lower()}{message[1:]} (got {error['input']!r})"


def _field(loc: Sequence[int | str]) -> str:
    return ".".join(str(part) for part in loc)


def _read_yaml(path: Path, text: str, what: str, first_line: int = 1) -> Any:
    try:
        return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a safe loader
    except (yaml.YAMLError, ValueError) as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + first_line}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ContentError(f"{path}: {what} is not valid YAML{where}: {problem}") from None


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as error:
        raise ContentError(f"{path}: cannot read {what}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise ContentError(f"{path}: not UTF-8 text (byte {error.start})") from None


def _load_authors(path: Path) -> dict[str, Author]:
    text = _read_text(path, "authors")
    raw = _read_yaml(path, text, "authors file")
    if not isinstance(raw, dict):
        raise ContentError(f"{path}: expected a mapping of author id to author")
    try:
        models = _AUTHORS.validate_python(raw)
    except ValidationError as error:
        first = error.errors()[0]
        author_id, *field = first["loc"]
        if not field or first["type"] == "slug":
            raise ContentError(f"{path}: author id {author_id!r}: {_describe(first)}") from None
        raise ContentError(
            f"{path}: author {author_id!r} field '{_field(field)}': {_describe(first)}"
        ) from None
    return {
        author_id: Author(
            id=author_id,
            name=model.name,
            bio=model.bio,
            links=tuple(Link(label=link.label, url=link.url) for link in model.links),
        )
        for author_id, model in models.items()
    }


# --- posts --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Draft:
    path: Path
    post: Post


def _read_post(path: Path, authors: Mapping[str, Author]) -> _Draft:
    text = _read_text(path, "post").removeprefix("\ufeff")
    match = _FRONT_MATTER.match(text)
    if match is None:
        raise ContentError(f"{path}: no front matter: the file must start with a '---' line")
    raw = _read_yaml(path, match["yaml"], "front matter", first_line=2)
    if not isinstance(raw, dict):
        raise ContentError(f"{path}: front matter must be a mapping of field: value")
    try:
        meta = _FrontMatter.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        raise ContentError(
            f"{path}: front matter field '{_field(first['loc'])}': {_describe(first)}"
        ) from None
    author = authors.get(meta.author)
    if author is None:
        known = ", ".join(sorted(authors))
        raise ContentError(
            f"{path}: front matter field 'author': unknown author {meta.author!r}"
            f" (authors.yaml has: {known})"
        )
    body = text[match.end() :].strip("\n")
    if not body.strip():
        raise ContentError(f"{path}: body: the post has no text after its front matter")
    tokens = parse_markdown(body)
    post = Post(
        slug=meta.slug,
        title=meta.title,
        date=meta.date,
        author=author,
        tags=tuple(meta.tags),
        summary=meta.summary,
        body=body,
        html=render_tokens(tokens),
        sections=_sections(body, tokens),
        reading_minutes=max(1, math.ceil(len(_WORD.findall(body)) / WORDS_PER_MINUTE)),
    )
    return _Draft(path=path, post=post)


def _check_slugs(drafts: Sequence[_Draft]) -> None:
    # Duplicates are checked before file names so that a copied post whose slug was not
    # updated is reported as what it is, naming both files.
    owners: dict[str, Path] = {}
    for draft in drafts:
        other = owners.setdefault(draft.post.slug, draft.path)
        if other != draft.path:
            raise ContentError(
                f"{draft.path}: front matter field 'slug': duplicate slug"
                f" {draft.post.slug!r}, also used by {other}"
            )
    for draft in drafts:
        if draft.post.slug != draft.path.stem:
            raise ContentError(
                f"{draft.path}: front matter field 'slug': {draft.post.slug!r} does not"
                f" match the file name (expected {draft.path.stem!r})"
            )


def _sections(body: str, tokens: Sequence[Token]) -> tuple[Section, ...]:
    lines = body.splitlines()

    def source(start: int, end: int) -> str:
        return "\n".join(lines[start:end]).strip("\n")

    sections: list[Section] = []
    anchor, heading, level = "", None, 1
    blocks: list[tuple[int, int]] = []

    def close() -> None:
        # An intro with no text is no section at all; an empty headed section still is,
        # since its heading is content (e.g. a `##` directly followed by a `###`).
        if heading is None and not blocks:
            return
        text = source(blocks[0][0], blocks[-1][1]) if blocks else ""
        paragraphs = tuple(source(start, end) for start, end in blocks)
        sections.append(Section(anchor, heading, level, text, paragraphs))

    for index, token in enumerate(tokens):
        if token.level != 0 or token.nesting == -1 or token.map is None:
            continue
        start, end = token.map
        if token.type == "heading_open" and token.tag in ("h2", "h3"):
            close()
            inline = tokens[index + 1]
            anchor = str(token.attrGet("id") or "")
            heading = "".join(
                child.content
                for child in inline.children or []
                if child.type in ("text", "code_inline")
            ).strip()
            level = int(token.tag[1])
            blocks = []
        elif token.type != "hr":
            blocks.append((start, end))
    close()
    return tuple(sections)
