"""Incremental detokenization with stop strings.

Each step decodes only a short window of ids: the tokens not yet turned into text, plus the
previous chunk as context. Byte-level and SentencePiece tokenizers merge across token
boundaries and may drop a leading space at the start of a decode; decoding the context alone
and context + new tokens from the same start cancels that out. Per-token cost stays constant
however long the output grows. An unfinished UTF-8 sequence waits for the next token; so does
any tail that could still become a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class IncrementalText:
    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far
        self.sent = 0  # characters of `text` already released
        self.stopped = False  # a stop string matched: the request must end
        self._prefix = 0  # decode windows start here
        self._read = 0  # ids before this are in `text`

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _advance(self, final: bool) -> None:
        """Move newly decodable text from `ids` into `text`."""
        if self._read == len(self.ids):
            return
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)

    def push(self, token_ids: Sequence[int]) -> str:
        """Add tokens; the text that can be released now."""
        self.ids.extend(token_ids)
        self._advance(final=False)
        return self._release(final=False)

    def flush(self) -> str:
        """At the end: whatever was held back (nothing after a stop string)."""
        if self.stopped:
            return ""
        self._advance(final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        text = self.text
        if self.stop:
            # A stop string can only start in the unreleased part or just before it.
            begin = max(0, self.sent - max(len(s) for s in self.stop) + 1)
            hits = [i for i in (text.find(s, begin) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                end = max(min(hits), self.sent)
                out, self.sent = text[self.sent : end], end
                return out
        end = len(text)
        if not final:
            hold = 0  # the longest tail that is a prefix of a stop string
            for s in self.stop:
                for k in range(min(len(s) - 1, end - self.sent), hold, -1):
                    if text[end - k : end] == s[:k]:
                        hold = k
                        break
            end = max(end - hold, self.sent)
        out, self.sent = text[self.sent : end], end
        return out


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-character table used by byte-level BPE vocabularies."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class TokenText:
    """Each token's own text and exact bytes, for log-probability entries (cached per id).

    A token may hold part of a UTF-8 character: its text is then U+FFFD, and its bytes (what
    OpenAI's `bytes` field is for) are recovered from the vocabulary where the tokenizer is
    byte-level BPE or uses byte fallback (`<0xNN>` tokens)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = type(getattr(backend, "decoder", None)).__name__
        self._bytes_of = _byte_decoder() if decoder == "ByteLevel" else None
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def get(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            text = self.tokenizer.decode([token_id])
            raw = self.tokenizer.convert_ids_to_tokens(token_id)
            data: list[int] | None = None
            if isinstance(raw, str):
                if self._bytes_of is not None and all(c in self._bytes_of for c in raw):
                    data = [self._bytes_of[c] for c in raw]
                elif len(raw) == 6 and raw.startswith("<0x") and raw.endswith(">"):
                    data = [int(raw[3:5], 16)]
            hit = (text, data if data is not None else list(text.encode("utf-8")))
            if len(self._cache) < 1 << 16:
                self._cache[token_id] = hit
        return hit
