"""Write a corpus of documents with widely varied lengths for the "no wasted tokens" benchmark.

    python benchmarks/make_varied_corpus.py [OUT.parquet] [--n 400] [--seed 7]

Default output: benchmarks/data/varied.parquet (committed; the defaults rewrite it unchanged).
Columns: ``id``, ``kind`` ("package" | "ticket" | "abstract"), ``title``, ``text``.

Lengths are long-tailed: a target word count is drawn from a log-normal distribution (median
about 140 words) and clipped to [20, 1500]. Each document starts from one of the hand-written
documents of jobs/corpus_text.jsonl and is then

- cut at a sentence boundary when the target is shorter than the original (a package gets its
  one-line summary first, as on a package index), or
- grown from the hand-written fragments of benchmarks/data/corpus_longform.jsonl when the target
  is longer: a README with installation notes, sections and a changelog for a package, a reply
  thread for a ticket, the first pages of the paper for an abstract.

READMEs (through their changelog) and papers (through their reference list) grow as far as
needed; a reply thread runs out at about 800 words, and a longer ticket target is built as a
README or a paper instead. Documents end at the first sentence or block that reaches the
target, so they overshoot it a little. A short document that would repeat an earlier one is
re-drawn (up to 20 times), so nearly all texts are distinct.

Deterministic: the same --n and --seed give the same file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import random
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def by_part(records: list[dict]) -> dict[str, list[dict]]:
    parts: dict[str, list[dict]] = {}
    for r in records:
        parts.setdefault(r["part"], []).append(r)
    return parts


# The hand-written documents (jobs/README.md describes their fields), by kind, in file order.
_DOCS = read_jsonl(REPO / "jobs" / "corpus_text.jsonl")
PACKAGES, TICKETS, ABSTRACTS = ([d for d in _DOCS if d["kind"] == k]
                                for k in ("package", "ticket", "abstract"))

# The fragments that grow them: one JSON object per line, {"part", "text"} and, for parts looked
# up by a key, "key" (a package name, a language or null for none, a ticket category or title,
# a paper section heading). Placeholders in braces are filled from the document's facts:
# {name} {language} {license} for packages; {first} (the customer's first name) {agent} {title}
# for tickets; {field} {subject} {data} for abstracts. Keyed parts with a list per key keep the
# file's order: a category's agent replies in the order they are sent (the first opens the
# thread, the last resolves it), a paper section's paragraphs in reading order.
_PARTS = by_part(read_jsonl(REPO / "benchmarks" / "data" / "corpus_longform.jsonl"))


def _texts(part: str) -> list[str]:
    return [r["text"] for r in _PARTS[part]]


def _keyed(part: str) -> dict:
    return {r["key"]: r["text"] for r in _PARTS[part]}


def _keyed_lists(part: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for r in _PARTS[part]:
        out.setdefault(r["key"], []).append(r["text"])
    return out


PACKAGE_SUMMARIES = _keyed("package_summary")       # package name -> one-line summary
INSTALL = _keyed("install")                         # language (None: no language) -> section
README_SECTIONS = _texts("readme_section")
CHANGELOG_ITEMS = _texts("changelog_item")
AGENTS = _texts("agent")
AGENT_REPLIES = _keyed_lists("agent_reply")         # ticket category -> replies
AGENT_GENERIC = _texts("agent_generic")             # agent messages for the middle of a thread
AGENT_CLOSINGS = _texts("agent_closing")            # after the resolving reply
CUSTOMER_FOLLOWUPS = _texts("customer_followup")    # customer messages for the middle
CUSTOMER_CLOSINGS = _texts("customer_closing")
DIAGNOSTICS = _keyed("diagnostics")                 # ticket title -> pasted diagnostics
PAPER_SECTIONS = _keyed_lists("paper_section")      # heading -> paragraphs
SURNAMES = _texts("surname")                        # reference lists are composed from these
REFERENCE_TITLES = _texts("reference_title")
JOURNAL_PATTERNS = _texts("journal_pattern")

MIN_WORDS, MAX_WORDS, MEDIAN_WORDS, SIGMA = 20, 1500, 140, 1.0
SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),
    pa.field("title", pa.string(), nullable=False),
    pa.field("text", pa.string(), nullable=False),
])
PREFIX = {"package": "pkg", "ticket": "tkt", "abstract": "abs"}
# README sections that make sense for a font or a metapackage (no code to build or test).
NON_CODE_SECTIONS = ("Documentation", "Reporting bugs", "Frequently asked questions",
                     "Related projects", "Acknowledgements", "License", "Contributing")
TECHNICAL_TICKETS = ("bug_report", "outage")


def words(text: str) -> int:
    return len(text.split())


def truncate(text: str, target: int) -> str:
    """The shortest prefix of whole sentences with at least ``target`` words."""
    pieces = re.split(r"(?<=[.!?])(\s+)", text)  # sentence, separator, sentence, ...
    out = pieces[0]
    for i in range(1, len(pieces) - 1, 2):
        if words(out) >= target:
            break
        out += pieces[i] + pieces[i + 1]
    return out.strip()


def grow(head: str, blocks, target: int, sep: str = "\n\n") -> str:
    """Append blocks (an iterator of strings) to ``head`` until it has ``target`` words."""
    text = head
    for block in blocks:
        if words(text) >= target:
            break
        text += sep + block
    return text


def ordered_subset(items: list, rng: random.Random, keep: float) -> list:
    """Each item with probability ``keep``, in the original order (at least one)."""
    chosen = [x for x in items if rng.random() < keep]
    return chosen or [rng.choice(items)]


# --- packages ------------------------------------------------------------------------------

def changelog(rng: random.Random):
    """An endless changelog, newest release first."""
    major, minor, patch = rng.randint(1, 4), rng.randint(0, 9), rng.randint(0, 5)
    day = dt.date(2024, 1, 1) + dt.timedelta(days=rng.randint(0, 300))
    yield "Changelog"
    while True:
        items = rng.sample(CHANGELOG_ITEMS, rng.randint(2, 5))
        lines = [f"- {item[:-1]} (#{rng.randint(40, 2400)})." for item in items]
        yield f"{major}.{minor}.{patch} ({day.isoformat()})\n" + "\n".join(lines)
        day -= dt.timedelta(days=rng.randint(14, 120))
        if patch > 0:
            patch -= 1
        elif minor > 0:
            minor, patch = minor - 1, rng.randint(0, 4)
        elif major > 0:
            major, minor, patch = major - 1, rng.randint(3, 9), rng.randint(0, 4)
        else:
            return


def package_doc(doc: dict, target: int, rng: random.Random) -> str:
    head = PACKAGE_SUMMARIES[doc["name"]] + "\n\n" + doc["text"]
    if target <= words(head):
        return truncate(head, target)
    slots = {"name": doc["name"], "license": doc["license"]}
    sections = [s for s in README_SECTIONS
                if (doc["license"] or not s.startswith("License"))
                and (doc["software_kind"] != "other" or s.startswith(NON_CODE_SECTIONS))]
    blocks = [INSTALL[doc["language"]]] + ordered_subset(sections, rng, keep=0.6)
    blocks = [b.format(**slots) for b in blocks]
    return grow(head, [*blocks, *changelog(rng)], target)


# --- tickets -------------------------------------------------------------------------------

def office_hours(t: dt.datetime) -> dt.datetime:
    """Support answers between 08:00 and 18:00; later messages move to the next morning."""
    if 8 <= t.hour < 18:
        return t
    day = t.date() + dt.timedelta(days=1 if t.hour >= 18 else 0)
    return dt.datetime.combine(day, dt.time(8, t.minute))


def thread(doc: dict, rng: random.Random):
    """Replies alternating between support and the customer, in the order a real case runs:
    the category's opening reply, a middle of follow-ups, the resolving reply, a closing."""
    first = doc["customer"].split()[0]
    key = {"outage": "bug_report"}.get(doc["category"], doc["category"])
    specific = AGENT_REPLIES.get(key, AGENT_REPLIES["other"])
    middle = specific[1:-1] + rng.sample(AGENT_GENERIC, rng.randint(2, len(AGENT_GENERIC)))
    middle = rng.sample(middle, len(middle))
    replies = rng.sample(CUSTOMER_FOLLOWUPS, len(CUSTOMER_FOLLOWUPS))
    if doc["title"] in DIAGNOSTICS:
        replies.insert(0, "Hi,\n\nSome more information in case it helps.\n\n"
                       + DIAGNOSTICS[doc["title"]] + "\n\n{first}")
    n = min(len(middle) + 1, len(replies))  # the customer answers the opening and each middle
    agent_msgs = [specific[0], *middle[:n - 1], specific[-1], rng.choice(AGENT_CLOSINGS)]
    customer_msgs = [*replies[:n], rng.choice(CUSTOMER_CLOSINGS)]
    agent = rng.choice(AGENTS)
    when = dt.datetime(2024, rng.randint(1, 11), rng.randint(1, 28), rng.randint(8, 17),
                       rng.randint(0, 59))
    for a, c in zip(agent_msgs, customer_msgs + [None]):
        for author, msg in ((f"{agent} (Support)", a), (doc["customer"], c)):
            if msg is None:  # the agent's closing message has no answer
                return
            when = office_hours(when + dt.timedelta(minutes=rng.randint(20, 3 * 24 * 60)))
            header = f"--- {author}, {when:%d %b %Y %H:%M} ---"
            yield header + "\n\n" + msg.format(first=first, agent=agent)
        if rng.random() < 0.2:  # the case changes hands now and then
            agent = rng.choice([x for x in AGENTS if x != agent])


