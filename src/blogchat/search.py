"""Ranked full-text search over the blog's posts, section by section, in-memory (tantivy)."""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import tantivy

from blogchat.content import Blog, Post, Section

__all__ = ["SNIPPET_CHARS", "SearchHit", "SearchIndex"]

SNIPPET_CHARS: Final = 1200
"""A section up to this long is its own snippet; a longer one gives its best blocks up to this."""

# Post-level fields repeat on each section's document, so they lift every section of a post
# about the query; the section's own heading and text then decide which section comes first.
_FIELD_BOOSTS: Final = {
    "title": 3.0,
    "tags": 2.0,
    "summary": 1.0,
    "author": 1.0,
    "heading": 2.0,
    "body": 1.0,
}
_PHRASE_BOOST: Final = 2.0
_QUOTED_PHRASE_BOOST: Final = 4.0
# A second section of a post shows only when it is nearly as good as the first.
_SECOND_HIT_RATIO: Final = 0.5
_HITS_PER_POST: Final = 2
_MAX_LIMIT: Final = 50
_MAX_QUERY_CHARS: Final = 1000
_MAX_QUERY_TERMS: Final = 24
_TOKENIZER: Final = "blog_english"
_QUOTED: Final = re.compile(r'"([^"]+)"')
# Blocks a lead-in sentence ending in ":" introduces; such a block reads badly without it.
_INTRODUCED_BLOCK: Final = re.compile(r"^(?:[-*+] |\d+[.)] |\||```|~~~|>)")


@dataclass(frozen=True, slots=True)
class SearchHit:
    """One matching section of a post, with a snippet of whole blocks of its Markdown."""

    slug: str
    title: str
    url: str
    """The post's URL with the section's anchor, e.g. /posts/some-post#a-section."""
    author_id: str
    author_name: str
    date: dt.date
    section_heading: str | None
    """None when the match is in the post's intro."""
    snippet: str
    """Whole blocks of the section's Markdown: the section itself when it is short."""
    score: float
    """Relevance (BM25 with field boosts); comparable only within one search."""


@dataclass(frozen=True, slots=True)
class _Unit:
    post: Post
    section: Section


def _analyzer() -> tantivy.TextAnalyzer:
    # English stemming and stop words, plus accent folding so "cafe" finds "café".
    return (
        tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple())
        .filter(tantivy.Filter.remove_long(40))
        .filter(tantivy.Filter.lowercase())
        .filter(tantivy.Filter.ascii_fold())
        .filter(tantivy.Filter.stopword("english"))
        .filter(tantivy.Filter.stemmer("english"))
        .build()
    )


def _schema() -> tantivy.Schema:
    builder = tantivy.SchemaBuilder()
    for field in _FIELD_BOOSTS:
        builder.add_text_field(field, tokenizer_name=_TOKENIZER)
    builder.add_integer_field("unit", fast=True)
    return builder.build()


