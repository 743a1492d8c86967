"""Write the sample corpus that the example jobs in this directory run on.

    python jobs/make_sample_corpus.py [OUT_DIR]        # default: jobs/sample/

Writes the same 50 rows in four formats, so that every reader can be tried on them:

    docs.parquet   docs.jsonl   docs.csv   docs.duckdb (table ``docs``)

Columns: ``id`` (string), ``kind`` ("package" | "ticket" | "abstract"), ``title`` (string),
``text`` (string, 40 to 250 words). Rows 1-48 are the hand-written documents of
corpus_text.jsonl (one JSON object per line), sixteen of each kind in file order, ids
``pkg-001`` … ``pkg-016``, ``tkt-001`` … ``tkt-016``, ``abs-001`` … ``abs-016``.

The last two rows are deliberate edge cases that a job must answer with a row status instead of
crashing:

    edge-empty   text is the empty string ""
    edge-null    text is null (None)

CSV has no null: ``edge-empty`` is written as ``""`` and ``edge-null`` as an empty field. Readers
differ in what they make of that: DuckDB's read_csv reads both as NULL unless given
``allow_quoted_nulls=false``; pyarrow reads both as "" (or both as null with
``strings_can_be_null=True``). The other three formats keep the distinction.

The output is deterministic: the documents are fixed text and no randomness is involved, so
re-running the script reproduces the same rows (the binary .duckdb file may differ in bytes).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),
    pa.field("title", pa.string(), nullable=False),
    pa.field("text", pa.string()),
])
PREFIX = {"package": "pkg", "ticket": "tkt", "abstract": "abs"}
MIN_WORDS, MAX_WORDS = 40, 250


def load_documents(path: Path = HERE / "corpus_text.jsonl") -> dict[str, list[dict]]:
    """The hand-written documents by kind, in file order. Each line is one JSON object: ``kind``,
    ``title``, ``text`` and the facts behind the text (see jobs/README.md)."""
    docs: dict[str, list[dict]] = {kind: [] for kind in PREFIX}
    with open(path, encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            docs[doc["kind"]].append(doc)
    return docs


def sample_rows() -> list[dict]:
    """The 48 documents in a fixed order, then the two edge-case rows."""
    rows = []
    for kind, docs in load_documents().items():
        prefix = PREFIX[kind]
        assert len(docs) == 16, (kind, len(docs))
        for i, doc in enumerate(docs, start=1):
            n = len(doc["text"].split())
            assert MIN_WORDS <= n <= MAX_WORDS, (doc["title"], n)
            rows.append({"id": f"{prefix}-{i:03d}", "kind": kind, "title": doc["title"],
                         "text": doc["text"]})
    rows.append({"id": "edge-empty", "kind": "ticket", "title": "(no subject)", "text": ""})
    rows.append({"id": "edge-null", "kind": "package", "title": "untitled", "text": None})
    return rows


def write_all(out_dir: Path) -> pa.Table:
    out_dir.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(sample_rows(), schema=SCHEMA)

    pq.write_table(table, out_dir / "docs.parquet", compression="zstd")

    with open(out_dir / "docs.jsonl", "w", encoding="utf-8") as f:
        for row in table.to_pylist():
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    # pyarrow quotes "" and leaves nulls as an empty field, so the two edge rows stay distinct.
    pacsv.write_csv(table, out_dir / "docs.csv")

    import duckdb  # only needed for this one output

    db_path = out_dir / "docs.duckdb"
    db_path.unlink(missing_ok=True)
    with duckdb.connect(str(db_path)) as con:
        con.register("arrow_docs", table)
        # No PRIMARY KEY: its index would add a storage block to a file that is committed.
        con.execute("CREATE TABLE docs (id VARCHAR NOT NULL, kind VARCHAR NOT NULL, "
                    "title VARCHAR NOT NULL, text VARCHAR)")
        con.execute("INSERT INTO docs SELECT id, kind, title, text FROM arrow_docs")
        con.execute("CHECKPOINT")
    return table


def main(argv: list[str]) -> None:
    out_dir = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent / "sample"
    table = write_all(out_dir)
    words = [len(t.split()) for t in table.column("text").to_pylist() if t]
    print(f"wrote {table.num_rows} rows to {out_dir}/docs.{{parquet,jsonl,csv,duckdb}} "
          f"({min(words)}-{max(words)} words per document)")


if __name__ == "__main__":
    main(sys.argv)
