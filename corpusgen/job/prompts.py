"""Rows → token ids: a sandboxed Jinja2 template, the model's chat template, the too-long policy.

The template is compiled once per job; its variables are checked against the input's columns
before any row is read (:class:`TemplateError` names the variable and lists the columns).
Per row: a null value renders as an empty string, except in the document column, where it makes
the row an ``error`` (an empty document still runs); a value that is not valid UTF-8 makes the row
an ``error``. When prompt + max_new_tokens exceeds the model's context, ``mark`` gives the row
status ``prompt_too_long`` (it is not sent to the engine) and ``truncate_middle`` cuts tokens from
the middle of the document column (marked with "…") until it fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from jinja2 import StrictUndefined, TemplateSyntaxError, meta, nodes
from jinja2.exceptions import SecurityError, UndefinedError
from jinja2.sandbox import SandboxedEnvironment

from corpusgen.errors import TemplateError
from corpusgen.job.spec import PromptSpec

ELLIPSIS = "…"


@dataclass(frozen=True, kw_only=True)
class Prompt:
    """One row, ready for the engine or already decided."""

    key: str
    """The row key."""
    ids: list[int] | None
    """Prompt token ids (chat template applied); None when the row is not sent to the engine."""
    status: str | None = None
    """None when sent; otherwise the row's final status (``prompt_too_long`` or ``error``)."""
    error: str | None = None
    """Why the row was not sent, or a note about it."""
    cut_tokens: int = 0
    """Tokens removed from the middle of the document column by ``truncate_middle``."""
    prompt_tokens: int = 0
    """Length of the prompt in tokens (also for prompt_too_long rows)."""


def _finalize(value: Any) -> Any:
    return "" if value is None else value


MAX_TEMPLATE_ITEMS = 10_000_000
"""Largest sequence ``*`` may build, and largest integer argument a template may pass to a call."""


