"""Incremental detokenization of one request's output: text is handed out piece by piece, never
ending inside a UTF-8 character and never showing any part of a stop string."""

from __future__ import annotations

MAX_OPEN = 8  # tokens the window stays open for an incomplete character (one is at most 4 bytes)


class Detokenizer:
    """Decodes a growing list of token ids and returns, after each addition, the text that is safe
    to show: the decoded text minus a trailing incomplete UTF-8 character (decoded as U+FFFD) and
    minus its longest suffix that is a prefix of a stop string. When a stop string appears, the
    text ends right before it (`stopped` becomes True) and nothing after it is ever shown.

    Each addition decodes only a window (like vLLM's prefix/read offsets): the tokens since the text last ended on
    a whole character, in the context of the tokens before them back to the previous such point, so a step costs
    the same at any output length. Relies on decode(ids + more) starting with decode(ids) (byte-level BPE
    decoders do), also for the windows. A window still open after MAX_OPEN tokens holds bytes that are no
    character (the model's output is invalid UTF-8 there): it closes, its U+FFFD shown, so a step's cost
    stays bounded whatever the output.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer  # anything with decode(list[int]) -> str
        self.stop = tuple(stop)  # stop strings
        self.ids: list[int] = []  # tokens so far
        self.text = ""  # the decoded text of ids[:read], which ends on a whole character
        self.prefix = 0  # ids[prefix:read]: the context the tokens after read are decoded in
        self.read = 0  # tokens whose text is in self.text
        self.emitted = 0  # characters of the decoded text already handed out
        self.stopped = False  # a stop string was found: the text is final

    def add(self, ids: list[int]) -> str:
        """Append tokens; return the newly showable text ('' while held back)."""
        if self.stopped:
            return ""
        self.ids += ids
        tail = self._tail()
        incomplete = tail.endswith("\ufffd")  # an incomplete character decodes as U+FFFD
        if incomplete and len(self.ids) - self.read <= MAX_OPEN:  # the window stays open
            text = self.text + tail.rstrip("\ufffd")
        else:
            self.text += tail
            self.prefix, self.read = self.read, len(self.ids)
            text = self.text
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
        text = self.text + self._tail()
        return self._emit(text, len(text))

    def _tail(self) -> str:
        """The text of ids[read:], decoded after its context ids[prefix:read]."""
        context = self.tokenizer.decode(self.ids[self.prefix : self.read]) if self.read > self.prefix else ""
        return self.tokenizer.decode(self.ids[self.prefix :])[len(context) :]

    def _held(self, text: str) -> int:
        """Length of the longest suffix of text[emitted:] that is a prefix of a stop string."""
        tail = len(text) - self.emitted
        return max((n for s in self.stop for n in range(min(len(s) - 1, tail), 0, -1) if text.endswith(s[:n])),
                   default=0)  # fmt: skip

    def _emit(self, text: str, end: int) -> str:
        piece = text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return piece