def ticket_doc(doc: dict, target: int, rng: random.Random) -> str:
    if target <= words(doc["text"]):
        return truncate(doc["text"], target)
    return grow(doc["text"], thread(doc, rng), target)


# --- abstracts -----------------------------------------------------------------------------

def references(slots: dict, rng: random.Random):
    """An endless, numbered reference list in author-year style."""
    yield "References"
    field = slots["field"].title()
    titles: list[str] = []
    for i in range(1, 10_000):
        if not titles:  # every title once before any repeats
            titles = rng.sample(REFERENCE_TITLES, len(REFERENCE_TITLES))
        names = [f"{s}, {rng.choice('ABCDEFGHJKLMNPRSTW')}." for s in
                 rng.sample(SURNAMES, rng.choice([1, 2, 2, 3, 3, 4]))]
        authors = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " & " + names[-1]
        title = titles.pop().format(**slots)
        journal = rng.choice(JOURNAL_PATTERNS).format(Field=field)
        first_page = rng.randint(1, 1900)
        yield (f"{i}. {authors} ({rng.randint(1998, 2024)}). {title[0].upper() + title[1:]}. "
               f"{journal} {rng.randint(3, 68)}, {first_page}-{first_page + rng.randint(6, 30)}.")


def paper_doc(doc: dict, target: int, rng: random.Random) -> str:
    if target <= words(doc["text"]):
        return truncate(doc["text"], target)
    slots = {k: doc[k] for k in ("field", "subject", "data")}
    blocks = []  # one paragraph each, the section heading on the first one
    for heading, paragraphs in PAPER_SECTIONS.items():
        chosen = [p.format(**slots) for p in ordered_subset(paragraphs, rng, keep=0.85)]
        blocks += [heading + "\n\n" + chosen[0], *chosen[1:]]
    return grow("Abstract\n\n" + doc["text"], [*blocks, *references(slots, rng)], target)


