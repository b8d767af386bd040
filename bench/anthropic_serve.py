"""The Anthropic test server in a process of its own, answering every prompt with N tokens.

Run as `python -m bench.anthropic_serve --tokens 500`: it prints its base URL on the first
line of stdout and serves until its stdin closes. In its own process it competes with
neither the benchmark's clients nor blogchat for the GIL, so both paths read the same
stream at the same speed.
"""

from __future__ import annotations

import argparse
import sys

from tests.support.anthropic_server import AnthropicTestServer, RecordedRequest, Reply, Text


def main() -> None:
    """Serve until stdin closes."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tokens", type=int, default=500, help="text deltas per answer")
    parser.add_argument("--rate", type=float, default=0, help="deltas per second (0: no pause)")
    args = parser.parse_args()
    answer = Reply((Text(" ".join(f"w{i}" for i in range(args.tokens)), chunk="word"),))

    def respond(_: RecordedRequest) -> Reply:
        return answer

    with AnthropicTestServer(default=respond, tokens_per_second=args.rate or None) as api:
        print(api.base_url, flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
