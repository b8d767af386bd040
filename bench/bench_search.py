"""Search benchmark: build the index over generated posts and time realistic queries.

Run with `uv run python bench/bench_search.py`. The generator functions are importable, so
other benchmarks can use the same content: `write_generated_content(dest, n_posts=1000)`
writes a whole content dir, `generated_blog(1000)` loads one.
"""

from __future__ import annotations

import argparse
import itertools
import random
import re
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Protocol

import yaml

from blogchat.content import Blog
from blogchat.search import SearchHit, SearchIndex

REAL_CONTENT = Path(__file__).resolve().parents[1] / "content"
GOAL_P99_MS = 20.0

_SYLLABLES = (
    "ka",
    "ri",
    "to",
    "mel",
    "sen",
    "dar",
    "vo",
    "lin",
    "bre",
    "qua",
    "stel",
    "mor",
    "fen",
    "gal",
    "tri",
    "pha",
    "nor",
    "vek",
    "sul",
    "ur",
    "am",
    "ost",
    "el",
    "ban",
    "cor",
    "dun",
    "esh",
    "fir",
    "gro",
    "hal",
    "ith",
    "jor",
    "kel",
    "lum",
    "nex",
    "orb",
)
_WORD = re.compile(r"(?<![\w`/.\-])([A-Za-z]{5,})(?![\w`/.\-])")
_FENCE = re.compile(r"^(```|~~~)", re.MULTILINE)


@dataclass(frozen=True)
class _Source:
    titles: tuple[str, ...]
    headings: tuple[str, ...]
    paragraphs: tuple[str, ...]
    summaries: tuple[str, ...]
    tags: tuple[str, ...]
    authors_yaml: str


def _read_source(content_dir: Path) -> _Source:
    blog = Blog.load(content_dir)
    sections = [section for post in blog.posts for section in post.sections]
    return _Source(
        titles=tuple(post.title for post in blog.posts),
        headings=tuple(section.heading for section in sections if section.heading),
        paragraphs=tuple(p for section in sections for p in section.paragraphs),
        summaries=tuple(post.summary for post in blog.posts),
        tags=tuple(sorted({tag for post in blog.posts for tag in post.tags})),
        authors_yaml=(content_dir / "authors.yaml").read_text(encoding="utf-8"),
    )


class _Vocabulary:
    """Made-up words with a Zipf-like frequency, so generated text has a long tail."""

    def __init__(self, rng: random.Random, size: int = 6000) -> None:
        words: set[str] = set()
        while len(words) < size:
            words.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))))
        self.words = sorted(words)
        rng.shuffle(self.words)
        self._cum_weights = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(size)))
        self._rng = rng

    def sample(self, k: int = 1) -> list[str]:
        return self._rng.choices(self.words, cum_weights=self._cum_weights, k=k)


def _mutate(paragraph: str, vocabulary: _Vocabulary, rng: random.Random, rate: float) -> str:
    # Code blocks stay as they are; in prose, some longer words give way to made-up ones.
    if _FENCE.search(paragraph):
        return paragraph
    return _WORD.sub(
        lambda m: vocabulary.sample()[0] if rng.random() < rate else m.group(1), paragraph
    )


def _generated_sentence(vocabulary: _Vocabulary, rng: random.Random) -> str:
    words = vocabulary.sample(rng.randint(6, 16))
    return " ".join(words).capitalize() + "."


