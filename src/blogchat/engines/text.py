"""Where a sentence ends in streamed answer text: a graceful stop ends the answer there.

Both engines use this one rule. A sentence ends at `.`, `!`, `?` or `…`, with any closing
quotes, brackets or Markdown emphasis after it, when whitespace or the end of the piece
follows (so `3.5`, `e.g.x` and `example.com` do not end one); a line break ends one too.
A colon does not: it announces what follows (a list, a quote, the answer itself), and an
answer stopped there would promise something it never gives. The line break after such a
colon still ends the sentence.
"""

from __future__ import annotations

import re

_SENTENCE_END = re.compile(r"[.!?…][\"'”’)\]*_]*(?=\s|$)|\n")


def sentence_end(text: str) -> int | None:
    """The index just after the first sentence end in `text`, if there is one."""
    match = _SENTENCE_END.search(text)
    return None if match is None else match.end()
