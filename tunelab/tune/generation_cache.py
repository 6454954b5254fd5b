"""The generation cache: every answer a study drew, so nothing is generated twice.

A generation is keyed by (params hash, task id, sample index, seed); the params
hash covers the model, the backend and every setting that can change a token.
Each row keeps the answer text, its token count, latency, finish reason and,
once judged, its score. Verdicts are also remembered by (task, answer text),
so an answer drawn twice under different settings runs in the sandbox once.

The cache is one SQLite file in WAL mode, written one finished generation at a
time: a killed study loses only the generations that were still in flight.
`times_generated` counts how often a key was stored; above 1 means a
generation was drawn twice, which a correct study never does.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from tunelab.tune.scoring import Generation, Score

_SCHEMA = """
CREATE TABLE IF NOT EXISTS generations (
    params_hash TEXT NOT NULL, task_id TEXT NOT NULL, sample INTEGER NOT NULL, seed INTEGER NOT NULL,
    text TEXT NOT NULL, tokens INTEGER NOT NULL, hit_token_limit INTEGER NOT NULL, latency_s REAL NOT NULL,
    finish_reason TEXT NOT NULL, score TEXT, times_generated INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (params_hash, task_id, sample, seed));
CREATE TABLE IF NOT EXISTS verdicts (
    task_id TEXT NOT NULL, text_sha256 TEXT NOT NULL, verdict TEXT NOT NULL,
    PRIMARY KEY (task_id, text_sha256));
"""
# The parts of a Score that depend only on the task and the answer text.
_VERDICT_FIELDS = ("outcome", "detail", "repetition_loop", "unclosed_think", "off_script")


@dataclass(frozen=True)
class GenerationKey:
    """What decides one generation: the settings (hashed), the task, the sample index and the seed."""

    params_hash: str
    task_id: str
    sample: int
    seed: int


@dataclass(frozen=True)
class CachedGeneration:
    """A stored generation, with its score once it has been judged."""

    generation: Generation
    finish_reason: str
    score: Score | None


class GenerationCache:
    """SQLite-backed store of generations and verdicts, safe to share between threads and processes."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._connect().executescript(_SCHEMA)

    def get(self, key: GenerationKey) -> CachedGeneration | None:
        """The stored generation for `key`, or None if it was never drawn."""
        row = self._connect().execute(
            "SELECT text, tokens, hit_token_limit, latency_s, finish_reason, score FROM generations "
            "WHERE params_hash = ? AND task_id = ? AND sample = ? AND seed = ?", _key_tuple(key)).fetchone()
        if row is None:
            return None
        text, tokens, hit_token_limit, latency_s, finish_reason, score = row
        generation = Generation(text, tokens, bool(hit_token_limit), latency_s)
        return CachedGeneration(generation, finish_reason, Score(**json.loads(score)) if score else None)

    def put_generation(self, key: GenerationKey, generation: Generation, finish_reason: str) -> None:
        """Store a freshly drawn generation; storing a key again only bumps its `times_generated`."""
        self._connect().execute(
            "INSERT INTO generations (params_hash, task_id, sample, seed, text, tokens, hit_token_limit, latency_s, "
            "finish_reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET "
            "times_generated = times_generated + 1",
            (*_key_tuple(key), generation.text, generation.tokens, int(generation.hit_token_limit),
             generation.latency_s, finish_reason))

    def put_score(self, key: GenerationKey, score: Score) -> None:
        """Attach the score of a stored generation, and remember its verdict for the same answer text."""
        connection = self._connect()
        connection.execute("UPDATE generations SET score = ? WHERE params_hash = ? AND task_id = ? AND sample = ? "
                           "AND seed = ?", (json.dumps(asdict(score)), *_key_tuple(key)))
        text = connection.execute("SELECT text FROM generations WHERE params_hash = ? AND task_id = ? AND sample = ? "
                                  "AND seed = ?", _key_tuple(key)).fetchone()
        if text is not None:
            verdict = {name: getattr(score, name) for name in _VERDICT_FIELDS}
            connection.execute("INSERT OR IGNORE INTO verdicts VALUES (?, ?, ?)",
                               (score.task_id, _sha256(text[0]), json.dumps(verdict)))

    def known_verdict(self, task_id: str, generation: Generation) -> Score | None:
        """The score an identical answer to the same task already earned, re-timed for this generation."""
        row = self._connect().execute("SELECT verdict FROM verdicts WHERE task_id = ? AND text_sha256 = ?",
                                      (task_id, _sha256(generation.text))).fetchone()
        if row is None:
            return None
        return Score(task_id=task_id, runaway=generation.hit_token_limit, tokens=generation.tokens,
                     latency_s=generation.latency_s, **json.loads(row[0]))

    def count(self) -> int:
        """How many generations are stored."""
        return self._connect().execute("SELECT COUNT(*) FROM generations").fetchone()[0]

    def generated_more_than_once(self) -> list[GenerationKey]:
        """Keys that were drawn more than once (a correct study leaves this empty)."""
        rows = self._connect().execute(
            "SELECT params_hash, task_id, sample, seed FROM generations WHERE times_generated > 1").fetchall()
        return [GenerationKey(*row) for row in rows]

    def _connect(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            # Autocommit: each statement is its own transaction, so a kill never leaves one half-written.
            connection = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
            connection.execute("PRAGMA journal_mode = WAL")
            connection.execute("PRAGMA busy_timeout = 60000")
            connection.execute("PRAGMA synchronous = NORMAL")  # WAL: a killed process loses nothing committed
            self._local.connection = connection
        return connection


def _key_tuple(key: GenerationKey) -> tuple[str, str, int, int]:
    return key.params_hash, key.task_id, key.sample, key.seed


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
