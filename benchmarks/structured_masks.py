"""Grammar libraries on corpusgen's schemas: compile time, token-mask time, keyword coverage.

    python benchmarks/structured_masks.py                      # llguidance only
    /tmp/xgvenv/bin/python benchmarks/structured_masks.py      # also xgrammar, when importable

(a throwaway venv: ``python -m venv --system-site-packages /tmp/xgvenv && /tmp/xgvenv/bin/pip
install xgrammar``; xgrammar is not a corpusgen dependency). Every mask is computed along the same
token path: the SmolLM2 tokenisation of a valid answer, so both libraries do the same work.
One thread (the engine's mask worker runs beside the model), CPU times in µs, best of 5 passes after a warm-up (the
machine may be shared).
Prints one JSON line per (library, case) and a coverage table of JSON Schema keywords.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from corpusgen.engine.tokenizer import load_tokenizer
from corpusgen.engine.weights import default_model_path

EXTRACT = yaml.safe_load((REPO / "jobs/extract.yaml").read_text())["output"]["schema"]
CLASSIFY = yaml.safe_load((REPO / "jobs/classify.yaml").read_text())["output"]["schema"]
NESTED = {
    "type": "object", "additionalProperties": False, "required": ["title", "authors", "year", "scores"],
    "properties": {
        "title": {"type": "string", "maxLength": 80},
        "authors": {"type": "array", "items": {"type": "object", "required": ["name"], "additionalProperties": False,
                                                "properties": {"name": {"type": "string"},
                                                               "email": {"type": ["string", "null"]}}}},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
        "scores": {"type": "array", "items": {"type": "number"}, "maxItems": 4},
        "open_access": {"type": "boolean"},
    },
}
CASES = {
    "extract.yaml": ("json", EXTRACT, ('{"name": "numpy", "language": "Python", "license": "BSD-3-Clause", '
                                       '"kind": "library"}')),
    "classify.yaml": ("json", CLASSIFY, '{"category": "bug_report"}'),
    "nested": ("json", NESTED, ('{"title": "Attention is all you need", "authors": [{"name": "Ashish Vaswani", '
                                '"email": null}, {"name": "Noam Shazeer"}], "year": 2017, "scores": [0.9, 12.5], '
                                '"open_access": true}')),
    "labels (enum-only)": ("choice", ["billing", "account_access", "bug_report", "feature_request", "other_request",
                                      "software_package", "research_paper", "other"], "feature_request"),
    "regex (date)": ("regex", r"[0-9]{4}-[0-9]{2}-[0-9]{2}", "2024-06-30"),
}
# keyword → (schema, an instance that violates it): "enforced" means the library's masks cannot
# produce that instance; "NOT enforced" means it compiles but lets the violation through.
KEYWORDS = {
    "nested objects, arrays, enums, numbers, optional fields": (NESTED, '{"title": 5}'),
    "nullable union type: [string, null]": ({"type": ["string", "null"]}, "5"),
    "$ref / $defs": ({"$defs": {"a": {"type": "string"}}, "type": "object",
                      "properties": {"x": {"$ref": "#/$defs/a"}}}, '{"x": 5}'),
    "recursive $ref": ({"$defs": {"n": {"type": "object", "properties": {"c": {"type": "array", "items": {
        "$ref": "#/$defs/n"}}}}}, "$ref": "#/$defs/n"}, '{"c": [{"c": 5}]}'),
    "anyOf": ({"anyOf": [{"type": "string"}, {"type": "integer"}]}, "true"),
    "oneOf (overlapping branches)": ({"oneOf": [{"type": "number"}, {"type": "integer"}]}, "5"),
    "pattern": ({"type": "string", "pattern": "^[a-z]+$"}, '"ABC"'),
    "format: date-time": ({"type": "string", "format": "date-time"}, '"yesterday"'),
    "minLength / maxLength": ({"type": "string", "minLength": 2, "maxLength": 5}, '"abcdefg"'),
    "minimum / exclusiveMaximum": ({"type": "number", "minimum": 0, "exclusiveMaximum": 1}, "1"),
    "multipleOf": ({"type": "integer", "multipleOf": 3}, "4"),
    "minItems / maxItems": ({"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 3}, '["a"]'),
    "patternProperties": ({"type": "object", "patternProperties": {"^x": {"type": "integer"}}}, '{"x1": "s"}'),
    "additionalProperties: false": ({"type": "object", "properties": {"a": {"type": "integer"}},
                                     "additionalProperties": False}, '{"b": 1}'),
    "additional properties allowed (JSON Schema default)": ({"type": "object", "properties": {
        "a": {"type": "integer"}}}, None),
    "uniqueItems": ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "[1, 1]"),
    "not": ({"not": {"type": "string"}}, '"s"'),
    "if / then": ({"type": "object", "if": {"properties": {"a": {"const": 1}}}, "then": {"required": ["b"]}},
                  '{"a": 1}'),
}
# for the default-allows-extra case: an instance that is valid and must stay producible
_EXTRA_OK = '{"a": 1, "b": 2}'


def _best_us(fn, passes: int = 5) -> float:
    fn()  # warm-up: lazily built tables are not the steady state
    return min(_timed(fn) for _ in range(passes)) * 1e6


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


class LLG:
    name = "llguidance"

    def __init__(self, hf, eos):
        import llguidance
        import llguidance.hf
        from llguidance import LLExecutor, LLMatcher

        self.version = llguidance.__version__
        self.M, self.ex = LLMatcher, LLExecutor(1)
        t = time.perf_counter()
        self.tok = llguidance.hf.from_tokenizer(hf, eos_token=list(eos))
        self.tokenizer_s = time.perf_counter() - t
        self.words = (self.tok.vocab_size + 31) // 32

    def grammar(self, kind, spec):
        from corpusgen.job.structured import JSON_DEFAULTS

        if kind == "json":
            return self.M.grammar_from_json_schema(spec, defaults=JSON_DEFAULTS)
        if kind == "regex":
            return self.M.grammar_from_regex(spec)
        return self.M.grammar_from_lark("start: " + " | ".join(json.dumps(x) for x in spec))

    def compile(self, kind, spec):
        m = self.M(self.tok, self.grammar(kind, spec), log_level=0)
        assert not m.is_error(), m.get_error()
        return m

    def accepts(self, schema, ids) -> bool | str:
        err, msgs = self.M.validate_grammar_with_warnings(self.M.grammar_from_json_schema(schema))
        if err:
            return "refused: " + msgs[0].splitlines()[0][:70]
        m = self.M(self.tok, self.M.grammar_from_json_schema(schema), log_level=0)
        return m.consume_tokens(ids) and m.is_accepting()

    def walk(self, compiled, ids):
        m = compiled.deep_copy()
        bits = torch.empty((1, self.words), dtype=torch.int32)
        for t in ids:
            m.unsafe_compute_mask_ptr(bits.data_ptr(), self.words * 4)
            assert (bits[0, t // 32] >> (t % 32)) & 1, "path token not allowed"
            assert m.consume_token(t)

    def walk_batch(self, compiled, ids, n):
        ms = [compiled.deep_copy() for _ in range(n)]
        bits = torch.empty((n, self.words), dtype=torch.int32)
        for t in ids:
            self.ex.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(ms)], bits.data_ptr(), self.words * 4, n)
            assert all(self.ex.consume_token_par([(m, t) for m in ms]))


class XGR:
    name = "xgrammar"

    def __init__(self, hf, eos):
        import importlib.metadata

        import xgrammar as xgr

        self.xgr, self.version = xgr, importlib.metadata.version("xgrammar")
        t = time.perf_counter()
        self.info = xgr.TokenizerInfo.from_huggingface(hf, stop_token_ids=list(eos))
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self.tokenizer_s = time.perf_counter() - t

    def compile(self, kind, spec):
        if kind == "json":
            return self.compiler.compile_json_schema(json.dumps(spec), any_whitespace=True, max_whitespace_cnt=8)
        if kind == "regex":
            return self.compiler.compile_regex(spec)
        return self.compiler.compile_grammar("root ::= " + " | ".join(json.dumps(x) for x in spec))

    def accepts(self, schema, ids) -> bool | str:
        try:
            compiled = self.compiler.compile_json_schema(json.dumps(schema), strict_mode=False)
        except Exception as e:  # noqa: BLE001
            return "refused: " + str(e).splitlines()[0][:70]
        m = self.xgr.GrammarMatcher(compiled)
        return all(m.accept_token(t) for t in ids) and m.accept_token(self.info.stop_token_ids[0])

    def walk(self, compiled, ids):
        m = self.xgr.GrammarMatcher(compiled)
        bits = self.xgr.allocate_token_bitmask(1, self.info.vocab_size)
        for t in ids:
            m.fill_next_token_bitmask(bits, 0)
            assert (bits[0, t // 32] >> (t % 32)) & 1, "path token not allowed"
            assert m.accept_token(t)

    def walk_batch(self, compiled, ids, n):
        ms = [self.xgr.GrammarMatcher(compiled) for _ in range(n)]
        batch = self.xgr.BatchGrammarMatcher(max_threads=1)
        bits = self.xgr.allocate_token_bitmask(n, self.info.vocab_size)
        for t in ids:
            batch.batch_fill_next_token_bitmask(ms, bits)
            assert all(batch.batch_accept_token(ms, [t] * n))


def main() -> None:
    torch.set_num_threads(1)
    tok = load_tokenizer(default_model_path())
    libs = [LLG(tok.hf, tok.eos_token_ids)]
    try:
        libs.append(XGR(tok.hf, tok.eos_token_ids))
    except ImportError:
        print("# xgrammar not importable: llguidance only", file=sys.stderr)
    for lib in libs:
        print(json.dumps({"library": lib.name, "version": lib.version, "tokenizer_s": round(lib.tokenizer_s, 3)}))
        for case, (kind, spec, answer) in CASES.items():
            ids = tok.encode(answer, add_special_tokens=False)
            compile_us = _best_us(functools.partial(lib.compile, kind, spec))
            compiled = lib.compile(kind, spec)
            walk_us = _best_us(functools.partial(lib.walk, compiled, ids))
            batch_us = _best_us(functools.partial(lib.walk_batch, compiled, ids, 32))
            print(json.dumps({"library": lib.name, "case": case, "tokens": len(ids), "compile_us": round(compile_us),
                              "mask_us_per_token": round(walk_us / len(ids), 1),
                              "batch32_us_per_row_token": round(batch_us / len(ids) / 32, 1)}))
    print("\n| keyword | " + " | ".join(lib.name for lib in libs) + " |")
    print("|---|" + "---|" * len(libs))
    for name, (schema, bad) in KEYWORDS.items():
        cells = []
        for lib in libs:
            got = lib.accepts(schema, tok.encode(bad if bad is not None else _EXTRA_OK, add_special_tokens=False))
            if isinstance(got, str):
                cells.append(got)
            elif bad is None:
                cells.append("allowed" if got else "NOT allowed (stricter than the schema)")
            else:
                cells.append("NOT enforced (lets the violation through)" if got else "enforced")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
