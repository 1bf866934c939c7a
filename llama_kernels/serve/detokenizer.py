"""Incremental detokenization of one request's output: text is handed out piece by piece, never
ending inside a UTF-8 character and never showing any part of a stop string."""

from __future__ import annotations


class Detokenizer:
    """Decodes a growing list of token ids and returns, after each addition, the text that is safe
    to show: the decoded text minus a trailing incomplete UTF-8 character (decoded as U+FFFD) and
    minus its longest suffix that is a prefix of a stop string. When a stop string appears, the
    text ends right before it (`stopped` becomes True) and nothing after it is ever shown.

    Relies on decode(ids + more) starting with decode(ids) (byte-level BPE decoders do).
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer  # anything with decode(list[int]) -> str
        self.stop = tuple(stop)  # stop strings
        self.ids: list[int] = []  # tokens so far
        self.emitted = 0  # characters of the decoded text already handed out
        self.stopped = False  # a stop string was found: the text is final

    def add(self, ids: list[int]) -> str:
        """Append tokens; return the newly showable text ('' while held back)."""
        if self.stopped:
            return ""
        self.ids += ids
        text = self.tokenizer.decode(self.ids).rstrip("\ufffd")  # an incomplete character decodes as U+FFFD
        hits = [i for i in (text.find(s, self.emitted) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._emit(text, min(hits))
        return self._emit(text, len(text) - self._held(text))

    def finish(self) -> str:
        """The text still held back, once generation ends without a stop string (a sequence that
        really ends in an incomplete character shows U+FFFD)."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.ids)
        return self._emit(text, len(text))

    def _held(self, text: str) -> int:
        """Length of the longest suffix of text[emitted:] that is a prefix of a stop string."""
        tail = len(text) - self.emitted
        return max((n for s in self.stop for n in range(min(len(s) - 1, tail), 0, -1) if text.endswith(s[:n])),
                   default=0)  # fmt: skip

    def _emit(self, text: str, end: int) -> str:
        piece = text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return piece
