"""Documentation keeps up with the code: an undocumented command, option, spec field, output
column or status fails here (the sqlite-utils test_docs.py idea)."""

from __future__ import annotations

import re

import click
import pytest

from conftest import REPO
from corpusgen.cli import cli
from corpusgen.job.spec import all_field_paths
from corpusgen.job.writer import STATUSES, output_schema

DOCS = REPO / "docs"


def _sections(text: str) -> dict[str, str]:
    """'## corpusgen NAME' heading → the text up to the next '## ' heading."""
    parts = re.split(r"^## ", text, flags=re.M)
    return {p.splitlines()[0].strip(): p for p in parts[1:]}


def _commands() -> list[tuple[str, click.Command]]:
    return sorted(cli.commands.items())


@pytest.mark.parametrize("name, command", _commands())
def test_every_command_and_option_is_in_cli_md(name, command):
    """Each command has a section in docs/cli.md naming each of its options."""
    sections = _sections((DOCS / "cli.md").read_text())
    assert f"corpusgen {name}" in sections, f"docs/cli.md has no '## corpusgen {name}' section"
    body = sections[f"corpusgen {name}"]
    for param in command.params:
        if isinstance(param, click.Option):
            for opt in param.opts:
                if opt.startswith("--") and opt != "--help":
                    assert f"`{opt}" in body, f"docs/cli.md: {name} does not document {opt}"


def test_global_options_documented():
    """--version and --help of the group are mentioned."""
    text = (DOCS / "cli.md").read_text()
    for param in cli.params:
        for opt in param.opts:
            assert f"`{opt}`" in text, opt


@pytest.mark.parametrize("field", all_field_paths())
def test_every_spec_field_is_in_job_spec_md(field):
    """Each job spec field has a row (with its type and default) in docs/job-spec.md."""
    text = (DOCS / "job-spec.md").read_text()
    assert re.search(rf"^\| `{re.escape(field)}` \|", text, flags=re.M), f"docs/job-spec.md lacks `{field}`"


def test_output_columns_and_statuses_are_in_output_md():
    """Each output column and each status is explained in docs/output.md."""
    text = (DOCS / "output.md").read_text()
    for name in output_schema(with_json=True).names:
        assert re.search(rf"^\| `{name}` \|", text, flags=re.M), name
    for status in STATUSES:
        assert re.search(rf"^\| `{status}` \|", text, flags=re.M), status
