"""Errors a user can cause. Each message names the problem and the fix, on one line.

Internal invariants use ``assert`` with the values; everything reachable from user input
raises a subclass of :class:`CorpusgenError`, which the CLI turns into a one-line message.
"""

from __future__ import annotations


class CorpusgenError(Exception):
    """Base class of every error a user can cause; ``str(err)`` is the whole message."""


class JobSpecError(CorpusgenError):
    """The job YAML is malformed, has an unknown field, or a value of the wrong type."""


class InputError(CorpusgenError):
    """The input corpus cannot be read, or lacks a column the job needs."""


class TemplateError(CorpusgenError):
    """The prompt template does not compile or references an unknown variable."""


class ModelError(CorpusgenError):
    """A model path, file or architecture cannot be loaded."""


class PolicyError(CorpusgenError):
    """A policy file is invalid, or does not fit the memory budgets."""


class BudgetError(PolicyError):
    """A placement needs more memory than a tier's budget allows."""


class ResumeMismatch(CorpusgenError):
    """The output directory holds a job whose fingerprint differs from this one."""


class LockedError(CorpusgenError):
    """Another live process holds the output directory's lock."""


class OutputError(CorpusgenError):
    """The output directory cannot be written, or a committed part is damaged."""


class QueryError(CorpusgenError):
    """A `corpusgen sql` query failed, or is not a read-only SELECT."""


class OffloadIOError(CorpusgenError):
    """A read or write of the disk tier failed inside the engine."""