# --- corpus --------------------------------------------------------------------------------

BUILDERS = {"package": (PACKAGES, package_doc), "ticket": (TICKETS, ticket_doc),
            "abstract": (ABSTRACTS, paper_doc)}


def target_words(rng: random.Random) -> int:
    n = round(rng.lognormvariate(math.log(MEDIAN_WORDS), SIGMA))
    return min(max(n, MIN_WORDS), MAX_WORDS)


def one_doc(kind: str, target: int, rng: random.Random) -> tuple[str, dict, str]:
    docs, build = BUILDERS[kind]
    doc = rng.choice(docs)
    text = build(doc, target, rng)
    if words(text) < 0.8 * target:  # a thread ran out of replies: READMEs and papers grow on
        kind = rng.choice(["package", "abstract"])
        docs, build = BUILDERS[kind]
        doc = rng.choice(docs)
        text = build(doc, target, rng)
    return kind, doc, text


def varied_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows, seen = [], set()
    for i in range(1, n + 1):
        first_kind, target = rng.choice(list(BUILDERS)), target_words(rng)
        for _ in range(20):  # short documents are cut from few originals: avoid exact repeats
            kind, doc, text = one_doc(first_kind, target, rng)
            if text not in seen:
                break
        seen.add(text)
        rows.append({"id": f"{PREFIX[kind]}-{i:04d}", "kind": kind, "title": doc["title"],
                     "text": text})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path,
                        default=REPO / "benchmarks" / "data" / "varied.parquet")
    parser.add_argument("--n", type=int, default=400, help="number of documents")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)

    table = pa.Table.from_pylist(varied_rows(args.n, args.seed), schema=SCHEMA)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, args.out, compression="zstd")
    lengths = sorted(words(t) for t in table.column("text").to_pylist())
    q = lambda p: lengths[min(len(lengths) - 1, int(p * len(lengths)))]  # noqa: E731
    print(f"wrote {table.num_rows} documents to {args.out}: words min {lengths[0]}, "
          f"median {q(0.5)}, p90 {q(0.9)}, p99 {q(0.99)}, max {lengths[-1]}, "
          f"total {sum(lengths)}")


if __name__ == "__main__":
    main()