def write_generated_content(
    dest: Path, n_posts: int = 1000, seed: int = 42, source: Path = REAL_CONTENT
) -> None:
    """Write a content dir of `n_posts` posts recombined from `source`'s posts and made-up words.

    The output depends only on `seed` and the source posts.
    """
    rng = random.Random(seed)
    src = _read_source(source)
    vocabulary = _Vocabulary(rng)
    authors = sorted(yaml.safe_load(src.authors_yaml))
    extra_tags = sorted({vocabulary.words[i] for i in range(40)})
    (dest / "posts").mkdir(parents=True, exist_ok=True)
    (dest / "authors.yaml").write_text(src.authors_yaml, encoding="utf-8")
    first_day = date(2015, 1, 1)
    for number in range(n_posts):
        made_up = " ".join(vocabulary.sample(rng.randint(1, 2)))
        title = f"{rng.choice(src.titles)}: {made_up}".replace('"', "")
        slug = f"{re.sub(r'[^a-z0-9]+', '-', title.lower()).strip('-')[:60].strip('-')}-{number}"
        tags = sorted(set(rng.sample(src.tags, 2) + rng.sample(extra_tags, rng.randint(0, 2))))
        summary = _mutate(rng.choice(src.summaries), vocabulary, rng, 0.1)
        parts = [_mutate(rng.choice(src.paragraphs), vocabulary, rng, 0.1)]
        for _ in range(rng.randint(4, 9)):
            heading = rng.choice(src.headings)
            if rng.random() < 0.5:
                heading = f"{heading} {vocabulary.sample()[0]}"
            parts.append(f"{'###' if rng.random() < 0.2 else '##'} {heading}")
            for _ in range(rng.randint(1, 4)):
                paragraph = _mutate(rng.choice(src.paragraphs), vocabulary, rng, 0.15)
                if rng.random() < 0.3 and not _FENCE.search(paragraph):
                    paragraph = f"{_generated_sentence(vocabulary, rng)} {paragraph}"
                parts.append(paragraph)
        front_matter = {
            "title": title,
            "slug": slug,
            "date": first_day + timedelta(days=rng.randrange(4000)),
            "author": rng.choice(authors),
            "tags": tags,
            "summary": summary,
        }
        text = f"---\n{yaml.safe_dump(front_matter, sort_keys=False)}---\n\n"
        text += "\n\n".join(parts) + "\n"
        (dest / "posts" / f"{slug}.md").write_text(text, encoding="utf-8")


def generated_blog(n_posts: int = 1000, seed: int = 42, source: Path = REAL_CONTENT) -> Blog:
    """A `Blog` of `n_posts` generated posts (see `write_generated_content`)."""
    with tempfile.TemporaryDirectory() as tmp:
        write_generated_content(Path(tmp), n_posts, seed, source)
        return Blog.load(Path(tmp))


READER_QUESTIONS = (
    "how do I keep warm on a winter bike ride",
    "what should I pack for a three day hike",
    "how much water should I carry",
    "sqlite in production",
    "is SQLite enough for a web app?",
    "WAL mode busy_timeout",
    "when should I move to postgres",
    "how do idempotency keys work",
    "retry a payment without charging twice",
    "websocket reconnect replay buffer",
    "exponential backoff with jitter",
    "heartbeats half-open connections",
    "night sky photography 500 rule",
    "what ISO for the milky way",
    "cheap lens for astrophotography",
    "bikepacking route in the Cairngorms",
    "wild camping rules scotland",
    "budget for irregular income",
    "how much tax to set aside as a freelancer",
    "why is it called Helvetica",
    "Times New Roman history",
    "base layer merino or synthetic",
    "first aid kit for hiking",
    "Backups without stopping the app",
    "what's the best tent?",
    '"leave no trace"',
    "sourdough -starter",
    "AND OR NOT",
    "title:sqlite",
    "C++ & Rust: (memory) safety*",
    "Tomás Okafor's recipes",
    "café ☕ near Braemar",
)


def generate_queries(blog: Blog, n_queries: int = 300, seed: int = 7) -> list[str]:
    """Reader-like queries: typed questions, words lifted from posts, quoted phrases."""
    rng = random.Random(seed)
    queries = list(READER_QUESTIONS)
    paragraphs = [p for post in blog.posts for s in post.sections for p in s.paragraphs]
    while len(queries) < n_queries:
        words = re.findall(r"[A-Za-z][A-Za-z'-]+", rng.choice(paragraphs))
        if len(words) < 12:
            continue
        kind = rng.random()
        if kind < 0.4:
            queries.append(" ".join(rng.sample(words, rng.randint(2, 4))))
        elif kind < 0.7:
            start = rng.randrange(len(words) - 4)
            queries.append(f'"{" ".join(words[start : start + rng.randint(2, 4)])}"')
        else:
            start = rng.randrange(len(words) - 6)
            queries.append(" ".join(words[start : start + rng.randint(5, 10)]) + "?")
    return queries[:n_queries]


class _Index(Protocol):
    def search(self, query: str, limit: int = 5) -> list[SearchHit]: ...


