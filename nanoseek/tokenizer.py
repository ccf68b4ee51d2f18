"""Tokenizers in Hugging Face format: `tokenizer.json` (the `tokenizers` library) plus `tokenizer_config.json`
(special tokens and the jinja `chat_template`), so that real DeepSeek tokenizers load unchanged.

The chat template is rendered the way transformers' `apply_chat_template` renders it (a sandboxed jinja
environment with `trim_blocks` and `lstrip_blocks`, `raise_exception` and `strftime_now`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _RustTokenizer

from .r1 import ASSISTANT, CHAT_TEMPLATE, SYSTEM, TAGS, USER

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# transformers 5 writes the chat template to its own file (and named ones to a directory), which then take
# priority over `chat_template` in tokenizer_config.json (`tokenization_utils_base.py`)
CHAT_TEMPLATE_FILE, CHAT_TEMPLATE_DIR = "chat_template.jinja", "additional_chat_templates"
BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE = "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"
# Fill-in-the-middle tokens by family, each (before the prefix, before the suffix, where the middle goes), in
# prefix-suffix-middle order: DeepSeek's (the DeepSeek-Coder README; in the V3 vocabulary too), Qwen2.5-Coder's
# (nanoseek's own), StarCoder's
FIM_TOKENS = [("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"), (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE),
              ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")]
SPECIAL_TOKENS = [BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE]
MIN_BPE_VOCAB = 256 + len(SPECIAL_TOKENS) + len(TAGS)  # every byte, then the special and tag tokens


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE over `texts` with nanoseek's special tokens and chat template; BOS added on encode."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < MIN_BPE_VOCAB:
        raise ValueError(f"vocab_size = {vocab_size}: a byte-level BPE needs at least {MIN_BPE_VOCAB} "
                         f"(256 bytes and {MIN_BPE_VOCAB - 256} special tokens)")
    backend = _RustTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(TAGS), special_tokens=SPECIAL_TOKENS,
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAGS])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, backend.token_to_id(BOS))])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
              "chat_template": CHAT_TEMPLATE, "model_max_length": 1 << 30, "clean_up_tokenization_spaces": False}
    return Tokenizer(backend, config)


def _byte_of_char() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's): printable bytes stand for themselves, the other bytes for the
    characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


_BYTE_OF_CHAR = _byte_of_char()
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _token_text(value: Any) -> str | None:
    """tokenizer_config stores special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _template_files(path: Path) -> dict[str, str]:
    """The chat templates saved as files beside the tokenizer: name -> template (the main one is "default")."""
    files = {"default": path / CHAT_TEMPLATE_FILE} if (path / CHAT_TEMPLATE_FILE).exists() else {}
    if (path / CHAT_TEMPLATE_DIR).is_dir():
        files.update({file.stem: file for file in sorted((path / CHAT_TEMPLATE_DIR).glob("*.jinja"))})
    templates = {}
    for name, file in files.items():
        try:
            templates[name] = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    return templates


