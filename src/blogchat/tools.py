"""The blog tools the assistant uses, shared by every engine.

Each tool has a name, a description written for the model, a JSON Schema for its input
(from a Pydantic model), and a function that returns text (JSON) for the model to read.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from blogchat.content import Author, Blog, Post
from blogchat.search import SearchIndex

MAX_RESULT_CHARS = 60_000


class ToolInputError(Exception):
    """The model called a tool with input it cannot use; the message tells it why."""


@dataclass(frozen=True)
class ToolResult:
    """What a tool returns: text for the model, and whether it is an error."""

    output: str
    is_error: bool = False


@dataclass(frozen=True)
class BlogTool:
    """A tool the assistant can call."""

    name: str
    description: str
    input_model: type[BaseModel]
    run: Callable[[Any], object]

    @property
    def input_schema(self) -> dict[str, Any]:
        """JSON Schema of the tool's input."""
        schema = self.input_model.model_json_schema()
        schema.pop("title", None)
        return schema

    def call(self, arguments: Mapping[str, Any]) -> ToolResult:
        """Validate the input and run the tool; bad input becomes an error result."""
        try:
            parsed = self.input_model.model_validate(dict(arguments))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in error['loc']) or 'input'}: {error['msg']}"
                for error in exc.errors(include_url=False)
            )
            return ToolResult(f"Invalid input for {self.name}: {problems}", is_error=True)
        try:
            value = self.run(parsed)
        except ToolInputError as exc:
            return ToolResult(str(exc), is_error=True)
        text = json.dumps(value, ensure_ascii=False, indent=1, default=str)
        if len(text) > MAX_RESULT_CHARS:
            text = text[:MAX_RESULT_CHARS] + "\n[truncated]"
        return ToolResult(text)


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SearchInput(_Input):
    """Input of searchBlogContent."""

    query: Annotated[str, StringConstraints(min_length=1, max_length=300)] = Field(
        description="What to look for, in plain words (e.g. 'sourdough starter temperature')."
    )
    limit: int = Field(default=5, ge=1, le=10, description="How many results (1-10).")


class DateTimeInput(_Input):
    """Input of getCurrentDateTime."""

    timezone: str = Field(
        default="UTC", description="An IANA time zone such as 'Europe/Lisbon'. Default UTC."
    )


class AuthorInput(_Input):
    """Input of getAuthorInfo."""

    author: Annotated[str, StringConstraints(min_length=1, max_length=100)] = Field(
        description="The author's id (e.g. 'mara-lindqvist') or name (e.g. 'Mara Lindqvist')."
    )


class ListPostsInput(_Input):
    """Input of listPosts."""

    tag: str | None = Field(default=None, description="Only posts with this tag.")
    author: str | None = Field(default=None, description="Only posts by this author (id/name).")
    limit: int = Field(default=20, ge=1, le=50, description="How many posts (1-50).")
    offset: int = Field(default=0, ge=0, description="Skip this many posts (for paging).")


class GetPostInput(_Input):
    """Input of getPost."""

    slug: Annotated[str, StringConstraints(min_length=1, max_length=200)] = Field(
        description="The post's slug, the last part of its URL (/posts/<slug>)."
    )


def _post_summary(post: Post) -> dict[str, object]:
    return {
        "title": post.title,
        "slug": post.slug,
        "url": post.url,
        "author": post.author.name,
        "date": post.date.isoformat(),
        "tags": list(post.tags),
        "summary": post.summary,
    }