class Fts5Index:
    """The alternative that was measured against tantivy: SQLite FTS5, porter stemmer, bm25.

    Same index unit, same field weights, same two-hits-per-post rule; no snippets.
    """

    _WEIGHTS = (3.0, 2.0, 1.0, 1.0, 2.0, 1.0)  # title, tags, summary, author, heading, body

    def __init__(self, blog: Blog) -> None:
        self._db = sqlite3.connect(":memory:", check_same_thread=False)
        self._db.execute(
            "CREATE VIRTUAL TABLE unit USING fts5(title, tags, summary, author, heading, body,"
            " tokenize='porter unicode61 remove_diacritics 2')"
        )
        self._units = [
            (post, section)
            for post in blog.posts
            for section in post.sections
            if section.paragraphs
        ]
        self._db.executemany(
            "INSERT INTO unit(rowid, title, tags, summary, author, heading, body)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    i,
                    post.title,
                    " ".join(post.tags),
                    post.summary,
                    post.author.name,
                    section.heading or "",
                    section.text,
                )
                for i, (post, section) in enumerate(self._units)
            ],
        )

    def search(self, query: str, limit: int = 5) -> list[SearchHit]:
        words = list(dict.fromkeys(w.lower() for w in re.findall(r"\w+", query)))[:24]
        if not words:
            return []
        # Every word quoted, so nothing a reader types is FTS5 syntax.
        match = " OR ".join(f'"{word}"' for word in words)
        rows = self._db.execute(
            f"SELECT rowid, -bm25(unit, {', '.join(map(str, self._WEIGHTS))}) AS score"
            " FROM unit WHERE unit MATCH ? ORDER BY score DESC LIMIT ?",
            (match, limit * 4),
        ).fetchall()
        hits: list[SearchHit] = []
        per_post: dict[str, int] = {}
        for rowid, score in rows:
            post, section = self._units[rowid]
            if per_post.get(post.slug, 0) >= 2:
                continue
            per_post[post.slug] = per_post.get(post.slug, 0) + 1
            url = f"{post.url}#{section.anchor}" if section.anchor else post.url
            hits.append(
                SearchHit(
                    post.slug,
                    post.title,
                    url,
                    post.author.id,
                    post.author.name,
                    post.date,
                    section.heading,
                    "",
                    score,
                )
            )
        return hits[:limit]


# A reader's question and the section of the sample content that answers it.
RANKING_CHECKS = (
    (
        "how do I keep my hands warm on a winter ride",
        "/posts/layering-for-cold-weather-rides#hands-feet-head-and-face",
    ),
    (
        "how much water should I carry on a hike",
        "/posts/three-day-hike-packing-list#water-how-much-to-carry-and-how-to-treat-it",
    ),
    (
        "how much food per day on a hike",
        "/posts/three-day-hike-packing-list#food-at-about-700-g-a-day",
    ),
    (
        "is sqlite good enough for production",
        "/posts/sqlite-in-production#why-sqlite-is-often-enough",
    ),
    (
        "how to back up a live sqlite database",
        "/posts/sqlite-in-production#backups-without-stopping-the-app",
    ),
    ("when should I switch to postgres", "/posts/sqlite-in-production#when-to-move-to-postgresql"),
    (
        "retrying a payment charges the customer twice",
        "/posts/idempotency-keys-in-practice#why-retries-duplicate-work",
    ),
    ("how long should idempotency keys be kept", "/posts/idempotency-keys-in-practice#expiry"),
    (
        "random delay between reconnect attempts",
        "/posts/what-a-websocket-reconnect-needs#backoff-with-full-jitter",
    ),
    (
        "detect a dead websocket connection",
        "/posts/what-a-websocket-reconnect-needs#heartbeats-and-half-open-connections",
    ),
    (
        "how long can I expose before stars trail",
        "/posts/night-sky-photography-on-a-budget#how-long-can-you-expose-the-500-rule-versus-the-npf-rule",
    ),
    (
        "best ISO for shooting stars",
        "/posts/night-sky-photography-on-a-budget#iso-white-balance-and-focus",
    ),
    (
        "where can I wild camp in scotland",
        "/posts/bikepacking-the-cairngorms#bothies-and-wild-camping-under-the-access-code",
    ),
    (
        "my starter smells like nail polish",
        "/posts/sourdough-starter-from-scratch#troubleshooting-hooch-mould-and-strange-smells",
    ),
    (
        "when is the starter ready to bake with",
        "/posts/sourdough-starter-from-scratch#signs-of-readiness",
    ),
    (
        "how much salt to ferment chillies",
        "/posts/lacto-fermented-hot-sauce#salt-by-weight-the-2-3-rule",
    ),
    (
        "is homemade hot sauce safe? what pH",
        "/posts/lacto-fermented-hot-sauce#ph-the-safety-number",
    ),
    ("my espresso tastes sour", "/posts/dialing-in-espresso-at-home#tasting-sour-or-bitter"),
    (
        "espresso dose and yield ratio",
        "/posts/dialing-in-espresso-at-home#the-numbers-dose-yield-ratio-and-time",
    ),
    (
        "the norwegian paperclip myth",
        "/posts/a-short-history-of-the-paperclip#johan-vaaler-and-the-norwegian-myth",
    ),
    ("why was helvetica renamed", "/posts/why-typefaces-have-names#helvetica-a-rename-for-export"),
    (
        "what does the x axis of a flame graph mean",
        "/posts/reading-a-flame-graph#what-the-axes-mean",
    ),
    (
        "profile a running python program with py-spy",
        "/posts/reading-a-flame-graph#recording-one-with-py-spy",
    ),
    (
        "setting aside tax on irregular income",
        "/posts/zero-based-budgeting-for-irregular-income#step-three-set-tax-aside-first",
    ),
)