class Tokenizer:
    def __init__(self, tokenizer: _RustTokenizer, config: dict[str, Any] | None = None):
        self.backend = tokenizer
        self.config = dict(config or {})

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer | None:
        """The tokenizer saved in a checkpoint directory, or None when it has none."""
        path = Path(path)
        if not (path / TOKENIZER_FILE).exists():
            return None
        try:
            backend = _RustTokenizer.from_file(str(path / TOKENIZER_FILE))
        except Exception as exc:  # the Rust library raises a bare Exception
            raise ValueError(f"{path / TOKENIZER_FILE}: cannot load tokenizer ({exc})") from exc
        config: dict[str, Any] = {}
        if (path / TOKENIZER_CONFIG_FILE).exists():
            try:
                config = json.loads((path / TOKENIZER_CONFIG_FILE).read_text())
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path / TOKENIZER_CONFIG_FILE}: not valid JSON (line {exc.lineno}: {exc.msg})") \
                    from exc
        templates = _template_files(path)
        if templates:
            config["chat_template"] = templates["default"] if list(templates) == ["default"] else templates
        return cls(backend, config)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / TOKENIZER_FILE))
        (path / TOKENIZER_CONFIG_FILE).write_text(json.dumps(self.config, indent=2, ensure_ascii=False) + "\n")

    # ---- ids and text ----------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # the batch call releases the GIL (a single `encode` holds it throughout): a server thread that encodes
        # a long prompt leaves the event loop answering other clients
        return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def fim_prompt(self, prefix: str, suffix: str) -> str | None:
        """The fill-in-the-middle prompt for the first family of FIM tokens this vocabulary has; None if none."""
        for before_prefix, before_suffix, middle in FIM_TOKENS:
            if all(self.token_id(t) is not None for t in (before_prefix, before_suffix, middle)):
                return f"{before_prefix}{prefix}{before_suffix}{suffix}{middle}"
        return None

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a byte-level piece may be part of a UTF-8 character), as OpenAI's
        logprobs report them."""
        piece = self.backend.id_to_token(token_id)
        if piece is None:
            return b""
        if token_id in self._added_ids:
            return self.backend.decode([token_id], skip_special_tokens=False).encode()
        if type(self.backend.decoder).__name__ == "ByteLevel":
            return bytes(_BYTE_OF_CHAR[c] for c in piece)
        # SentencePiece: a byte-fallback token `<0xE6>` is that byte, and U+2581 marks a space
        byte = _BYTE_TOKEN.fullmatch(piece)
        return bytes([int(byte.group(1), 16)]) if byte else piece.replace("\u2581", " ").encode()

    @cached_property
    def _added_ids(self) -> set[int]:
        return set(self.backend.get_added_tokens_decoder())

    def special_token(self, name: str) -> str | None:
        return _token_text(self.config.get(name))

    @property
    def eos_token_id(self) -> int | None:
        return self.token_id(self.special_token("eos_token"))

    @property
    def bos_token_id(self) -> int | None:
        return self.token_id(self.special_token("bos_token"))

    @property
    def pad_token_id(self) -> int | None:
        return self.token_id(self.special_token("pad_token"))

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    # ---- chat ------------------------------------------------------------------------------
    @property
    def chat_template(self) -> str | None:
        template = self.config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = {t.get("name"): t.get("template") for t in template}
        if isinstance(template, dict):  # named templates read from files
            template = template.get("default")
        return template

    @cached_property
    def _compiled_template(self):
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ValueError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda value, indent=None, **_: json.dumps(value, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(self.chat_template)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render a conversation to the prompt text with the tokenizer's chat template (from chat_template.jinja
        or tokenizer_config.json)."""
        if not self.chat_template:
            raise ValueError(f"this tokenizer has no chat template ({CHAT_TEMPLATE_FILE} or `chat_template` in "
                             f"{TOKENIZER_CONFIG_FILE})")
        from jinja2 import TemplateError

        specials = {name: self.special_token(name) for name in
                    ("bos_token", "eos_token", "pad_token", "unk_token") if self.special_token(name) is not None}
        try:
            return self._compiled_template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                  **specials, **kwargs)
        except TemplateError as exc:  # a template that cannot render this conversation
            raise ValueError(f"chat template: {exc}") from exc


class IncrementalDetokenizer:
    """Text of a growing token sequence, emitted in pieces that never split a multi-byte character.

    Decoding the last few tokens against the ones before them (not token by token) keeps the spacing of
    tokenizers that strip or merge leading spaces; a piece ending in U+FFFD waits for the next token.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids = list(prompt_ids[-6:])  # a little context for the first piece's spacing
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def push(self, token_id: int) -> str:
        """Add one token; return the new text it completes (possibly empty)."""
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset: self.read_offset], self.skip)
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], self.skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""

    def flush(self) -> str:
        """The text still held back, once the sequence has ended (an unfinished character shows as U+FFFD)."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset: self.read_offset], self.skip)
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], self.skip)
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):] if len(full) > len(prefix) else ""
