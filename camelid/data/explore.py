"""Instruction data in SQLite with a full-text index: `camelid data search` answers from the terminal and
`camelid data browse` opens the same database in Datasette (on 127.0.0.1), with the search the Alpaca-data
explorers use as a saved query."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path

from camelid.data.instruct import Skipped, load_conversations
from camelid.errors import CamelidError, require

TABLE = "samples"
# The seed's search: one LIKE over instruction, input and output.
SEARCH_SQL = (f"select id, instruction, input, output from {TABLE} "
              "where instruction || ' ' || input || ' ' || output like '%' || :search || '%' order by id")


def _row(conversation: list[dict]) -> tuple[str, str, str, str]:
    """(instruction, input, output, system) for the first exchange; later turns go to `output` too."""
    system = next((m["content"] for m in conversation if m["role"] == "system"), "")
    turns = [m for m in conversation if m["role"] != "system"]
    user, rest = turns[0], turns[1:]
    output = "\n\n".join(f"{m['role'].upper()}: {m['content']}" if len(rest) > 1 else m["content"] for m in rest)
    return user["content"], user.get("input", ""), output, system


def default_db(data: str | Path) -> Path:
    """A cache file named by the data's path, size and modification time, so edits rebuild it."""
    st = Path(data).stat()
    key = hashlib.sha256(f"{Path(data).resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "camelid" / "data"
    return base / f"{Path(data).stem}-{key}.sqlite"


def build_db(data: str | Path, db: str | Path | None = None) -> Path:
    """Load the data (any format camelid reads) into SQLite with an FTS5 index; reuses a fresh cache."""
    if not Path(data).is_file():
        raise CamelidError(f"{data}: no such file")
    db = Path(db) if db else default_db(data)
    if db.exists():
        return db
    db.parent.mkdir(parents=True, exist_ok=True)
    tmp = db.with_name(db.name + ".tmp")
    tmp.unlink(missing_ok=True)
    con = sqlite3.connect(tmp)
    with con:
        con.execute(f"create table {TABLE} (id integer primary key, source text, instruction text, input text, "
                    "output text, system text, conversation text)")
        con.executemany(f"insert into {TABLE} (source, instruction, input, output, system, conversation) "
                        "values (?, ?, ?, ?, ?, ?)",
                        ((where, *_row(c), json.dumps(c, ensure_ascii=False))
                         for where, c in load_conversations(data, skipped=Skipped())))
        con.execute(f"create virtual table {TABLE}_fts using fts5(instruction, input, output, "
                    f"content='{TABLE}', content_rowid='id')")
        con.execute(f"insert into {TABLE}_fts(rowid, instruction, input, output) "
                    f"select id, instruction, input, output from {TABLE}")
    con.close()
    os.replace(tmp, db)
    return db


def search(data: str | Path, query: str, limit: int = 20, db: str | Path | None = None,
           substring: bool = False) -> list[dict]:
    """Full-text search (FTS5 syntax: words, "phrases", OR, prefix*), best matches first; or with
    `substring`, the seed's LIKE search."""
    if not query.strip():
        raise CamelidError("the search query is empty")
    con = sqlite3.connect(build_db(data, db))
    con.row_factory = sqlite3.Row
    try:
        if substring:
            rows = con.execute(SEARCH_SQL + " limit :limit", {"search": query, "limit": limit}).fetchall()
        else:
            rows = con.execute(f"select s.id, s.instruction, s.input, s.output from {TABLE}_fts f "
                               f"join {TABLE} s on s.id = f.rowid where {TABLE}_fts match ? "
                               "order by rank limit ?", (query, limit)).fetchall()
    except sqlite3.OperationalError as exc:
        raise CamelidError(f"search query {query!r}: {exc}") from None
    finally:
        con.close()
    return [dict(r) for r in rows]


def datasette_metadata(db: Path) -> dict:
    return {"title": "camelid instruction data",
            "databases": {db.stem: {"queries": {"search": {"sql": SEARCH_SQL,
                                                           "title": "Search instruction, input and output"}},
                                    "tables": {TABLE: {"fts_table": f"{TABLE}_fts",
                                                       "searchable_columns": ["instruction", "input", "output"]}}}}}


def browse(data: str | Path, host: str = "127.0.0.1", port: int = 8001, db: str | Path | None = None):
    """Serve the data in Datasette until interrupted."""
    require("datasette", extra="browse")
    import uvicorn
    from datasette.app import Datasette

    path = build_db(data, db)
    app = Datasette([str(path)], metadata=datasette_metadata(path)).app()
    print(f"camelid data browse: http://{host}:{port}/{path.stem}/{TABLE} (saved query: /{path.stem}/search)")
    uvicorn.run(app, host=host, port=port, log_level="warning")