def ranking_quality(index: _Index, blog: Blog) -> tuple[float, float, float, int]:
    """Over the RANKING_CHECKS whose post is in `blog`: right post first, right section
    first, mean reciprocal rank of the right section in the top 5, number of checks."""
    checks = [
        (query, url)
        for query, url in RANKING_CHECKS
        if blog.post(url.split("#")[0].removeprefix("/posts/")) is not None
    ]
    post_first = section_first = reciprocal = 0.0
    for query, url in checks:
        urls = [hit.url for hit in index.search(query, 5)]
        post_first += bool(urls) and urls[0].split("#")[0] == url.split("#")[0]
        section_first += bool(urls) and urls[0] == url
        reciprocal += 1 / (urls.index(url) + 1) if url in urls else 0.0
    n = max(1, len(checks))
    return post_first / n, section_first / n, reciprocal / n, len(checks)


def _percentile(samples: Sequence[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def measure(
    blog: Blog,
    queries: Sequence[str],
    label: str,
    build: Callable[[Blog], _Index] = SearchIndex.build,
) -> float:
    """Print build time and query latency for `blog`; return the p99 in milliseconds."""
    started = time.perf_counter()
    index = build(blog)
    build_ms = (time.perf_counter() - started) * 1000
    for query in queries[:20]:
        index.search(query)
    latencies: list[float] = []
    for query in queries:
        started = time.perf_counter()
        index.search(query)
        latencies.append((time.perf_counter() - started) * 1000)
    sections = sum(len(post.sections) for post in blog.posts)
    p50, p95, p99 = (_percentile(latencies, f) for f in (0.5, 0.95, 0.99))
    print(f"{label}: {len(blog.posts)} posts, {sections} sections")
    print(f"  build   {build_ms:8.1f} ms")
    print(
        f"  search  p50 {p50:.2f} ms  p95 {p95:.2f} ms  p99 {p99:.2f} ms"
        f"  max {max(latencies):.2f} ms  ({len(latencies)} queries)"
    )
    post_first, section_first, mrr, checks = ranking_quality(index, blog)
    if checks:
        print(
            f"  ranking right post first {post_first:.0%}, right section first"
            f" {section_first:.0%}, section MRR@5 {mrr:.2f} ({checks} questions)"
        )
    return p99


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; exit status 1 when the latency goal is missed."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--posts", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--compare", action="store_true", help="also measure the SQLite FTS5 alternative"
    )
    args = parser.parse_args(argv)
    engines: list[tuple[str, Callable[[Blog], _Index]]] = [("tantivy", SearchIndex.build)]
    if args.compare:
        engines.append(("sqlite fts5", Fts5Index))

    real = Blog.load(REAL_CONTENT)
    for name, build in engines:
        measure(
            real, generate_queries(real, args.queries, args.seed), f"{name}, sample content", build
        )

    started = time.perf_counter()
    blog = generated_blog(args.posts, args.seed)
    print(f"generated {args.posts} posts in {(time.perf_counter() - started):.1f} s")
    queries = generate_queries(blog, args.queries, args.seed)
    p99s = [measure(blog, queries, f"{name}, generated content", build) for name, build in engines]
    passed = p99s[0] < GOAL_P99_MS
    print(f"goal: p99 < {GOAL_P99_MS:.0f} ms on {args.posts} posts: {'PASS' if passed else 'FAIL'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
