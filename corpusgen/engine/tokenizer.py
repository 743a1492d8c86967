"""The model's tokenizer: an HF fast tokenizer behind the few methods corpusgen needs.

Loaded from an HF checkpoint directory or from a GGUF file's embedded vocabulary, always offline
(local files only; a model hub is never contacted). Chat prompts use the model's own chat
template; row text is untrusted, so control tokens inside it (a document that contains
``<|im_end|>``) are encoded as plain text, never as the control token.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

from corpusgen import envs
from corpusgen.errors import ModelError

# End-of-turn markers of common chat templates; one that the template writes ends a row too
# (instruct models stop with it, and their generation_config lists it as EOS).
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|end_of_text|>", "</s>")


class Tokenizer:
    """Encode, decode and build chat prompts for one model."""

    def __init__(self, hf: Any, *, name: str, extra_eos: Sequence[int] = ()) -> None:
        self.hf = hf
        """The wrapped transformers tokenizer (for structured decoding's vocabulary export)."""
        self.name = name
        ids: list[int] = []
        if hf.eos_token_id is not None:
            ids.append(int(hf.eos_token_id))
        ids += [int(t) for t in extra_eos]
        template = hf.chat_template if isinstance(hf.chat_template, str) else ""
        vocab = hf.get_vocab()
        ids += [vocab[tok] for tok in END_OF_TURN if tok in template and tok in vocab]
        self._eos = tuple(dict.fromkeys(ids))  # ordered, unique

    # ---------------------------------------------------------------- properties
    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Tokens that end a row: the EOS token, generation_config's EOS list, end-of-turn tokens."""
        return self._eos

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's pad token, else the first EOS token (padded slots are never attended)."""
        if self.hf.pad_token_id is not None:
            return int(self.hf.pad_token_id)
        assert self._eos, f"{self.name}: tokenizer has neither pad nor eos token"
        return self._eos[0]

    @property
    def vocab_size(self) -> int:
        """Tokens the tokenizer can produce (added tokens included; the model may pad beyond)."""
        return len(self.hf)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.hf.chat_template)

    # ---------------------------------------------------------------- encoding
    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; BOS is added only where the model's tokenizer adds it."""
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` with special tokens dropped."""
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def chat_prompt(self, system: str | None, user: str) -> list[int]:
        """The prompt for one user turn, ending where the assistant's answer begins.

        Without a chat template (OPT), the prompt is BOS + ``system\\n\\nuser``.
        """
        if not self.has_chat_template:
            text = f"{system}\n\n{user}" if system else user
            ids = self._encode_untrusted(text)
            bos = self.hf.bos_token_id
            return [bos, *ids] if bos is not None else ids
        messages = [{"role": "user", "content": user}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        try:
            return self._apply_template(messages)
        except Exception as e:  # jinja raise_exception(): some templates refuse a system turn
            if system is None:
                raise ModelError(f"{self.name}: the chat template failed ({e})") from None
            merged = [{"role": "user", "content": f"{system}\n\n{user}"}]
            return self._apply_template(merged)

    def _apply_template(self, messages: list[dict[str, str]]) -> list[int]:
        try:
            out = self.hf.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False,
                sanitize_control_tokens=True,
            )
        except TypeError:  # transformers without sanitize_control_tokens (< 5.x)
            text = self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return self.hf.encode(text, add_special_tokens=False)
        return list(out)

    def _encode_untrusted(self, text: str) -> list[int]:
        try:
            return list(self.hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
        except TypeError:
            return self.encode(text, add_special_tokens=False)

    # ---------------------------------------------------------------- identity
    def fingerprint(self) -> str:
        """sha256 of the vocabulary, special tokens and chat template (stable across runs)."""
        vocab = sorted(self.hf.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
        special = sorted(str(t) for t in self.hf.all_special_tokens)
        blob = json.dumps({"vocab": vocab, "special": special, "bos": self.hf.bos_token_id,
                           "eos": list(self._eos), "template": self.hf.chat_template or ""},
                          ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab={self.vocab_size}, eos={self._eos})"


def load_tokenizer(source: str | Path) -> Tokenizer:
    """The tokenizer of an HF checkpoint directory, a .gguf file or ``default``."""
    from corpusgen.engine.weights import resolve_source

    path = resolve_source(source)
    if path is None:
        raise ModelError(f"{source}: a preset has no tokenizer; give an HF checkpoint directory "
                         "or a .gguf file")
    st = path.stat()
    return _load(str(path.resolve()), st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _load(path_str: str, mtime_ns: int) -> Tokenizer:
    # Cached: building a tokenizer from a GGUF vocabulary takes seconds.
    path = Path(path_str)
    from transformers import AutoTokenizer

    from corpusgen.engine.weights import generation_eos

    extra_eos: tuple[int, ...] = ()
    with envs.hf_offline():
        try:
            if path.is_dir():
                hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
                extra_eos = generation_eos(path)
            elif path.suffix == ".gguf":
                hf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
            else:
                raise ModelError(f"{path}: not a model; give an HF checkpoint directory or a .gguf file")
        except ModelError:
            raise
        except Exception as e:
            raise ModelError(f"{path}: cannot load the tokenizer ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); the checkpoint needs "
                             "tokenizer.json or tokenizer_config.json") from None
    if not getattr(hf, "is_fast", False):
        raise ModelError(f"{path}: only fast (tokenizer.json) tokenizers are supported")
    return Tokenizer(hf, name=path.name, extra_eos=extra_eos)
