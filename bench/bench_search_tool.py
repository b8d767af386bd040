"""Search: `searchBlogContent` latency on 1,000 generated posts (goal: p99 < 20 ms).

Run with `uv run python bench/bench_search_tool.py`. It times the tool as the agent calls
it (`BlogTools.call`: input validation, the search, snippets, JSON output) over the
content and queries of `bench/bench_search.py` (which compares search engines), and, for
each query in the same loop, the bare `SearchIndex.search` underneath, as the baseline.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_search import generate_queries, generated_blog
from bench.support import Row, goal_row, info_row, print_rows, summarize
from blogchat.search import SearchIndex
from blogchat.tools import BlogTools

BENCH = "5. search"
GOAL_P99_MS = 20.0


def measure(posts: int, queries: int, seed: int) -> list[Row]:
    """Time the tool and the bare search on the same queries, interleaved."""
    blog = generated_blog(posts, seed)
    index = SearchIndex.build(blog)
    tools = BlogTools(blog, index)
    asked = generate_queries(blog, queries, seed)
    allowed = ("searchBlogContent",)
    for query in asked[:20]:  # warm-up
        tools.call("searchBlogContent", {"query": query}, allowed)
    tool_times: list[float] = []
    bare_times: list[float] = []
    for query in asked:
        started = time.perf_counter()
        result = tools.call("searchBlogContent", {"query": query}, allowed)
        tool_times.append(time.perf_counter() - started)
        assert not result.is_error, result.output
        started = time.perf_counter()
        index.search(query, limit=5)
        bare_times.append(time.perf_counter() - started)
    tool = summarize(tool_times)
    bare = summarize(bare_times)
    sections = sum(len(post.sections) for post in blog.posts)
    return [
        goal_row(
            BENCH,
            f"searchBlogContent p99 ({posts:,} posts, {sections:,} sections)",
            measured=tool.p99 * 1000,
            goal=GOAL_P99_MS,
            unit="ms",
            shown=f"{tool.p99 * 1000:.2f} ms (p50 {tool.p50 * 1000:.2f}, n={tool.n})",
        ),
        info_row(
            BENCH,
            "bare index search (baseline), tool / bare",
            f"{bare.ms()}; {tool.p50 / bare.p50:.1f}× p50",
        ),
    ]


def main(argv: list[str] | None = None) -> list[Row]:
    """Parse arguments, run, print; returns the rows for the runner."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--posts", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    rows = measure(args.posts, args.queries, args.seed)
    print_rows("searchBlogContent", rows)
    return rows


if __name__ == "__main__":
    main()