class SearchIndex:
    """An in-process index of every post section, built once at start-up."""

    def __init__(
        self, index: tantivy.Index, analyzer: tantivy.TextAnalyzer, units: Sequence[_Unit]
    ) -> None:
        self._index = index
        self._schema = index.schema
        self._searcher = index.searcher()
        self._analyzer = analyzer
        self._units = tuple(units)
        self._paragraph_terms: dict[int, tuple[frozenset[str], ...]] = {}

    @classmethod
    def build(cls, blog: Blog) -> SearchIndex:
        """Index every section of every post in `blog`."""
        analyzer = _analyzer()
        index = tantivy.Index(_schema())
        index.register_tokenizer(_TOKENIZER, analyzer)
        units: list[_Unit] = []
        # One indexing thread keeps the index in one segment, which is all this size needs.
        writer = index.writer(heap_size=64_000_000, num_threads=1)
        for post in blog.posts:
            post_fields = {
                "title": post.title,
                "tags": " ".join(post.tags),
                "summary": post.summary,
                "author": post.author.name,
            }
            for section in post.sections:
                if not section.paragraphs:
                    continue
                writer.add_document(
                    tantivy.Document(
                        **post_fields,
                        heading=section.heading or "",
                        body=section.text,
                        unit=len(units),
                    )
                )
                units.append(_Unit(post, section))
        writer.commit()
        writer.wait_merging_threads()
        index.reload()
        return cls(index, analyzer, units)

    def search(self, query: str, limit: int = 5) -> list[SearchHit]:
        """The best-matching sections for a reader's free-text query, best first.

        Every word counts; there is no query syntax, except that "quoted words" rank
        higher as a phrase. Never raises; a query with no searchable words gives [].
        """
        limit = min(limit, _MAX_LIMIT)
        # Lone surrogates (possible in a str decoded from JSON) cannot cross into Rust.
        query = query[:_MAX_QUERY_CHARS].encode("utf-8", "ignore").decode("utf-8")
        tokens = self._analyzer.pre_tokenize(query).tokens
        terms = list(dict.fromkeys(token.text for token in tokens))[:_MAX_QUERY_TERMS]
        if not terms or limit <= 0:
            return []
        tantivy_query = self._query(query, terms, tokens)
        ranked = self._ranked_units(tantivy_query, limit)
        weights = self._term_weights(terms)
        return [self._hit(unit_id, score, weights) for unit_id, score in ranked]

    def _query(
        self, query: str, terms: Sequence[str], tokens: Sequence[tantivy.Token]
    ) -> tantivy.Query:
        # Built from analyzed terms rather than parsed, so no input can be a syntax error.
        should = tantivy.Occur.Should
        clauses = [
            (
                should,
                tantivy.Query.boost_query(
                    tantivy.Query.term_query(self._schema, field, term), boost
                ),
            )
            for field, boost in _FIELD_BOOSTS.items()
            for term in terms
        ]
        # Quoted words must appear exactly so; the whole query only earns a bonus when its
        # words stand (nearly) together.
        phrases = [
            (self._analyzer.pre_tokenize(quoted).tokens, 0, _QUOTED_PHRASE_BOOST)
            for quoted in _QUOTED.findall(query)
        ] or [(list(tokens), 1, _PHRASE_BOOST)]
        for phrase, slop, boost in phrases:
            if 2 <= len(phrase) <= _MAX_QUERY_TERMS:
                # Positions keep the gaps of dropped stop words: "leave no trace" must still
                # match "leave no trace", not "leave trace".
                first = phrase[0].position
                words: list[str | tuple[int, str]] = [
                    (token.position - first, token.text) for token in phrase
                ]
                phrase_query = tantivy.Query.phrase_query(self._schema, "body", words, slop)
                clauses.append((should, tantivy.Query.boost_query(phrase_query, boost)))
        return tantivy.Query.boolean_query(clauses)

    def _ranked_units(self, query: tantivy.Query, limit: int) -> list[tuple[int, float]]:
        fetch = limit * 4
        while True:
            hits = self._searcher.search(query, fetch, count=False).hits
            unit_ids = self._searcher.fast_field_values("unit", [address for _, address in hits])
            chosen: list[tuple[int, float]] = []
            best_of_post: dict[str, float] = {}
            shown: dict[str, int] = {}
            for (score, _), unit_id in zip(hits, unit_ids, strict=True):
                slug = self._units[int(unit_id or 0)].post.slug
                count = shown.get(slug, 0)
                if count >= _HITS_PER_POST:
                    continue
                if count and score < _SECOND_HIT_RATIO * best_of_post[slug]:
                    continue
                best_of_post.setdefault(slug, score)
                shown[slug] = count + 1
                chosen.append((int(unit_id or 0), float(score)))
                if len(chosen) == limit:
                    return chosen
            if len(hits) < fetch:
                return chosen
            fetch *= 4

    def _term_weights(self, terms: Sequence[str]) -> dict[str, float]:
        total = self._searcher.num_docs
        return {
            term: math.log(1 + total / (1 + self._searcher.doc_freq("body", term)))
            for term in terms
        }

    def _hit(self, unit_id: int, score: float, weights: dict[str, float]) -> SearchHit:
        unit = self._units[unit_id]
        post, section = unit.post, unit.section
        return SearchHit(
            slug=post.slug,
            title=post.title,
            url=f"{post.url}#{section.anchor}" if section.anchor else post.url,
            author_id=post.author.id,
            author_name=post.author.name,
            date=post.date,
            section_heading=section.heading,
            snippet=self._snippet(unit_id, weights),
            score=score,
        )

    def _snippet(self, unit_id: int, weights: dict[str, float]) -> str:
        section = self._units[unit_id].section
        if len(section.text) <= SNIPPET_CHARS:
            return section.text
        start, end = _best_window(section.paragraphs, self._terms_of(unit_id), weights)
        return "\n\n".join(section.paragraphs[start:end])

    def _terms_of(self, unit_id: int) -> tuple[frozenset[str], ...]:
        # Analyzed lazily: only long sections that turn up in results ever need it.
        terms = self._paragraph_terms.get(unit_id)
        if terms is None:
            paragraphs = self._units[unit_id].section.paragraphs
            terms = tuple(frozenset(self._analyzer.analyze(p)) for p in paragraphs)
            self._paragraph_terms[unit_id] = terms
        return terms


def _best_window(
    paragraphs: Sequence[str],
    paragraph_terms: Sequence[frozenset[str]],
    weights: dict[str, float],
) -> tuple[int, int]:
    """The run of whole paragraphs, at most SNIPPET_CHARS long, that best covers the query."""

    def extend(start: int) -> int:
        end, length = start + 1, len(paragraphs[start])
        while end < len(paragraphs) and length + 2 + len(paragraphs[end]) <= SNIPPET_CHARS:
            length += 2 + len(paragraphs[end])
            end += 1
        return end

    def window_from(start: int) -> tuple[int, int]:
        if (
            start > 0
            and _INTRODUCED_BLOCK.match(paragraphs[start])
            and paragraphs[start - 1].rstrip().endswith(":")
        ):
            # A list or table reads badly without the sentence that introduces it.
            end = extend(start - 1)
            if end > start:
                return start - 1, end
        return start, extend(start)

    def coverage(window: tuple[int, int]) -> float:
        covered = frozenset[str]().union(*paragraph_terms[window[0] : window[1]])
        return sum(weight for term, weight in weights.items() if term in covered)

    starts = [i for i, terms in enumerate(paragraph_terms) if not terms.isdisjoint(weights)]
    windows = [window_from(start) for start in starts or [0]]
    # max() keeps the first of equals, so ties go to the earliest window.
    return max(windows, key=coverage)
