"""Incremental detokenization with stop strings.

Text is decoded from all output ids each time (tokens merge across boundaries) and only the
new, settled part is released: an unfinished UTF-8 sequence and any tail that could still
become a stop string are held back until the next token or the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class IncrementalText:
    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already released
        self.stopped = False  # a stop string matched: the request must end

    def push(self, token_ids: Sequence[int]) -> str:
        """Add tokens; the text that can be released now."""
        self.ids.extend(token_ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stop:
            # A stop string can only start in the unreleased part or just before it.
            window = max(len(s) for s in self.stop) - 1
            begin = max(0, self.sent - window)
            hits = [i for i in (text.find(s, begin) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                end = max(min(hits), self.sent)
                out, self.sent = text[self.sent : end], end
                return out
        end = len(text)
        if text.endswith("\ufffd"):
            end -= 1  # half of a multi-byte character: wait for the rest
        hold = 0  # the longest tail that is a prefix of a stop string
        for s in self.stop:
            for k in range(min(len(s) - 1, end - self.sent), hold, -1):
                if text[end - k : end] == s[:k]:
                    hold = k
                    break
        end = max(end - hold, self.sent)
        out, self.sent = text[self.sent : end], end
        return out

    def flush(self) -> str:
        """At the end: whatever was held back (not after a stop string)."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        out, self.sent = text[self.sent :], len(text)
        return out
