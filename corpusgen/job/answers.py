"""Engine results → output rows: the status of each row (ok, truncated, schema_invalid, error), the
answer parsed and validated against ``output.schema``/``output.regex``, its typed column values,
and the job's constraint bound to the engine's tokenizer. Never repairs an answer.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from corpusgen.job.columns import typed_fields, typed_values
from corpusgen.engine.api import Result
from corpusgen.job.events import JobWarning
from corpusgen.job.prompts import Prompt
from corpusgen.job.spec import JobSpec
from corpusgen.job.writer import OutputRow


def strip_fence(text: str) -> str:
    t = text.strip()
    if t.startswith("```") and t.endswith("```") and len(t) >= 6:
        t = t[3:-3]
        t = t[t.index("\n") + 1:] if "\n" in t else t  # drop a language tag such as ```json
    return t.strip()


class RowMaker:
    """Engine results → output rows (status mapping, parsing and validation of the answer, typed
    values). Never repairs: a cut answer is ``truncated``, an answer that does not validate is
    ``schema_invalid``, and both keep the raw text."""

    def __init__(self, schema: Any, run_id: str, *, regex: str | None = None, labels: Sequence[str] | None = None,
                 typed: Sequence[Any] = (), grammar: Any = None):
        self.run_id = run_id
        self.validator = None
        if schema is not None:
            import jsonschema

            self.validator = jsonschema.validators.validator_for(schema)(schema)
        self.labels = frozenset(labels) if labels else None  # an enum-only schema: the answer is a bare label
        self.regex = python_regex(regex)
        self.typed = typed
        self.grammar = grammar  # corpusgen.job.structured.Grammar when decoding is constrained

    def decided(self, p: Prompt) -> OutputRow:
        return OutputRow(key=p.key, status=p.status, error=p.error, prompt_tokens=p.prompt_tokens,
                         run_id=self.run_id)

    def from_result(self, r: Result, p: Prompt) -> OutputRow:
        base = dict(key=r.key, text=r.text, finish_reason=r.finish_reason, prompt_tokens=r.prompt_tokens,
                    gen_tokens=len(r.token_ids), prompt_cut=p.cut_tokens, run_id=self.run_id)
        failed = self.grammar.pop_error(r.key) if self.grammar is not None else None
        if r.error is not None or r.finish_reason == "error":
            return OutputRow(status="error", error=r.error or "engine error", **base)
        if r.finish_reason == "length":
            # never repaired: a cut answer is reported as such, with or without a schema
            return OutputRow(status="truncated", **base)
        why = f"constrained decoding failed ({failed}); " if failed else ""
        if self.regex is not None and not self.regex.fullmatch(r.text):
            return OutputRow(status="schema_invalid", error=f"{why}does not match output.regex", **base)
        if self.validator is None:
            return OutputRow(status="ok", **base)
        try:
            value = self._value(r.text)
        except ValueError as e:
            return OutputRow(status="schema_invalid", error=f"{why}not JSON: {e}", **base)
        err = next(iter(self.validator.iter_errors(value)), None)
        if err is not None:
            where = "/".join(str(x) for x in err.absolute_path) or "(root)"
            return OutputRow(status="schema_invalid", error=f"{why}{where}: {err.message}", **base)
        typed, problems = typed_values(value, self.typed)
        return OutputRow(status="ok", json=json.dumps(value, ensure_ascii=False, separators=(",", ":")),
                         typed=typed, error="; ".join(problems) or None, **base)

    def _value(self, text: str) -> Any:
        if self.labels is not None and text.strip() in self.labels:
            return text.strip()
        return json.loads(strip_fence(text))


def python_regex(regex: str | None):
    """``output.regex`` for re-checking answers; None when Python's ``re`` cannot read the pattern
    (llguidance's Rust syntax is a little different: the constraint alone then guarantees it)."""
    if regex is None:
        return None
    import re

    try:
        return re.compile(regex)
    except re.error:
        return None


def answer_format(spec: JobSpec):
    """The constraint and typed columns of ``spec.output``, checked before the engine loads."""
    if spec.output.schema is None and spec.output.regex is None:
        return None, []
    from corpusgen.job.structured import compile_constraint

    return compile_constraint(spec.output.schema, spec.output.regex), typed_fields(spec.output.schema)


def bind_grammar(constraint: Any, engine: Any, emit) -> Any:
    """The constraint bound to the engine's tokenizer, or None (no constraint, or a tokenizer that
    cannot constrain: then answers are only validated, and a warning says so)."""
    if constraint is None:
        return None
    for note in constraint.notes:
        emit(JobWarning(message=f"output.schema: constrained decoding is looser than the schema ({note}); "
                                "answers are still validated, rows that break it are schema_invalid"))
    tok = engine.tokenizer
    eos = tuple(engine.eos_token_ids)
    if tok.hf is None or not eos:
        emit(JobWarning(message=f"{tok.name}: this tokenizer cannot drive "
                                "constrained decoding; answers are validated only"))
        return None
    from corpusgen.job.structured import Grammar

    return Grammar(constraint, tok, eos_ids=eos)
