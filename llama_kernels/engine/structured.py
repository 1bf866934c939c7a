"""Structured outputs: a request's Grammar compiled by llguidance into a per-sequence matcher that
gives each step's token bitmask (applied to the batch's logits by sampling.apply_bitmask) and consumes
the sampled tokens. Compiled grammars are cached per (kind, spec); each request gets a copy."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict

import torch

from .sampling import Grammar

MAX_CACHED = 256  # compiled grammars kept (least recently used dropped)
# JSON whitespace: none between tokens, as OpenAI's structured outputs; keeps small models from rambling in spaces
_JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarCompiler:
    """Compiles Grammars for one tokenizer. Args: tokenizer: llama_kernels' Tokenizer (its
    `tokenizers.Tokenizer` is handed to llguidance); vocab_size: the model's logits width;
    eos_ids: the tokens that end a sequence (the only ones a finished grammar allows)."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: tuple[int, ...]) -> None:
        try:
            import llguidance
        except ImportError as err:
            raise ValueError(f"structured outputs need llguidance ({err}): pip install 'llama-kernels[serve]'") from None
        self._llg = llguidance
        self.vocab_size = vocab_size
        self._tok = llguidance.LLTokenizer(tokenizer.tokenizer.to_str(), n_vocab=vocab_size, eos_token=list(eos_ids))
        self._executor = llguidance.LLExecutor()
        self._cache: OrderedDict[Grammar, object] = OrderedDict()  # Grammar -> a fresh LLMatcher to copy
        self._lock = threading.Lock()  # guards _cache

    def matcher(self, grammar: Grammar):
        """A new matcher at the start of `grammar`; ValueError (naming the problem) if it does not compile."""
        return self.compile(grammar).deep_copy()

    def compile(self, grammar: Grammar):
        """The cached matcher of `grammar` at its start (compiled on first use; thread-safe: a server
        compiles on its worker threads, the engine's thread then finds it here). Copy before use."""
        with self._lock:
            base = self._cache.get(grammar)
            if base is not None:
                self._cache.move_to_end(grammar)
                return base
        base = self._compile(grammar)  # outside the lock: llguidance releases the GIL while it compiles
        with self._lock:
            self._cache[grammar] = base
            if len(self._cache) > MAX_CACHED:
                self._cache.popitem(last=False)
        return base

    def _compile(self, grammar: Grammar):
        m = self._llg.LLMatcher
        if grammar.kind == "json":
            try:
                schema = json.loads(grammar.spec) if grammar.spec else {"type": "object"}
            except json.JSONDecodeError as err:
                raise ValueError(f"grammar: the JSON schema is not valid JSON: {err}") from None
            source = m.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        elif grammar.kind == "regex":
            source = m.grammar_from_regex(grammar.spec)
        elif grammar.kind == "lark":
            source = m.grammar_from_lark(grammar.spec)
        else:
            raise ValueError(f"grammar: kind={grammar.kind!r}; expected 'json', 'regex' or 'lark'")
        is_error, messages = m.validate_grammar_with_warnings(source, self._tok)
        if is_error:
            raise ValueError(f"grammar: {grammar.kind} does not compile: {messages[0] if messages else '?'}")
        matcher = m(self._tok, source, log_level=0)
        if matcher.is_error():
            raise ValueError(f"grammar: {grammar.kind} does not compile: {matcher.get_error()}")
        return matcher

    def fill_bitmask(self, matchers: list) -> torch.Tensor:
        """The next-token bitmask [len(matchers), ceil(V / 32)] int32 of each matcher (CPU)."""
        words = (self.vocab_size + 31) // 32
        bitmask = torch.full((len(matchers), words), -1, dtype=torch.int32)
        if matchers:  # llguidance's thread pool fills the rows in parallel, without the GIL
            self._executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bitmask.data_ptr(),
                                                   words * 4, len(matchers))  # fmt: skip
        return bitmask
