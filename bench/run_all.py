"""Run every benchmark and print one table of results against their goals.

    uv run python bench/run_all.py            # everything, full size (about 5 minutes)
    uv run python bench/run_all.py --quick    # smaller samples, for a smoke run
    uv run python bench/run_all.py --only concurrency,resume

Each benchmark measures side by side in one run and reports ratios (see docs/performance.md);
the table ends with the machine, the command and the date, and is printed as Markdown too.
Each runs in a Python process of its own: what one leaves behind (a heap of a thousand
connections' objects, threads) must not slow the next one's measurements.
Exit status 1 when any goal is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.support import Row, info_row, machine, markdown_table, print_rows

BENCHMARKS = ("relay", "concurrency", "claude", "resume", "search", "ratelimit", "cluster")


def relay(quick: bool) -> list[Row]:
    """1. Relay overhead (needs the Claude Agent SDK's CLI)."""
    from bench import bench_relay

    return bench_relay.main(["--rounds", "10" if quick else "40"])


def concurrency(quick: bool) -> list[Row]:
    """2. 1,000 connections, 100 chats at 50 tokens/s."""
    from bench import bench_concurrency

    return bench_concurrency.main(["--seconds", "8"] if quick else [])


def claude(quick: bool) -> list[Row]:
    """3. Claude engine cost (reuses bench/bench_claude.py's engine harness)."""
    from bench import bench_claude_cost

    return bench_claude_cost.main(["--quick"] if quick else [])


def resume(quick: bool) -> list[Row]:
    """4. Replaying a 5,000-event turn."""
    from bench import bench_resume

    return bench_resume.main(["--rounds", "10" if quick else "30"])


def search(quick: bool) -> list[Row]:
    """5. searchBlogContent on 1,000 generated posts."""
    from bench import bench_search_tool

    return bench_search_tool.main(["--queries", "100" if quick else "300"])


def ratelimit(quick: bool) -> list[Row]:
    """6. A rate limit check, in memory and on Redis."""
    from bench import bench_ratelimit

    return bench_ratelimit.main(["--hits", "4000" if quick else "20000"])


def messages(quick: bool) -> list[Row]:
    """4. The Messages engine beside the Agent SDK engine and direct."""
    from bench import bench_messages

    small = ["--rounds", "10", "--paced-rounds", "3", "--chats", "5", "--crowd", "50"]
    return bench_messages.main(small if quick else [])


def cluster(quick: bool) -> list[Row]:
    """8. Several instances: the shared log on Redis, and readers on other instances."""
    from bench import bench_cluster

    if quick:
        return bench_cluster.main(
            ["--samples", "500", "--replays", "10", "--stops", "20", "--first-tokens", "20"]
        )
    return bench_cluster.main([])


RUNNERS: dict[str, Callable[[bool], list[Row]]] = {
    "relay": relay,
    "concurrency": concurrency,
    "claude": claude,
    "messages": messages,
    "resume": resume,
    "search": search,
    "ratelimit": ratelimit,
    "cluster": cluster,
}


# The line before a child's rows, as JSON, on its standard output.
ROWS_MARK = "--- rows ---"


def run_child(name: str, quick: bool) -> list[Row]:
    """Run one benchmark in a fresh Python process; its rows."""
    command = [sys.executable, __file__, "--child", name, *(["--quick"] if quick else [])]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    output = done.stdout
    mark = output.rfind(ROWS_MARK)
    print(output[:mark] if mark >= 0 else output, end="", flush=True)
    if mark < 0:
        raise RuntimeError(f"exited with status {done.returncode} and no results")
    return [Row(**row) for row in json.loads(output[mark + len(ROWS_MARK) :])]


def child(name: str, quick: bool) -> int:
    """In the child process: run one benchmark and print its rows as JSON."""
    try:
        rows = RUNNERS[name](quick)
    except Exception as exc:  # one broken benchmark must not hide the others
        rows = [Row(name, "did not run", "-", f"{type(exc).__name__}: {exc}"[:200], passed=False)]
    print(ROWS_MARK)
    print(json.dumps([dataclasses.asdict(row) for row in rows]), flush=True)
    return 0


def main() -> int:
    """Run the chosen benchmarks one after the other; print the summary."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller samples")
    parser.add_argument(
        "--only", default=",".join(BENCHMARKS), help=f"comma-separated, of {BENCHMARKS}"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.quick)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(chosen) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")

    about = machine()
    started = time.monotonic()
    rows: list[Row] = []
    for name in chosen:
        print(f"\n=== {name} ===", flush=True)
        try:
            rows += run_child(name, args.quick)
        except Exception as exc:  # one broken benchmark must not hide the others
            rows.append(
                Row(name, "did not run", "-", f"{type(exc).__name__}: {exc}"[:200], passed=False)
            )
        # Let the previous benchmark's processes exit before the next one measures.
        asyncio.run(asyncio.sleep(1))
    elapsed = time.monotonic() - started
    command = "uv run python bench/run_all.py " + " ".join(sys.argv[1:])
    rows.append(info_row("-", "total time", f"{elapsed:.0f} s"))

    print_rows("Summary", rows)
    print("\n" + markdown_table(rows) + "\n")
    print(f"command: `{command.strip()}`")
    for key, value in about.items():
        print(f"{key}: {value}")
    print(f"cwd: {os.getcwd()}")
    return 0 if all(row.passed is not False for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
