"""Incremental detokenization of one request's output: text is handed out piece by piece, never
ending inside a UTF-8 character and never showing any part of a stop string."""

from __future__ import annotations

MAX_OPEN = 8  # tokens the window stays open for an incomplete character (one is at most 4 bytes)


class Detokenizer:
    """Decodes a growing list of token ids and returns, after each addition, the text that is safe
    to show: the decoded text minus a trailing incomplete UTF-8 character (decoded as U+FFFD) and
    minus its longest suffix that is a prefix of a stop string. When a stop string appears, the
    text ends right before it (`stopped` becomes True) and nothing after it is ever shown. With
    min_tokens (vLLM v1's semantics) no stop string counts until more than min_tokens tokens were
    added, and then only one that ends in the text of those later tokens.

    Each addition decodes only a window (like vLLM's prefix/read offsets): the tokens since the text last ended on
    a whole character, in the context of the tokens before them back to the previous such point, so a step costs
    the same at any output length. Relies on decode(ids + more) starting with decode(ids) (byte-level BPE
    decoders do), also for the windows. A window still open after MAX_OPEN tokens holds bytes that are no
    character (the model's output is invalid UTF-8 there): it closes, its U+FFFD shown, so a step's cost
    stays bounded whatever the output.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), skip_special_tokens: bool = True,
                 include_stop: bool = False, min_tokens: int = 0) -> None:  # fmt: skip
        self.tokenizer = tokenizer  # anything with decode(list[int]) -> str (and skip_special_tokens=False)
        self.stop = tuple(stop)  # stop strings
        self.skip_special_tokens = skip_special_tokens  # leave special tokens out of the text
        self.include_stop = include_stop  # the text ends after the stop string (vLLM's include_stop_str_in_output)
        self.min_tokens = min_tokens  # tokens whose text no stop string may end in
        self.ids: list[int] = []  # tokens so far
        self.text = ""  # the decoded text of ids[:read], which ends on a whole character
        self.prefix = 0  # ids[prefix:read]: the context the tokens after read are decoded in
        self.read = 0  # tokens whose text is in self.text
        self.emitted = 0  # characters of the decoded text already handed out
        self.stopped = False  # a stop string was found: the text is final
        self.unchecked = 0  # characters of the text of the first min_tokens tokens (no stop string ends in them)

    def add(self, ids: list[int]) -> str:
        """Append tokens; return the newly showable text ('' while held back)."""
        if self.stopped:
            return ""
        if len(self.ids) < self.min_tokens < len(self.ids) + len(ids):  # the first min_tokens tokens on their own
            k = self.min_tokens - len(self.ids)
            return self.add(ids[:k]) + self.add(ids[k:])
        self.ids += ids
        tail = self._tail()
        incomplete = tail.endswith("\ufffd")  # an incomplete character decodes as U+FFFD
        if incomplete and len(self.ids) - self.read <= MAX_OPEN:  # the window stays open
            text = self.text + tail.rstrip("\ufffd")
        else:
            self.text += tail
            self.prefix, self.read = self.read, len(self.ids)
            text = self.text
        if len(self.ids) <= self.min_tokens:
            self.unchecked = len(text)
            return self._emit(text, len(text) - self._held(text))  # (what may start a later match stays held)
        hits = [(i, len(s)) for s in self.stop
                if (i := text.find(s, max(self.emitted, self.unchecked - len(s) + 1))) >= 0]  # fmt: skip
        if hits:
            self.stopped = True
            at, length = min(hits)
            return self._emit(text, at + length if self.include_stop else at)
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
        context = self._decode(self.ids[self.prefix : self.read]) if self.read > self.prefix else ""
        return self._decode(self.ids[self.prefix :])[len(context) :]

    def _decode(self, ids: list[int]) -> str:
        if self.skip_special_tokens:
            return self.tokenizer.decode(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _held(self, text: str) -> int:
        """Length of the longest suffix of text[emitted:] that is a prefix of a stop string."""
        tail = len(text) - self.emitted
        return max((n for s in self.stop for n in range(min(len(s) - 1, tail), 0, -1) if text.endswith(s[:n])),
                   default=0)  # fmt: skip

    def _emit(self, text: str, end: int) -> str:
        piece = text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return piece
