"""Generated token ids -> the text a client sees, with stop strings.

Stop strings are matched on decoded text (a stop string can span tokens, or end in the middle of one),
and the text is cut just before the first match. While streaming, text that might be the beginning of a
stop string is held back until the next tokens show whether it is one: a client never receives text that
a later stop match would have removed.
"""

from __future__ import annotations

from collections.abc import Sequence

from cybertron.data.tokenizer import IncrementalDecoder, TextTokenizer


class OutputText:
    """Accumulates one request's output text; `push` returns the text that is now safe to emit."""

    def __init__(self, tokenizer: TextTokenizer, stop: Sequence[str] = ()):
        # Special tokens (eos, chat turn markers) are not part of the text a client reads.
        self._decoder = IncrementalDecoder(tokenizer, skip_special_tokens=True)
        self._stop = tuple(stop)
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        self.text = ""
        self._emitted = 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one generated token; returns newly emittable text. Sets `stopped` when a stop string appears
        (the text is then cut before it, and nothing after it is ever emitted)."""
        assert not self.stopped, "push after a stop string ended the text"
        return self._extend(self._decoder.push(token_id))

    def finish(self) -> str:
        """The rest of the text at the end of generation (held-back text and any incomplete character)."""
        if self.stopped:
            return ""
        delta = self._extend(self._decoder.flush())
        if self.stopped:
            return delta
        rest = self.text[self._emitted:]
        self._emitted = len(self.text)
        return delta + rest

    def _extend(self, piece: str) -> str:
        if not piece:
            return ""
        before = len(self.text)
        self.text += piece
        if self._stop:
            cut = self._find_stop(before)
            if cut is not None:
                self.text = self.text[:cut]
                self.stopped = True
                return self._emit(len(self.text))
        return self._emit(len(self.text) - self._partial_stop_suffix())

    def _find_stop(self, before: int) -> int | None:
        # Only a match that ends in the new piece is new: search from where such a match could start.
        start = max(0, before - self._longest_stop + 1)
        hits = [i for i in (self.text.find(s, start) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _partial_stop_suffix(self) -> int:
        """Length of the longest end of the text that is a proper prefix of some stop string."""
        for n in range(min(self._longest_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0

    def _emit(self, end: int) -> str:
        end = max(end, self._emitted)
        delta = self.text[self._emitted:end]
        self._emitted = end
        return delta
