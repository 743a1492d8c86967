"""Prompt building: sandboxed templates, chat wrapping, row-level problems, the too-long policy."""

from __future__ import annotations

import pytest

from corpusgen.errors import TemplateError
from corpusgen.job.prompts import ELLIPSIS, PromptBuilder, compile_template
from corpusgen.job.spec import PromptSpec
from fake_engine import FakeTokenizer

TOK = FakeTokenizer()


def _builder(template="{{ title }}: {{ text }}", *, context=2048, max_new=16, **kw) -> PromptBuilder:
    return PromptBuilder(PromptSpec(template=template, **kw), TOK, max_context=context, max_new_tokens=max_new)


def test_render_and_chat_wrap():
    """The rendered user message goes through the tokenizer's chat template with the system prompt."""
    b = _builder(system="Be brief.")
    p = b.build("k", {"title": "T", "text": "hello"})
    assert p.status is None and p.ids == TOK.chat_prompt("Be brief.", "T: hello")
    assert p.prompt_tokens == len(p.ids) and b.variables == {"title", "text"}


def test_syntax_error_names_line():
    """A broken template fails before any row is read, with the line of the error."""
    with pytest.raises(TemplateError, match=r"prompt.template line 2: .*fix the Jinja2 syntax"):
        compile_template(PromptSpec(template="ok\n{{ text "))


def test_unknown_variable_names_it_and_lists_columns():
    """{{ body }} over a corpus without that column must say so and list the columns."""
    b = _builder("{{ body }} {{ text }}")
    with pytest.raises(TemplateError) as e:
        b.check_columns(["id", "text"])
    assert str(e.value) == "prompt.template uses {{ body }}, which is not an input column; columns: id, text"
    _builder("{% for w in text.split() %}{{ w }}{% endfor %}{{ range(2)|list }}").check_columns(["text"])


def test_null_and_empty_documents():
    """A null document is an error row; an empty document still runs; null elsewhere renders as ''."""
    b = _builder()
    p = b.build("k", {"title": "T", "text": None})
    assert p.status == "error" and p.ids is None and "document column 'text' is null" in p.error
    p = b.build("k", {"title": "T", "text": ""})
    assert p.status is None and p.ids == TOK.chat_prompt(None, "T: ")
    p = b.build("k", {"title": None, "text": "x"})
    assert p.status is None and p.ids == TOK.chat_prompt(None, ": x")


def test_non_utf8_value_is_a_row_error():
    """Bytes that are not UTF-8 (readers pass them as bytes) make one error row."""
    p = _builder().build("k", {"title": b"\xff", "text": "x"})
    assert p.status == "error" and "'title' is not valid UTF-8" in p.error


def test_sandbox_blocks_unsafe_access_per_row():
    """The sandbox refuses attribute tricks that come with a row (its text as a format string); that
    is the row's error, not the job's crash. (Tricks written in the template itself are refused when
    the job starts: tests/test_hostile_inputs.py.)"""
    p = _builder("{{ text.format(text) }}").build("k", {"text": "{0.__class__.__mro__}"})
    assert p.status == "error" and p.error.startswith("template: SecurityError")


def test_too_long_mark():
    """With too_long: mark a prompt that cannot fit is prompt_too_long and never sent."""
    b = _builder("{{ text }}", context=100, max_new=20)
    p = b.build("k", {"text": "x" * 200})
    assert p.status == "prompt_too_long" and p.ids is None and p.prompt_tokens > 80
    assert "limit is 80" in p.error
    assert b.build("k", {"text": "x" * 10}).status is None


def test_too_long_truncate_middle_keeps_head_and_tail():
    """truncate_middle cuts the middle of the document (marked with …) until prompt + generation fit."""
    b = _builder("Doc: {{ text }}", context=100, max_new=20, too_long="truncate_middle")
    text = "HEAD " + "m" * 300 + " TAIL"
    p = b.build("k", {"text": text})
    assert p.status is None and len(p.ids) <= 80 and p.cut_tokens > 0
    user = TOK.decode(p.ids)
    assert "Doc: HEAD" in user and "TAIL" in user and ELLIPSIS in user
    assert p.cut_tokens >= len(TOK.encode(text)) - 80


def test_truncate_middle_gives_up_when_the_rest_is_too_long():
    """When even an empty document cannot fit (long system prompt), the row is prompt_too_long."""
    b = _builder("{{ text }}", context=60, max_new=20, too_long="truncate_middle", system="s" * 100)
    assert b.build("k", {"text": "abc" * 50}).status == "prompt_too_long"
    b = _builder("{{ title }}", context=60, max_new=20, too_long="truncate_middle")
    assert b.build("k", {"title": "t" * 100, "text": "x"}).status == "prompt_too_long"
