"""Search over the posts: ranking, whole-block snippets, diverse hits, any query."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blogchat.content import Blog, Section
from blogchat.search import SNIPPET_CHARS, SearchHit, SearchIndex

ROOT = Path(__file__).resolve().parents[1]

AUTHORS = """\
ada:
  name: Ada Byron
  bio: Writes about engines.
bo:
  name: Bo Lindgren
  bio: Writes about bread.
"""

# Long sentences built from plain words, so a section can be made as long as a test needs.
FILLER = (
    "The morning was quiet and the kettle took its time. ",
    "Nothing about the week had gone to plan, which was fine. ",
    "A neighbour waved from across the road on the way past. ",
    "Later the light turned grey and the wind picked up again. ",
)


def filler(sentences: int, offset: int = 0) -> str:
    return "".join(FILLER[(offset + i) % len(FILLER)] for i in range(sentences)).strip()


def write_post(
    content: Path,
    slug: str,
    body: str,
    *,
    title: str | None = None,
    tags: str = "[notes]",
    author: str = "ada",
    date: str = "2025-01-01",
) -> None:
    (content / "posts" / f"{slug}.md").write_text(
        f"---\ntitle: {title or slug.replace('-', ' ').capitalize()}\nslug: {slug}\n"
        f"date: {date}\nauthor: {author}\ntags: {tags}\nsummary: About {slug}.\n---\n\n{body}",
        encoding="utf-8",
    )


@pytest.fixture
def content(tmp_path: Path) -> Path:
    (tmp_path / "authors.yaml").write_text(AUTHORS, encoding="utf-8")
    (tmp_path / "posts").mkdir()
    return tmp_path


def index_of(content: Path) -> tuple[Blog, SearchIndex]:
    blog = Blog.load(content)
    return blog, SearchIndex.build(blog)


def section_of(blog: Blog, hit: SearchHit) -> Section:
    post = blog.post(hit.slug)
    assert post is not None
    anchor = hit.url.partition("#")[2]
    (section,) = [s for s in post.sections if s.anchor == anchor]
    return section


def assert_whole_blocks(section: Section, snippet: str) -> None:
    """The snippet is the section, or a run of its whole blocks within the size budget."""
    if snippet == section.text:
        return
    blocks = section.paragraphs
    runs = {
        "\n\n".join(blocks[start:end])
        for start in range(len(blocks))
        for end in range(start + 1, len(blocks) + 1)
    }
    assert snippet in runs
    assert len(snippet) <= SNIPPET_CHARS or snippet in blocks


@pytest.fixture
def mixed(content: Path) -> Path:
    write_post(
        content,
        "sourdough-starter",
        "Flour and water, fed daily, become a starter.\n\n"
        "## Feeding\n\nFeed the starter twice a day with rye flour.\n\n"
        "## Hooch\n\nA grey liquid on top is hooch: pour it off and feed.\n",
        title="A sourdough starter from scratch",
        tags="[baking, bread]",
        author="bo",
        date="2025-03-01",
    )
    write_post(
        content,
        "sqlite-backups",
        "Backups of a live database need care.\n\n"
        "## The backup API\n\nUse the online backup API, never `cp` on a live file.\n\n"
        "## Litestream\n\nStream the write-ahead log to object storage.\n",
        title="Backing up SQLite",
        tags="[databases]",
        date="2025-02-01",
    )
    write_post(
        content,
        "winter-cycling",
        "Cold rides need layers.\n\n"
        "## Hands\n\nLobster gloves keep hands warm below freezing.\n\n"
        "## Café stops\n\nPlan a café stop every two hours on a cold day.\n",
        title="Cycling through the winter",
        tags="[cycling, winter]",
        date="2025-01-01",
    )
    return content


def test_a_distinctive_phrase_ranks_its_post_first(mixed: Path) -> None:
    _, index = index_of(mixed)
    for query, slug in [
        ("online backup API", "sqlite-backups"),
        ("grey liquid on top", "sourdough-starter"),
        ("lobster gloves", "winter-cycling"),
        ("How do I keep my hands warm?", "winter-cycling"),
    ]:
        hits = index.search(query)
        assert hits, query
        assert hits[0].slug == slug, query


def test_a_hit_points_at_its_section_and_names_post_author_and_date(mixed: Path) -> None:
    blog, index = index_of(mixed)
    hit = index.search("lobster gloves")[0]
    assert hit == SearchHit(
        slug="winter-cycling",
        title="Cycling through the winter",
        url="/posts/winter-cycling#hands",
        author_id="ada",
        author_name="Ada Byron",
        date=blog.posts[2].date,
        section_heading="Hands",
        snippet="Lobster gloves keep hands warm below freezing.",
        score=hit.score,
    )
    assert hit.score > 0


def test_a_match_in_the_intro_links_to_the_post_itself(mixed: Path) -> None:
    _, index = index_of(mixed)
    hit = index.search("fed daily")[0]
    assert (hit.url, hit.section_heading) == ("/posts/sourdough-starter", None)


def test_title_and_tags_lift_every_section_of_their_post(mixed: Path) -> None:
    _, index = index_of(mixed)
    assert {hit.slug for hit in index.search("databases")} == {"sqlite-backups"}
    assert index.search("sourdough")[0].slug == "sourdough-starter"


def test_words_match_across_stems_and_accents(mixed: Path) -> None:
    _, index = index_of(mixed)
    assert index.search("feeding starters")[0].slug == "sourdough-starter"
    assert index.search("cafe")[0].url == "/posts/winter-cycling#café-stops"


def test_a_quoted_phrase_beats_the_same_words_scattered(content: Path) -> None:
    write_post(content, "scattered", "The trace was faint. Leave it, there is no time.\n")
    write_post(content, "together", "Always leave no trace when you camp, whatever it takes.\n")
    _, index = index_of(content)
    assert index.search('"leave no trace"')[0].slug == "together"


def test_a_post_gives_at_most_two_hits(content: Path) -> None:
    body = "".join(f"## Kettle {i}\n\nThe kettle boiled, kettle number {i}.\n\n" for i in range(8))
    write_post(content, "kettles", body)
    write_post(content, "one-kettle", "A kettle, once.\n")
    write_post(content, "another-kettle", "Another kettle story.\n")
    _, index = index_of(content)
    hits = index.search("kettle", limit=10)
    slugs = [hit.slug for hit in hits]
    assert slugs.count("kettles") == 2
    assert {"one-kettle", "another-kettle"} <= set(slugs)


def test_a_weak_second_section_of_a_post_is_left_out(content: Path) -> None:
    write_post(
        content,
        "gloves",
        "## Gloves\n\nGloves, gloves, lobster gloves and more gloves for winter.\n\n"
        f"## Other\n\n{filler(12)} One glove.\n",
    )
    _, index = index_of(content)
    assert [hit.url for hit in index.search("lobster gloves")] == ["/posts/gloves#gloves"]


def test_a_short_section_is_its_own_snippet(mixed: Path) -> None:
    blog, index = index_of(mixed)
    for query in ["backup", "starter", "cold", "café"]:
        for hit in index.search(query):
            assert hit.snippet == section_of(blog, hit).text


def test_a_long_section_gives_its_best_whole_paragraphs(content: Path) -> None:
    blocks = [filler(5, i) for i in range(8)]
    blocks[5] = f"{filler(2)} The rare word is marmalade, twice marmalade. {filler(2, 2)}"
    body = "## Diary\n\n" + "\n\n".join(blocks) + "\n"
    write_post(content, "diary", body)
    blog, index = index_of(content)
    section = blog.posts[0].sections[0]
    assert len(section.text) > SNIPPET_CHARS
    (hit,) = index.search("marmalade")
    assert blocks[5] in hit.snippet
    assert hit.snippet.startswith(blocks[5])
    assert_whole_blocks(section, hit.snippet)
    assert hit.snippet.endswith(".")


def test_a_list_in_a_snippet_keeps_the_sentence_that_introduces_it(content: Path) -> None:
    blocks = [filler(6, i) for i in range(4)]
    blocks += ["You will need these:", "- a flask of marmalade\n- a spoon", filler(6, 1)]
    write_post(content, "kit", "## Kit\n\n" + "\n\n".join(blocks) + "\n")
    blog, index = index_of(content)
    (hit,) = index.search("marmalade")
    assert hit.snippet.startswith("You will need these:\n\n- a flask of marmalade")
    assert_whole_blocks(blog.posts[0].sections[0], hit.snippet)


def test_a_single_block_longer_than_the_budget_is_returned_whole(content: Path) -> None:
    huge = f"{filler(30)} Marmalade at the end."
    write_post(content, "huge", f"## Huge\n\n{filler(3)}\n\n{huge}\n\n{filler(3, 1)}\n")
    _, index = index_of(content)
    (hit,) = index.search("marmalade")
    assert hit.snippet == huge


def test_snippets_on_the_real_content_are_whole_blocks_ending_at_a_boundary() -> None:
    blog = Blog.load(ROOT / "content")
    index = SearchIndex.build(blog)
    words = sorted(
        {w.lower() for post in blog.posts for w in re.findall(r"[A-Za-z]{6,}", post.title)}
    )
    assert words
    for query in words:
        hits = index.search(query, limit=10)
        assert len(hits) <= 10
        for hit in hits:
            section = section_of(blog, hit)
            assert_whole_blocks(section, hit.snippet)
            assert hit.snippet == hit.snippet.strip()
            # A block ends a sentence, a list item, a table row or a code fence.
            assert not re.search(r"\w$", hit.snippet) or hit.snippet == section.text


def test_limit_caps_the_number_of_hits(content: Path) -> None:
    for i in range(12):
        write_post(content, f"post-{i}", f"Kettle post number {i}.\n")
    _, index = index_of(content)
    assert len(index.search("kettle")) == 5
    assert len(index.search("kettle", limit=3)) == 3
    assert len(index.search("kettle", limit=100)) == 12
    assert index.search("kettle", limit=0) == []
    assert index.search("kettle", limit=-1) == []


@pytest.mark.parametrize("query", ["", "   ", "\n\t", "the", "and of the", "?!", "***", '""'])
def test_a_query_with_nothing_to_search_for_returns_nothing(mixed: Path, query: str) -> None:
    _, index = index_of(mixed)
    assert index.search(query) == []


HOSTILE_QUERIES = [
    "AND",
    "OR NOT AND",
    "starter AND",
    "-starter",
    "+starter -flour",
    "title:starter",
    "body:",
    ":",
    "*",
    "star*",
    "?",
    '"unterminated',
    '"',
    '""starter""',
    "(((",
    ")",
    "[1 TO 5]",
    "{a TO b}",
    "starter^10",
    "starter~2",
    "/regex.*/",
    "a\\b",
    "IN [a b]",
    "\x00",
    "\ud800 lone surrogate",
    "😀 café ☕",
    "ünïcödé ß ﬁ",
    "日本語の検索",
    "x" * 5000,
    " ".join(["starter"] * 500),
    " ".join(f"w{i}" for i in range(200)),
]


@pytest.mark.parametrize("query", HOSTILE_QUERIES)
def test_operator_looking_and_odd_queries_never_raise(mixed: Path, query: str) -> None:
    _, index = index_of(mixed)
    hits = index.search(query)
    assert len(hits) <= 5


def test_operators_are_ordinary_words(mixed: Path) -> None:
    _, index = index_of(mixed)
    assert index.search("starter AND")[0].slug == "sourdough-starter"
    assert index.search("-starter")[0].slug == "sourdough-starter"
    assert index.search("title:starter")[0].slug == "sourdough-starter"


@pytest.fixture(scope="module")
def real_index() -> SearchIndex:
    return SearchIndex.build(Blog.load(ROOT / "content"))


@settings(max_examples=300, deadline=None)
@given(query=st.text(alphabet=st.characters(codec=None, exclude_categories=())))
def test_arbitrary_text_never_raises(real_index: SearchIndex, query: str) -> None:
    hits = real_index.search(query)
    assert len(hits) <= 5


@settings(max_examples=100, deadline=None)
@given(
    words=st.lists(
        st.sampled_from(["AND", "OR", "NOT", "-", ":", "*", '"', "(", ")", "^", "~", "sqlite"]),
        max_size=12,
    ),
    limit=st.integers(min_value=-5, max_value=60),
)
def test_arbitrary_operator_soup_never_raises(
    real_index: SearchIndex, words: list[str], limit: int
) -> None:
    hits = real_index.search("".join(words), limit=limit)
    assert len(hits) <= max(0, limit)


def load_bench() -> ModuleType:
    # Loaded by path: bench/ is a folder of scripts, not a package, and importing it as
    # `bench.bench_search` would give mypy the same file under two module names.
    path = ROOT / "bench" / "bench_search.py"
    spec = importlib.util.spec_from_file_location("bench_search", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Dataclasses look their module up in sys.modules while the module is being executed.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_generated_content_is_deterministic_and_searchable(tmp_path: Path) -> None:
    # How fast the search is, bench/bench_search.py measures; here only that it works.
    bench = load_bench()
    bench.write_generated_content(tmp_path / "a", n_posts=150, seed=3)
    bench.write_generated_content(tmp_path / "b", n_posts=150, seed=3)
    first = sorted((tmp_path / "a/posts").iterdir())
    second = sorted((tmp_path / "b/posts").iterdir())
    assert [p.read_text() for p in first] == [p.read_text() for p in second]

    blog = Blog.load(tmp_path / "a")
    assert len(blog.posts) == 150
    index = SearchIndex.build(blog)
    queries: list[str] = bench.generate_queries(blog, 200, seed=3)
    assert queries == bench.generate_queries(blog, 200, seed=3)
    answered = [query for query in queries if index.search(query)]
    # The generated queries are drawn from the posts, so nearly all of them find something.
    assert len(answered) >= 0.9 * len(queries)