class _Sandbox(SandboxedEnvironment):
    """Jinja2's sandbox (no attribute starting with ``_``, no unsafe methods, small ranges) that also
    refuses ``'a' * 10**10``, ``10 ** 10 ** 10`` and ``text.ljust(10**10)``: a template must not
    hang the job or exhaust memory (size arguments of filters such as ``center`` stay unchecked)."""

    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, bytes, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_TEMPLATE_ITEMS:
                    raise SecurityError(f"'*' would build {len(seq) * n} items; the sandbox allows {MAX_TEMPLATE_ITEMS}")
        elif isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            if left.bit_length() * right > 2**20:
                raise SecurityError(f"'**' would compute a number of more than {2**20} bits")
        return super().call_binop(context, operator, left, right)

    def call(self, context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        for a in (*args, *kwargs.values()):
            if isinstance(a, int) and abs(a) > MAX_TEMPLATE_ITEMS:
                raise SecurityError(f"a call with the argument {a} (the sandbox allows up to {MAX_TEMPLATE_ITEMS})")
        return super().call(context, obj, *args, **kwargs)


def _internals(ast: nodes.Template) -> nodes.Node | None:
    """The first ``x._name``, ``x['_name']`` or ``x|attr('_name')`` of a template: an attempt to
    reach Python internals, refused before the job starts (the sandbox would refuse it per row)."""
    for node in ast.find_all((nodes.Getattr, nodes.Getitem, nodes.Filter)):
        if isinstance(node, nodes.Getattr):
            name = node.attr
        elif isinstance(node, nodes.Getitem):
            name = node.arg.value if isinstance(node.arg, nodes.Const) else None
        else:
            name = node.args[0].value if node.name == "attr" and node.args and isinstance(node.args[0], nodes.Const) else None
        if isinstance(name, str) and name.startswith("_"):
            return node
    return None


def compile_template(spec: PromptSpec) -> tuple[Any, frozenset[str]]:
    """Compile ``spec.template`` once: (jinja2 Template, the row columns it uses)."""
    env = _Sandbox(undefined=StrictUndefined, keep_trailing_newline=True, autoescape=False, finalize=_finalize)
    try:
        ast = env.parse(spec.template)
        template = env.from_string(spec.template)
    except TemplateSyntaxError as e:
        raise TemplateError(f"prompt.template line {e.lineno}: {e.message}; fix the Jinja2 syntax") from None
    bad = _internals(ast)
    if bad is not None:
        raise TemplateError(f"prompt.template line {bad.lineno}: names starting with '_' reach Python internals, "
                            "which the template sandbox refuses; use the row's columns and Jinja2 filters")
    if next(ast.find_all((nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends)), None) is not None:
        raise TemplateError("prompt.template: include, import and extends are not available (a job's template is "
                            "one string); write the text into the template")
    return template, frozenset(meta.find_undeclared_variables(ast) - set(env.globals))


def check_columns(variables: frozenset[str], columns: Sequence[str]) -> None:
    """Raise TemplateError naming the first template variable that is not one of ``columns``."""
    unknown = sorted(variables - set(columns))
    if unknown:
        raise TemplateError(
            f"prompt.template uses {{{{ {unknown[0]} }}}}, which is not an input column; "
            f"columns: {', '.join(columns)}"
        )


class PromptBuilder:
    """Compiled template + tokenizer + context budget of one job."""

    def __init__(self, spec: PromptSpec, tokenizer: Any, *, max_context: int, max_new_tokens: int):
        self.spec = spec
        self.tokenizer = tokenizer
        self.budget = max_context - max_new_tokens
        """Prompt tokens a row may have."""
        self.template, self.variables = compile_template(spec)

    def check_columns(self, columns: Sequence[str]) -> None:
        """Raise TemplateError when the template uses a variable that is not one of ``columns``."""
        check_columns(self.variables, columns)

    def render(self, row: Mapping[str, Any]) -> str:
        """The user message for ``row`` (raises jinja2 errors)."""
        return self.template.render({k: row[k] for k in self.variables if k in row})

    def build(self, key: str, row: Mapping[str, Any]) -> Prompt:
        """Render, wrap in the chat template, tokenise and apply the too-long policy."""
        for col in self.variables:
            if isinstance(row.get(col), bytes):
                return Prompt(key=key, ids=None, status="error", error=f"column {col!r} is not valid UTF-8")
        doc = self.spec.document_column
        if doc in self.variables and row.get(doc) is None:
            return Prompt(key=key, ids=None, status="error", error=f"document column {doc!r} is null")
        try:
            ids = self._ids(row)
        except UndefinedError as e:
            return Prompt(key=key, ids=None, status="error", error=f"template: {e.message}")
        except Exception as e:  # noqa: BLE001 - a row's values may break any call in the template (a
            # KeyError from str.format of the row's text, say): that row is an error, the job goes on
            return Prompt(key=key, ids=None, status="error", error=f"template: {type(e).__name__}: {e}")
        if len(ids) <= self.budget:
            return Prompt(key=key, ids=ids, prompt_tokens=len(ids))
        if self.spec.too_long == "truncate_middle" and doc in self.variables and isinstance(row.get(doc), str):
            return self._truncate(key, row, ids)
        return self._too_long(key, len(ids))

    def _ids(self, row: Mapping[str, Any]) -> list[int]:
        return list(self.tokenizer.chat_prompt(self.spec.system, self.render(row)))

    def _too_long(self, key: str, n: int) -> Prompt:
        return Prompt(key=key, ids=None, status="prompt_too_long", prompt_tokens=n,
                      error=f"prompt has {n} tokens; with max_new_tokens the limit is {max(self.budget, 0)}")

    def _truncate(self, key: str, row: Mapping[str, Any], ids: list[int]) -> Prompt:
        doc = self.spec.document_column
        doc_ids = list(self.tokenizer.encode(row[doc]))
        excess = len(ids) - self.budget
        for _ in range(8):  # decode/encode round trips may not be exact: cut a little more each time
            keep = len(doc_ids) - excess - 2
            if keep <= 0:
                break
            head, tail = keep - keep // 2, keep // 2
            short = self.tokenizer.decode(doc_ids[:head]) + ELLIPSIS + (
                self.tokenizer.decode(doc_ids[-tail:]) if tail else "")
            new_ids = self._ids({**row, doc: short})
            if len(new_ids) <= self.budget:
                return Prompt(key=key, ids=new_ids, cut_tokens=len(doc_ids) - keep,
                              prompt_tokens=len(new_ids))
            excess += len(new_ids) - self.budget
        return self._too_long(key, len(ids))
