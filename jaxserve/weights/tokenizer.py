"""Text <-> token ids and chat rendering, over the `tokenizers` library.

Built from a GGUF's metadata (byte-level BPE) or a Hugging Face `tokenizer.json`; chat templates
render the way Hugging Face's `apply_chat_template` does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import (
    AddedToken,
    Regex,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)
from tokenizers import Tokenizer as BackendTokenizer

from jaxserve.errors import InvalidRequestError, UnsupportedModelError

# llama.cpp's names (`tokenizer.ggml.pre`) for the split regex of Llama-3-style vocabularies.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3")
# Qwen2/2.5/3 (llama.cpp's "qwen2"): Llama-3's regex with one digit per piece, after NFC as HF.
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_GPT2_PRE = ("default", "gpt2", "gpt-2")
TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 3, 4


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of each byte, the alphabet of byte-level BPE vocabularies."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    extra = (b for b in range(256) if b not in keep)
    spelling = {b: chr(b) for b in keep}
    spelling.update({b: chr(256 + i) for i, b in enumerate(extra)})
    return spelling


def _gguf_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # GPT-2 regex, but every digit stands alone (llama.cpp's SMOLLM)
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _GPT2_PRE:
        return byte_level
    if pre in _LLAMA3_PRE or pre == "qwen2":
        regex = _QWEN2_SPLIT if pre == "qwen2" else _LLAMA3_SPLIT
        split = pre_tokenizers.Split(Regex(regex), behavior="isolated")
        no_regex = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        return pre_tokenizers.Sequence([split, no_regex])
    raise UnsupportedModelError(f"unsupported GGUF pre-tokenizer tokenizer.ggml.pre={pre!r}")


def _compile_template(source: str) -> jinja2.Template:
    """Hugging Face's chat template environment: sandboxed, trimmed blocks, its helpers."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        # Jinja's own tojson escapes HTML characters; HF's does not.
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise UnsupportedModelError(f"chat template does not parse: {e}") from e


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json spells special tokens as strings or as AddedToken dicts."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """A model's tokenizer: ids, specials, and its chat template."""

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
        chat_template: str | None,
        template_tokens: Mapping[str, str | None] | None = None,
    ):
        self._tk = backend
        self._bos_token_id = bos_token_id
        self._eos_token_ids = tuple(dict.fromkeys(int(i) for i in eos_token_ids))
        added = backend.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, tok in added.items() if tok.special)
        # Whether BOS gets added is the post-processor's business (TemplateProcessing or none).
        probe = backend.encode("a", add_special_tokens=True).ids
        self._add_bos = bos_token_id is not None and probe[:1] == [bos_token_id]
        self._template_source = chat_template or None
        self._template = _compile_template(chat_template) if chat_template else None
        if template_tokens is None:
            first_eos = self._eos_token_ids[0] if self._eos_token_ids else None
            template_tokens = {"bos_token": self._token(bos_token_id)}
            template_tokens["eos_token"] = self._token(first_eos)
        self._template_tokens = dict(template_tokens)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """Rebuild the tokenizer llama.cpp would use from `tokenizer.ggml.*` metadata."""
        kind = meta.get("tokenizer.ggml.model")
        arch = meta.get("general.architecture")
        if kind == "llama" and arch == "gemma3":
            return cls._from_gemma_gguf(meta)
        if kind != "gpt2":
            raise UnsupportedModelError(
                f"unsupported GGUF tokenizer tokenizer.ggml.model={kind!r} for {arch!r}; "
                "supported: 'gpt2' (byte-level BPE), and 'llama' (SentencePiece) for gemma3"
            )
        spelling = _bytes_to_unicode()
        alphabet = set(spelling.values())
        tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
        # Tokens outside the byte alphabet are stored as text; spell them byte by byte.
        spelled = [
            t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))
            for t in tokens
        ]
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", ())]
        bpe = models.BPE(vocab={t: i for i, t in enumerate(spelled)}, merges=merges, fuse_unk=False)
        tk = BackendTokenizer(bpe)
        pre = meta.get("tokenizer.ggml.pre", "default")
        tk.pre_tokenizer = _gguf_pre_tokenizer(pre)
        if pre == "qwen2":
            tk.normalizer = normalizers.NFC()
        tk.decoder = decoders.ByteLevel()
        types = list(meta.get("tokenizer.ggml.token_type", ()))
        # A "control" token spelled outside the byte alphabet is a llama.cpp mislabel (HF skips it).
        tk.add_special_tokens(
            [
                AddedToken(t, special=True, normalized=False)
                for t, ty in zip(tokens, types, strict=False)
                if ty == TOKEN_TYPE_CONTROL and set(t) <= alphabet
            ]
        )
        tk.add_tokens(
            [
                AddedToken(t, special=False, normalized=False)
                for t, ty in zip(tokens, types, strict=False)
                if ty == TOKEN_TYPE_USER_DEFINED and set(t) <= alphabet
            ]
        )
        return cls._finish_gguf(tk, tokens, meta)

    @classmethod
    def _from_gemma_gguf(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """Gemma's SentencePiece vocabulary as a byte-fallback BPE, as transformers reads it.

        The file has no merges: they are every split of a token into two tokens, best first by
        the merged token's position in the file (Gemma's scores do not follow its merge order).
        Tokens of only spaces are stored as spaces; the vocabulary spells them with "▁".
        """
        tokens = [
            "\u2581" * len(t) if " " in t and not t.strip() else t
            for t in meta["tokenizer.ggml.tokens"]
        ]
        vocab = {t: i for i, t in enumerate(tokens)}
        merges = []
        for merged, rank in vocab.items():
            splits = [
                (merged[:k], merged[k:])
                for k in range(1, len(merged))
                if merged[:k] in vocab and merged[k:] in vocab
            ]
            splits.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
            merges += [(rank, -len(lr[0]), -len(lr[1]), n, lr) for n, lr in enumerate(splits)]
        merges.sort(key=lambda m: m[:4])
        bpe = models.BPE(
            vocab=vocab,
            merges=[m[-1] for m in merges],
            unk_token=tokens[int(meta.get("tokenizer.ggml.unknown_token_id", 3))],
            fuse_unk=True,
            byte_fallback=True,
        )
        tk = BackendTokenizer(bpe)
        tk.normalizer = normalizers.Replace(" ", "\u2581")
        tk.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        tk.decoder = decoders.Sequence(
            [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        )
        types = list(meta.get("tokenizer.ggml.token_type", ()))
        tk.add_special_tokens(
            [
                AddedToken(t, special=True, normalized=False)
                for t, ty in zip(tokens, types, strict=False)
                if ty == TOKEN_TYPE_CONTROL
            ]
        )
        tk.add_tokens(
            [
                AddedToken(t, special=False, normalized=False)
                for t, ty in zip(tokens, types, strict=False)
                if ty == TOKEN_TYPE_USER_DEFINED
            ]
        )
        # llama.cpp also stops on the end of a chat turn, which the file does not list as EOS.
        end_of_turn = vocab.get("<end_of_turn>")
        return cls._finish_gguf(tk, tokens, meta, [] if end_of_turn is None else [end_of_turn])

    @classmethod
    def _finish_gguf(
        cls,
        tk: BackendTokenizer,
        tokens: list[str],
        meta: Mapping[str, Any],
        extra_eos: Sequence[int] = (),
    ) -> Tokenizer:
        """BOS post-processor, stop ids and chat template, common to every GGUF tokenizer."""
        bos = meta.get("tokenizer.ggml.bos_token_id")
        if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
            tk.post_processor = processors.TemplateProcessing(
                single=f"{tokens[bos]}:0 $A:0",
                pair=f"{tokens[bos]}:0 $A:0 $B:1",
                special_tokens=[(tokens[bos], bos)],
            )
        eos = [meta.get(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
        return cls(
            tk,
            bos_token_id=bos,
            eos_token_ids=[*(i for i in eos if i is not None), *extra_eos],
            chat_template=meta.get("tokenizer.chat_template"),
        )

    @classmethod
    def from_hf_dir(cls, path: Path, eos_token_ids: Sequence[int] = ()) -> Tokenizer:
        """`tokenizer.json` plus `tokenizer_config.json` (specials, chat template) of a HF dir."""
        tk = BackendTokenizer.from_file(str(path / "tokenizer.json"))
        config_file = path / "tokenizer_config.json"
        tc = json.loads(config_file.read_text()) if config_file.is_file() else {}
        template = tc.get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default", next(iter(named.values()), None))
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        names = ("bos_token", "eos_token", "unk_token", "pad_token")
        strings = {name: _token_content(tc.get(name)) for name in names}
        eos_string = strings["eos_token"]
        eos_from_tokenizer = tk.token_to_id(eos_string) if eos_string else None
        bos_string = strings["bos_token"]
        return cls(
            tk,
            bos_token_id=tk.token_to_id(bos_string) if bos_string else None,
            eos_token_ids=[
                *eos_token_ids,
                *([] if eos_from_tokenizer is None else [eos_from_tokenizer]),
            ],
            chat_template=template,
            template_tokens=strings,
        )

    # ---- text <-> ids -------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids; special-token text such as `<|im_start|>` maps to its single id."""
        return self._tk.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
    ) -> str:
        """Render messages with the model's own template, as HF's `apply_chat_template`."""
        if self._template is None:
            raise InvalidRequestError("this model has no chat template", param="messages")
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                tools=tools,
                documents=None,
                **self._template_tokens,
            )
        except jinja2.TemplateError as e:  # raise_exception(...) in the template, usually
            raise InvalidRequestError(f"chat template error: {e}", param="messages") from e

    def _token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self._tk.id_to_token(token_id)

    # ---- properties ---------------------------------------------------------------------
    @property
    def backend(self) -> BackendTokenizer:
        """The wrapped `tokenizers.Tokenizer` (e.g. to save it as `tokenizer.json`)."""
        return self._tk

    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos_token_ids

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def add_bos(self) -> bool:
        return self._add_bos

    @property
    def special_token_ids(self) -> frozenset[int]:
        return self._special_ids

    @property
    def chat_template(self) -> str | None:
        return self._template_source
