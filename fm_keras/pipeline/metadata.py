"""A file-based metadata store with ML Metadata's model: artifacts, executions, events, contexts.

ml-metadata cannot be installed beside TensorFlow 2.20 (it pins protobuf < 5), so this is a
small SQLite store (standard library only) with MLMD's ideas and names:

- an *artifact* is a typed output that lives at a URI (Examples, Schema, Model, ModelBlessing,
  PushedModel, ...), with a content fingerprint and JSON properties;
- an *execution* is one run of one step, with its cache key (the fingerprint of its inputs,
  parameters and code version), state (RUNNING, COMPLETE, CACHED, FAILED, ABANDONED),
  properties and timings;
- an *event* links an execution to an artifact as INPUT or OUTPUT under a name: the lineage;
- a *context* groups executions: one per pipeline run (``run``), with the run's status.

Every write is one SQLite transaction, so a killed process leaves a consistent store: at worst
executions and runs in state RUNNING, which the next run marks ABANDONED.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass

_SCHEMA = """
CREATE TABLE IF NOT EXISTS contexts (
    id INTEGER PRIMARY KEY, type TEXT NOT NULL, name TEXT NOT NULL UNIQUE,
    properties TEXT NOT NULL DEFAULT '{}', created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS artifacts (
    id INTEGER PRIMARY KEY, type TEXT NOT NULL, uri TEXT NOT NULL, fingerprint TEXT NOT NULL,
    properties TEXT NOT NULL DEFAULT '{}', created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS executions (
    id INTEGER PRIMARY KEY, type TEXT NOT NULL, context_id INTEGER NOT NULL REFERENCES contexts,
    state TEXT NOT NULL, cache_key TEXT NOT NULL, properties TEXT NOT NULL DEFAULT '{}',
    started REAL NOT NULL, finished REAL);
CREATE TABLE IF NOT EXISTS events (
    execution_id INTEGER NOT NULL REFERENCES executions,
    artifact_id INTEGER NOT NULL REFERENCES artifacts,
    kind TEXT NOT NULL CHECK (kind IN ('INPUT', 'OUTPUT')), name TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS executions_cache ON executions (type, cache_key, state);
CREATE INDEX IF NOT EXISTS events_execution ON events (execution_id);
"""

DONE = ("COMPLETE", "CACHED")


@dataclass(frozen=True)
class Artifact:
    """One stored artifact (see the module docstring)."""

    id: int
    type: str
    uri: str
    fingerprint: str
    properties: dict

    def to_dict(self) -> dict:
        return {"id": self.id, "type": self.type, "uri": self.uri,
                "fingerprint": self.fingerprint, "properties": self.properties}


class MetadataStore:
    """The store in one SQLite file, e.g. ``<pipeline root>/metadata.sqlite``."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def _write(self, sql: str, args=()) -> int:
        with self._db:
            return self._db.execute(sql, args).lastrowid

    # ----- contexts (runs) ----------------------------------------------------------------
    def create_context(self, type_: str, name: str, properties: dict) -> int:
        return self._write("INSERT INTO contexts (type, name, properties, created) VALUES (?,?,?,?)",
                           (type_, name, json.dumps(properties), time.time()))

    def context(self, name: str) -> dict | None:
        row = self._db.execute("SELECT * FROM contexts WHERE name = ?", (name,)).fetchone()
        return None if row is None else _context(row)

    def update_context(self, context_id: int, **properties) -> None:
        row = self._db.execute("SELECT properties FROM contexts WHERE id = ?",
                               (context_id,)).fetchone()
        merged = {**json.loads(row["properties"]), **properties}
        self._write("UPDATE contexts SET properties = ? WHERE id = ?",
                    (json.dumps(merged), context_id))

    def contexts(self, type_: str = "run") -> list[dict]:
        rows = self._db.execute("SELECT * FROM contexts WHERE type = ? ORDER BY id", (type_,))
        return [_context(r) for r in rows]

    # ----- artifacts ------------------------------------------------------------------------
    def put_artifact(self, type_: str, uri: str, fingerprint: str, properties: dict) -> Artifact:
        artifact_id = self._write(
            "INSERT INTO artifacts (type, uri, fingerprint, properties, created) VALUES (?,?,?,?,?)",
            (type_, uri, fingerprint, json.dumps(properties), time.time()))
        return Artifact(artifact_id, type_, uri, fingerprint, properties)

    def artifact(self, artifact_id: int) -> Artifact:
        row = self._db.execute("SELECT * FROM artifacts WHERE id = ?", (artifact_id,)).fetchone()
        return _artifact(row)

    def artifacts(self, type_: str) -> list[Artifact]:
        """Artifacts of a type written by executions that finished, newest first."""
        rows = self._db.execute(
            "SELECT DISTINCT a.* FROM artifacts a JOIN events ev ON ev.artifact_id = a.id "
            "JOIN executions x ON x.id = ev.execution_id WHERE a.type = ? AND ev.kind = 'OUTPUT' "
            "AND x.state IN ('COMPLETE', 'CACHED') ORDER BY a.id DESC", (type_,))
        return [_artifact(r) for r in rows]

    # ----- executions -----------------------------------------------------------------------
    def start_execution(self, type_: str, context_id: int, cache_key: str,
                        inputs: dict[str, Artifact], properties: dict) -> int:
        with self._db:
            execution_id = self._db.execute(
                "INSERT INTO executions (type, context_id, state, cache_key, properties, started) "
                "VALUES (?,?,?,?,?,?)", (type_, context_id, "RUNNING", cache_key,
                                         json.dumps(properties), time.time())).lastrowid
            self._db.executemany(
                "INSERT INTO events (execution_id, artifact_id, kind, name) VALUES (?,?,?,?)",
                [(execution_id, a.id, "INPUT", n) for n, a in inputs.items() if a is not None])
        return execution_id

    def finish_execution(self, execution_id: int, state: str, outputs: dict[str, Artifact],
                         properties: dict) -> None:
        with self._db:
            row = self._db.execute("SELECT properties FROM executions WHERE id = ?",
                                   (execution_id,)).fetchone()
            merged = {**json.loads(row["properties"]), **properties}
            self._db.execute("UPDATE executions SET state = ?, properties = ?, finished = ? "
                             "WHERE id = ?", (state, json.dumps(merged), time.time(), execution_id))
            self._db.executemany(
                "INSERT INTO events (execution_id, artifact_id, kind, name) VALUES (?,?,?,?)",
                [(execution_id, a.id, "OUTPUT", n) for n, a in outputs.items()])

    def cached(self, type_: str, cache_key: str) -> tuple[dict, dict[str, Artifact]] | None:
        """(properties, outputs) of the newest finished execution with this cache key whose
        output URIs all still exist; None if there is none."""
        rows = self._db.execute(
            "SELECT id, properties FROM executions WHERE type = ? AND cache_key = ? "
            "AND state IN ('COMPLETE', 'CACHED') ORDER BY id DESC", (type_, cache_key)).fetchall()
        for row in rows:
            outputs = self.events(row["id"], "OUTPUT")
            if outputs and all(os.path.exists(a.uri) for a in outputs.values()):
                return json.loads(row["properties"]), outputs
        return None

    def events(self, execution_id: int, kind: str) -> dict[str, Artifact]:
        rows = self._db.execute(
            "SELECT ev.name, a.* FROM events ev JOIN artifacts a ON a.id = ev.artifact_id "
            "WHERE ev.execution_id = ? AND ev.kind = ?", (execution_id, kind))
        return {r["name"]: _artifact(r) for r in rows}

    def executions(self, context_id: int) -> list[dict]:
        rows = self._db.execute("SELECT * FROM executions WHERE context_id = ? ORDER BY id",
                                (context_id,))
        return [{**dict(r), "properties": json.loads(r["properties"])} for r in rows]

    def producer(self, artifact_id: int) -> dict | None:
        """The execution that first wrote an artifact (lineage upwards)."""
        row = self._db.execute(
            "SELECT x.* FROM executions x JOIN events ev ON ev.execution_id = x.id "
            "WHERE ev.artifact_id = ? AND ev.kind = 'OUTPUT' ORDER BY x.id LIMIT 1",
            (artifact_id,)).fetchone()
        return None if row is None else {**dict(row), "properties": json.loads(row["properties"])}

    def abandon_running(self) -> int:
        """Marks RUNNING executions and runs ABANDONED (call while holding the pipeline lock:
        then nothing else can be running). Returns how many executions were marked."""
        with self._db:
            count = self._db.execute("UPDATE executions SET state = 'ABANDONED', finished = ? "
                                     "WHERE state = 'RUNNING'", (time.time(),)).rowcount
        for ctx in self.contexts("run"):
            if ctx["properties"].get("status") == "running":
                self.update_context(ctx["id"], status="abandoned")
        return count


def _artifact(row) -> Artifact:
    return Artifact(row["id"], row["type"], row["uri"], row["fingerprint"],
                    json.loads(row["properties"]))


def _context(row) -> dict:
    return {"id": row["id"], "type": row["type"], "name": row["name"], "created": row["created"],
            "properties": json.loads(row["properties"])}