class BlogTools:
    """The tools over one blog and its search index."""

    def __init__(
        self, blog: Blog, index: SearchIndex, clock: Callable[[ZoneInfo], datetime] | None = None
    ) -> None:
        self.blog = blog
        self.index = index
        self._clock = clock or (lambda zone: datetime.now(zone))
        tools = [
            BlogTool(
                "searchBlogContent",
                "Search the blog's posts. Returns the best-matching sections, ranked, each "
                "with the whole section or paragraph as its snippet, and the post's title, "
                "URL (with the section's anchor), author and date. Use it before answering "
                "any question about what the blog says, and cite the URLs you use.",
                SearchInput,
                self._search,
            ),
            BlogTool(
                "getCurrentDateTime",
                "The current date, time and weekday, in UTC or in a given IANA time zone. "
                "Use it for questions about today, or to tell how long ago a post was written.",
                DateTimeInput,
                self._now,
            ),
            BlogTool(
                "getAuthorInfo",
                "An author's profile: name, bio, links and their posts (newest first). "
                "Accepts the author's id or name. Lists the known authors if there is no match.",
                AuthorInput,
                self._author,
            ),
            BlogTool(
                "listPosts",
                "List posts newest first, with title, URL, author, date, tags and summary, "
                "optionally only those with a tag or by an author. Also returns every tag "
                "with its number of posts.",
                ListPostsInput,
                self._list,
            ),
            BlogTool(
                "getPost",
                "The full text (Markdown) of one post, with its title, author, date and tags. "
                "Use it when a reader asks about a specific post in depth.",
                GetPostInput,
                self._post,
            ),
        ]
        self.all: dict[str, BlogTool] = {tool.name: tool for tool in tools}

    @property
    def names(self) -> tuple[str, ...]:
        """Every tool name."""
        return tuple(self.all)

    def allowed(self, names: Collection[str]) -> list[BlogTool]:
        """The tools of a persona, in its order, skipping unknown names."""
        return [self.all[name] for name in names if name in self.all]

    def call(self, name: str, arguments: Mapping[str, Any], allowed: Collection[str]) -> ToolResult:
        """Run a tool by name, refusing any the persona does not allow."""
        if name not in allowed or name not in self.all:
            return ToolResult(f"The tool {name!r} is not available in this chat.", is_error=True)
        return self.all[name].call(arguments)

    # --- the tools ----------------------------------------------------------------------

    def _search(self, args: SearchInput) -> object:
        hits = self.index.search(args.query, limit=args.limit)
        return {
            "query": args.query,
            "results": [
                {
                    "title": hit.title,
                    "url": hit.url,
                    "author": hit.author_name,
                    "date": hit.date.isoformat(),
                    "section": hit.section_heading,
                    "snippet": hit.snippet,
                }
                for hit in hits
            ],
        }

    def _now(self, args: DateTimeInput) -> object:
        try:
            zone = ZoneInfo(args.timezone.strip() or "UTC")
        except (ZoneInfoNotFoundError, ValueError):
            raise ToolInputError(
                f"Unknown time zone {args.timezone!r}. Use an IANA name such as "
                "'Europe/London' or 'America/New_York', or 'UTC'."
            ) from None
        now = self._clock(zone)
        return {
            "iso": now.isoformat(timespec="seconds"),
            "date": now.date().isoformat(),
            "time": now.strftime("%H:%M"),
            "weekday": now.strftime("%A"),
            "timezone": args.timezone,
        }

    def _find_author(self, query: str) -> Author:
        wanted = query.strip().lower()
        for author in self.blog.authors.values():
            if wanted in (author.id, author.name.lower()):
                return author
        matches = [
            author
            for author in self.blog.authors.values()
            if wanted and (wanted in author.name.lower() or wanted in author.id)
        ]
        if len(matches) == 1:
            return matches[0]
        known = ", ".join(f"{a.name} ({a.id})" for a in self.blog.authors.values())
        raise ToolInputError(f"No author matches {query!r}. The authors are: {known}.")

    def _author(self, args: AuthorInput) -> object:
        author = self._find_author(args.author)
        return {
            "id": author.id,
            "name": author.name,
            "bio": author.bio,
            "url": author.url,
            "links": [{"label": link.label, "url": link.url} for link in author.links],
            "posts": [
                {"title": post.title, "url": post.url, "date": post.date.isoformat()}
                for post in self.blog.posts_by(author.id)
            ],
        }

    def _list(self, args: ListPostsInput) -> object:
        posts: Sequence[Post] = self.blog.posts
        if args.tag:
            tag = args.tag.strip().lower().lstrip("#")
            if tag not in self.blog.tag_counts:
                raise ToolInputError(
                    f"No post has the tag {args.tag!r}. Tags: {', '.join(self.blog.tag_counts)}."
                )
            posts = [post for post in posts if tag in post.tags]
        if args.author:
            author = self._find_author(args.author)
            posts = [post for post in posts if post.author.id == author.id]
        page = posts[args.offset : args.offset + args.limit]
        return {
            "total": len(posts),
            "posts": [_post_summary(post) for post in page],
            "tags": dict(self.blog.tag_counts),
        }

    def _post(self, args: GetPostInput) -> object:
        slug = args.slug.strip().strip("/").removeprefix("posts/")
        post = self.blog.post(slug)
        if post is None:
            raise ToolInputError(
                f"There is no post {args.slug!r}. Use listPosts or searchBlogContent to find "
                "the right slug."
            )
        return {**_post_summary(post), "body": post.body}
