"""Tokenizer: a `tokenizers.Tokenizer` with the model's BOS rule and chat template.

Built from a Hugging Face directory (tokenizer.json, tokenizer_config.json or
chat_template.jinja) or from a GGUF file's byte-level BPE vocabulary, merges and template.
Encoding never relies on the tokenizer's post-processor: BOS is prepended here, once, when the
model expects it, so a chat template that writes BOS itself still yields exactly one.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path

from .errors import CheckpointError, check_not_lfs_pointer

# Pre-tokenizer splits of the byte-level GGUF vocabularies (llama.cpp's `tokenizer.ggml.pre`).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3", "smaug-bpe")
_GPT2_PRE = ("gpt2", "default")
_SMOLLM_PRE = ("smollm",)


class Tokenizer:
    """encode / decode / apply_chat_template over a `tokenizers.Tokenizer`.

    Args:
        tokenizer: the `tokenizers.Tokenizer`.
        bos_token, eos_token: their strings (for chat templates), or None.
        add_bos: whether a sequence starts with BOS.
        chat_template: Jinja source of the chat template, or None.
    """

    def __init__(self, tokenizer, bos_token: str | None, eos_token: str | None, add_bos: bool,
                 chat_template: str | None) -> None:  # fmt: skip
        self.tokenizer = tokenizer  # tokenizers.Tokenizer
        self.bos_token = bos_token  # e.g. "<|begin_of_text|>", or None
        self.eos_token = eos_token  # e.g. "<|eot_id|>", or None
        self.bos_id = tokenizer.token_to_id(bos_token) if bos_token is not None else None  # int or None
        self.add_bos = add_bos and self.bos_id is not None  # prepend BOS to every encoded sequence
        self.chat_template = chat_template  # Jinja source, or None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with BOS first when the model expects one (special tokens in text are parsed)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if self.add_bos and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of `messages` ([{"role": ..., "content": ...}]) rendered by the chat template."""
        text = self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )
        return self.encode(text)

    @cached_property
    def _template(self):
        """The chat template, compiled once (compiling costs ~20x a render of a short chat)."""
        if self.chat_template is None:
            raise ValueError("chat=True: this model has no chat template (tokenizer_config.json or GGUF metadata)")
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
        return env.from_string(self.chat_template)

    @cached_property
    def max_token_bytes(self) -> int:
        """An upper bound on the UTF-8 bytes of text one token stands for (the longest token string of the
        vocabulary, whose byte-level or sentencepiece spelling is never shorter than the text): a text of
        n bytes has at least ceil(n / max_token_bytes) tokens, which bounds a prompt without encoding it."""
        return max(len(t.encode()) for t in self.tokenizer.get_vocab(with_added_tokens=True))

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_hf_dir(cls, path: Path, bos_token_id: int | None) -> Tokenizer | None:
        """From tokenizer.json (+ tokenizer_config.json, chat_template.jinja); None without tokenizer.json."""
        from tokenizers import Tokenizer as HFTokenizer

        file = path / "tokenizer.json"
        if not file.exists():
            return None
        check_not_lfs_pointer(file)
        tok = HFTokenizer.from_file(str(file))
        cfg = {}
        cfg_file = path / "tokenizer_config.json"
        if cfg_file.exists():
            check_not_lfs_pointer(cfg_file)
            cfg = json.loads(cfg_file.read_text())
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja_file = path / "chat_template.jinja"
        if template is None and jinja_file.exists():
            template = jinja_file.read_text()
        bos = _token_str(cfg.get("bos_token"))
        if bos is None and bos_token_id is not None:
            bos = tok.id_to_token(bos_token_id)
        if "add_bos_token" in cfg:
            add_bos = bool(cfg["add_bos_token"])
        else:  # the post-processor's behaviour (Llama 3's TemplateProcessing adds BOS)
            probe = tok.encode("a", add_special_tokens=True).ids
            add_bos = bos is not None and probe[:1] == [tok.token_to_id(bos)]
        return cls(tok, bos, _token_str(cfg.get("eos_token")), add_bos, template)

    @classmethod
    def from_gguf(cls, meta: dict, file: Path) -> Tokenizer:
        """From GGUF metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`): byte-level BPE only."""
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise CheckpointError(
                f"{file}: tokenizer.ggml.model={kind!r}; only byte-level BPE ('gpt2', Llama 3 and SmolLM) "
                "vocabularies are supported: use the model's Hugging Face directory instead"
            )
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre in _SMOLLM_PRE:
            pre_tok = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False)])  # fmt: skip
        elif pre in _LLAMA3_PRE:
            pre_tok = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        elif pre in _GPT2_PRE:
            pre_tok = pre_tokenizers.ByteLevel(add_prefix_space=False)
        else:
            supported = sorted(_SMOLLM_PRE + _LLAMA3_PRE + _GPT2_PRE)
            raise CheckpointError(f"{file}: tokenizer.ggml.pre={pre!r} is not supported; supported: {supported}")
        tokens = meta["tokenizer.ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        vocab = {t: i for i, t in enumerate(tokens)}
        tok = HFTokenizer(models.BPE(vocab, merges, ignore_merges=pre in _LLAMA3_PRE))
        tok.pre_tokenizer = pre_tok
        tok.decoder = decoders.ByteLevel()
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind in zip(tokens, types) if kind == 3])  # 3: control  # fmt: skip
        tok.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, kind in zip(tokens, types) if kind == 4])  # 4: user-defined  # fmt: skip

        def token(key: str) -> str | None:
            index = meta.get(f"tokenizer.ggml.{key}")
            return tokens[index] if index is not None else None

        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))
        return cls(tok, token("bos_token_id"), token("eos_token_id"), add_bos, meta.get("tokenizer.chat_template"))


def _token_str(token) -> str | None:
    """A tokenizer_config special token: a string, {"content": ...} or None."""
    return token.get("content") if isinstance(token, dict) else token
