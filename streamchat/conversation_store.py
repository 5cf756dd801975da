"""A conversation's long-term memory: the text of messages evicted from the bounded cache, searchable, on disk.

The KV cache forgets a message once it leaves the window (StreamingLLM, Xiao et al., 2023, Appendix A: it "does
not extend the models' context window or enhance their long-term memory"). The text is a few bytes a token, so
it can be kept: every fully evicted message goes here, cut into passages of at most `PASSAGE_WORDS` words, in a
per-conversation SQLite file. A new user message searches it (BM25 over SQLite's FTS5 where the build has it,
`PRAGMA compile_options`; the same BM25 computed over a plain table where not) and the session brings the best
passages back into a reserved region of the cache (`ChatSession`, `BoundedCache.replace_recall`). RAM holds one
query's candidates at most, whatever the conversation's length; the file grows by the text alone.

Retrieval of evicted context is InfLLM's idea (Xiao et al., 2024, arXiv 2402.04617), which keeps every evicted
K/V in RAM; this store keeps only text, so memory stays constant.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sqlite3
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType

from streamchat import native

PASSAGE_WORDS = 48  # a long message is stored (and recalled) as passages of about this many words
SEARCH_CANDIDATES = 32  # passages ranked per query, by each score
RRF_K = 60  # reciprocal rank fusion of the two rankings (Cormack et al., 2009): 1 / (60 + rank) each
# A lexical match counts when the passage holds this share of the query's terms, weighted by their IDF: "Which city
# do I live in?" -> {city, live} is covered 0.36-0.5 by "I live in Lisbon" (city is the rarer word in a chat, so it
# weighs more: 0.45 missed it, recall benchmark); a chat turn sharing a common word with an old one ("Write a short
# poem" / "Write a function") much less. An absolute bar, so that most turns recall nothing and pay nothing
# (memorycost: a rewrite of the recalled region is a re-prefill of it).
LEXICAL_MIN_COVERAGE = 0.34
# A passage with no search term counts when the cosine of its sentence vector with the query's is at least this
# (all-MiniLM-L6-v2, `streamchat.sentence_embedding`; docs/recall.md). Measured over MT-Bench's questions and the
# recall benchmark's facts: a paraphrased question and the fact it asks for, 0.39-0.71 ("Who am I? Tell me how I am
# called." / "my name is Greta" 0.39; "Which town is home for me?" / "I live in Lisbon" 0.27, below); an unrelated
# question and the facts, at most 0.35; an MT-Bench question's best match among the others' turns, 0.36 at the
# median (they share topics: such turns are recalled, which is what a topic's return asks for).
SEMANTIC_MIN_COSINE = 0.38
BM25_K1, BM25_B = 1.2, 0.75  # FTS5's own bm25() defaults, also used by the fallback
_WORD = re.compile(r"\w+", re.UNICODE)
# Function words a question is mostly made of ("what is my ..."): left out of the query so that a passage is
# found by what the question is about. Common English ones only; anything else is searched.
_STOPWORD_TEXT = """a about above after again all also am an and any are as at be been before being below between both but by
    can could did do does doing done down during each either else ever every few for from further had has have
    having he her here hers herself him himself his how i if in into is it its itself just let lets me mine more
    most much must my myself no nor not now of off on once only or other our ours ourselves out over own please
    same she should so some such than that the their theirs them themselves then there these they this those
    through to too under until up us very was we were what when where which while who whom whose why will with
    would yes yet you your yours yourself yourselves"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())


class StoreError(RuntimeError):
    """The store's file is missing, unreadable or not a streamchat memory store; the message names the file."""


@dataclass(frozen=True)
class Passage:
    """A stored piece of an evicted message: the turn it was said in (1-based), who said it, its text, and the
    number of tokens it takes (counted by the session's tokenizer when stored)."""

    turn: int
    role: str
    text: str
    tokens: int
    id: int = 0
    score: float = 0.0  # fused relevance to the last query (higher is more relevant)
    lexical: float = 0.0  # its BM25 score (0: no search term in it)
    coverage: float = 0.0  # share of the query's terms it holds, weighted by their IDF
    semantic: float = 0.0  # cosine of its sentence vector with the query's (0: no vector)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k in ("turn", "role", "text", "tokens")}


def fts5_available() -> bool:
    """Whether this Python's SQLite has FTS5 (`PRAGMA compile_options` lists ENABLE_FTS5)."""
    with sqlite3.connect(":memory:") as db:
        return any(row[0] == "ENABLE_FTS5" for row in db.execute("PRAGMA compile_options"))


def split_passages(text: str, words: int = PASSAGE_WORDS) -> list[str]:
    """`text` cut into passages of at most `words` words, at sentence ends where one falls in the second half."""
    tokens = text.split()
    passages, start = [], 0
    while start < len(tokens):
        end = min(start + words, len(tokens))
        if end < len(tokens):
            for cut in range(end, start + words // 2, -1):
                if tokens[cut - 1].endswith((".", "!", "?", ":", ";")):
                    end = cut
                    break
        passages.append(" ".join(tokens[start:end]))
        start = end
    return passages


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def passage_texts(passage: str) -> list[str]:
    """What a passage's sentence vectors are computed from: the passage itself, and each of its sentences when it
    has more than one (a fact said in passing, "By the way, I live in Lisbon. Please remember it.", is closer to a
    question about it alone than together with the rest: cosine 0.27 -> 0.35 for "Which town is home for me?")."""
    sentences = [part for part in _SENTENCE_END.split(passage.strip()) if part]
    return [passage] if len(sentences) < 2 else [passage, *sentences]


def query_terms(text: str) -> list[str]:
    """The words of `text` a search uses: lowercased, function words (`STOPWORDS`) left out, each once, in order.
    A message made only of function words ("what is it?") searches nothing lexically."""
    return list(dict.fromkeys(w for w in (w.lower() for w in _WORD.findall(text)) if w not in STOPWORDS))


def _dot_float16(blob: bytearray, query: np.ndarray) -> np.ndarray:
    """Dot products of float16 vectors (`blob`: n x len(query) of them, back to back) with a float32 `query` ->
    float32 [n]: on the native kernels' F16 matmul where they are built (numpy's float16 -> float32 conversion
    alone took 30 ms for 12,000 vectors), else numpy."""
    rows = len(blob) // (2 * len(query))
    if native.active() is not None and len(query) % 32 == 0:  # the kernel's rows are whole 32-weight blocks
        weights = torch.frombuffer(blob, dtype=torch.uint8)
        x = torch.from_numpy(np.ascontiguousarray(query, np.float32)).view(1, -1)
        return native.ggml_matmul(int(GGMLQuantizationType.F16), x, weights, rows)[0].numpy()
    return np.frombuffer(blob, np.float16).reshape(rows, len(query)).astype(np.float32) @ query


class ConversationStore:
    """The evicted passages of one conversation in an SQLite file.

    `path` None: a new file in a private temporary folder, deleted by `close`. Raises StoreError when the file
    cannot be opened or is not a store (a corrupt file: "file is not a database")."""

    def __init__(self, path: str | Path | None = None, use_fts5: bool | None = None):
        self._owned_dir = None
        if path is None:
            self._owned_dir = tempfile.mkdtemp(prefix="streamchat-memory-")
            path = Path(self._owned_dir) / "memory.sqlite"
        self.path = Path(path)
        self.fts5 = fts5_available() if use_fts5 is None else use_fts5
        with self._sqlite():
            self.db = sqlite3.connect(self.path, check_same_thread=False)
            # The store is the conversation's text, rebuilt from a saved session if need be: no fsync per turn
            # (a commit's fsync took ~10 ms of every turn's time to first token), the journal kept in memory.
            self.db.execute("PRAGMA synchronous=OFF")
            self.db.execute("PRAGMA journal_mode=MEMORY")
            self.db.execute("PRAGMA page_size=16384")  # a new file's: a row with its vectors fills 4 KB pages by half
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS passages (id INTEGER PRIMARY KEY, turn INTEGER NOT NULL, role TEXT NOT NULL, "
                "text TEXT NOT NULL, tokens INTEGER NOT NULL, vector BLOB, vectors INTEGER NOT NULL DEFAULT 0)"
            )
            if self.fts5:
                self.db.execute(
                    "CREATE VIRTUAL TABLE IF NOT EXISTS passages_fts USING fts5(text, content='passages', "
                    "content_rowid='id', tokenize='unicode61')"
                )
                self.db.execute(
                    "CREATE VIRTUAL TABLE IF NOT EXISTS passages_terms USING fts5vocab(passages_fts, 'row')"
                )
            self.db.commit()
            # passages, tokens, text bytes, vector bytes, passages with vectors: kept here, not summed every turn
            self._totals = list(
                self.db.execute(
                    "SELECT COUNT(*), COALESCE(SUM(tokens), 0), COALESCE(SUM(LENGTH(CAST(text AS BLOB))), 0), "
                    "COALESCE(SUM(LENGTH(vector)), 0), COUNT(vector) FROM passages"
                ).fetchone()
            )

    @contextlib.contextmanager
    def _sqlite(self):
        """Any SQLite error inside, as a StoreError naming the file (a corrupt or vanished store)."""
        try:
            yield
        except sqlite3.Error as error:
            raise StoreError(f"conversation memory {self.path}: {error}") from None

    # ----- writing ------------------------------------------------------------------------------------------

    def add(self, passages: list[Passage], vectors: list[np.ndarray] | None = None) -> None:
        """Store passages (one transaction), each with its sentence vectors (`vectors[i]`: unit vectors, float
        [k, dim], k >= 1: the passage's and its sentences', `passage_texts`; kept as float16; None: found by words
        only). Raises StoreError if the file cannot be written, ValueError for vectors that do not fit."""
        if vectors is not None and (
            len(vectors) != len(passages) or any(np.ndim(v) != 2 or not len(v) for v in vectors)
        ):
            raise ValueError(f"expected [k, dim] vectors for each of {len(passages)} passages")
        with self._sqlite(), self.db:
            for index, passage in enumerate(passages):
                vector = None if vectors is None else np.asarray(vectors[index], np.float16)
                cursor = self.db.execute(
                    "INSERT INTO passages (turn, role, text, tokens, vector, vectors) VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        passage.turn,
                        passage.role,
                        passage.text,
                        passage.tokens,
                        None if vector is None else vector.tobytes(),
                        0 if vector is None else len(vector),
                    ),
                )
                self._totals[0] += 1
                self._totals[1] += passage.tokens
                self._totals[2] += len(passage.text.encode("utf-8", "surrogatepass"))
                if vector is not None:
                    self._totals[3] += vector.nbytes
                    self._totals[4] += 1
                if self.fts5:
                    self.db.execute(
                        "INSERT INTO passages_fts (rowid, text) VALUES (?, ?)", (cursor.lastrowid, passage.text)
                    )

    def clear(self) -> None:
        """Forget everything (a new conversation)."""
        with self._sqlite(), self.db:
            self.db.execute("DELETE FROM passages")
            self._totals = [0, 0, 0, 0, 0]
            if self.fts5:
                self.db.execute("INSERT INTO passages_fts (passages_fts) VALUES ('delete-all')")

    # ----- reading ------------------------------------------------------------------------------------------

    def search(self, query: str, vector: np.ndarray | None = None, limit: int = SEARCH_CANDIDATES) -> list[Passage]:
        """The passages relevant to `query` (and its semantic `vector`, if any), best first.

        Two rankings of `limit` passages each: lexical, BM25 (Robertson et al.; FTS5's bm25(), k1 1.2, b 0.75) over
        the query's words less function words; semantic, the cosine of the passages' sentence vectors with the
        query's `vector` (unit vectors). A passage counts as relevant when it holds at least `LEXICAL_MIN_COVERAGE`
        of the query's terms weighted by IDF (`coverage`), or when its cosine is at least `SEMANTIC_MIN_COSINE`;
        the relevant ones are ordered by reciprocal rank fusion (`score`). Raises StoreError if the file cannot be
        read."""
        terms = query_terms(query)
        with self._sqlite():
            lexical = self._bm25(terms, limit)
            idf = self._idf(terms) if lexical else {}
            semantic = self._nearest(vector, limit) if vector is not None and self.has_vectors else []
        found: dict[int, Passage] = {}
        fused: dict[int, float] = {}
        total = sum(idf.values()) or 1.0
        for rank, passage in enumerate(lexical):
            words = {w.lower() for w in _WORD.findall(passage.text)}
            coverage = sum(weight for term, weight in idf.items() if term in words) / total
            if coverage >= LEXICAL_MIN_COVERAGE:
                found[passage.id] = Passage(**{**asdict(passage), "coverage": coverage})
                fused[passage.id] = 1 / (RRF_K + rank + 1)
        for rank, (passage, cosine) in enumerate(semantic):
            if passage.id in found or cosine >= SEMANTIC_MIN_COSINE:
                kept = found.get(passage.id, passage)
                found[passage.id] = Passage(**{**asdict(kept), "semantic": cosine})
                fused[passage.id] = fused.get(passage.id, 0.0) + 1 / (RRF_K + rank + 1)
        order = sorted(found, key=lambda i: (-fused[i], -found[i].lexical))  # a tie: the lexical match first
        return [Passage(**{**asdict(found[i]), "score": fused[i]}) for i in order]

    def _nearest(self, vector: np.ndarray, limit: int) -> list[tuple[Passage, float]]:
        """The `limit` passages most similar to `vector` (a unit vector), best first, each with its similarity: the
        highest cosine among its vectors (the passage's own and its sentences'). One pass through a cursor over the
        ids and vectors alone, in batches, then the winners' rows: RAM holds a batch and the best `limit`, whatever
        the store's size (4,000 passages, a 200,000-token conversation: about 20 ms, AMD EPYC, AVX2)."""
        query = np.asarray(vector, np.float32)
        width = len(query) * 2  # bytes of one float16 vector
        best_ids, best_cosines = np.zeros(0, np.int64), np.zeros(0, np.float32)
        cursor = self.db.execute("SELECT id, vector, vectors FROM passages WHERE vector IS NOT NULL")
        while rows := cursor.fetchmany(2048):
            rows = [row for row in rows if len(row[1]) == row[2] * width]  # another width: found by words only
            if not rows:
                continue
            starts = np.cumsum([0] + [row[2] for row in rows[:-1]])
            cosines = np.maximum.reduceat(_dot_float16(bytearray().join(row[1] for row in rows), query), starts)
            best_ids = np.concatenate([best_ids, np.fromiter((row[0] for row in rows), np.int64, len(rows))])
            best_cosines = np.concatenate([best_cosines, cosines])
            if len(best_ids) > limit:
                keep = np.argpartition(-best_cosines, limit)[:limit]
                best_ids, best_cosines = best_ids[keep], best_cosines[keep]
        order = np.argsort(-best_cosines, kind="stable")
        ids = [int(i) for i in best_ids[order]]
        marks = ",".join("?" * len(ids))
        found = {
            row[0]: Passage(row[1], row[2], row[3], row[4], row[0])
            for row in self.db.execute(f"SELECT id, turn, role, text, tokens FROM passages WHERE id IN ({marks})", ids)
        }
        return [(found[i], float(c)) for i, c in zip(ids, best_cosines[order]) if i in found]

    def _idf(self, terms: list[str]) -> dict[str, float]:
        """BM25's inverse document frequency of each term over the stored passages (FTS5's formula)."""
        count = self._totals[0]
        if self.fts5:
            marks = ",".join("?" * len(terms))
            rows = self.db.execute(f"SELECT term, doc FROM passages_terms WHERE term IN ({marks})", terms).fetchall()
            frequency = {**dict.fromkeys(terms, 0), **dict(rows)}
        else:
            frequency = dict.fromkeys(terms, 0)
            for (text,) in self.db.execute("SELECT text FROM passages"):
                for word in set(terms).intersection(w.lower() for w in _WORD.findall(text)):
                    frequency[word] += 1
        return {t: math.log((count - n + 0.5) / (n + 0.5) + 1) for t, n in frequency.items()}

    def _bm25(self, terms: list[str], limit: int) -> list[Passage]:
        """The `limit` best passages by BM25 over `terms`, best first (`lexical` set); none sharing no term."""
        if not terms:
            return []
        if not self.fts5:
            return self._search_plain(terms, limit)
        match = " OR ".join('"' + term.replace('"', '""') + '"' for term in terms)
        rows = self.db.execute(
            "SELECT p.id, p.turn, p.role, p.text, p.tokens, bm25(passages_fts) AS rank FROM passages_fts "
            "JOIN passages p ON p.id = passages_fts.rowid WHERE passages_fts MATCH ? ORDER BY rank LIMIT ?",
            (match, limit),
        ).fetchall()
        return [Passage(turn, role, text, tokens, id_, lexical=-rank) for id_, turn, role, text, tokens, rank in rows]

    def _search_plain(self, terms: list[str], limit: int) -> list[Passage]:
        """BM25 without FTS5: two passes over the table through a cursor (document frequencies, then scores), so
        RAM holds the terms' counts and the best `limit` passages only."""
        wanted = set(terms)
        frequency = dict.fromkeys(terms, 0)
        count = total_words = 0
        for (text,) in self.db.execute("SELECT text FROM passages"):
            words = [w.lower() for w in _WORD.findall(text)]
            count, total_words = count + 1, total_words + len(words)
            for word in wanted.intersection(words):
                frequency[word] += 1
        if not count:
            return []
        average = total_words / count
        idf = {t: math.log((count - n + 0.5) / (n + 0.5) + 1) for t, n in frequency.items()}
        best: list[Passage] = []
        for id_, turn, role, text, tokens in self.db.execute("SELECT id, turn, role, text, tokens FROM passages"):
            words = [w.lower() for w in _WORD.findall(text)]
            score = 0.0
            for term in wanted.intersection(words):
                tf = words.count(term)
                score += idf[term] * tf * (BM25_K1 + 1) / (tf + BM25_K1 * (1 - BM25_B + BM25_B * len(words) / average))
            if score > 0:
                best.append(Passage(turn, role, text, tokens, id_, lexical=score))
                best = sorted(best, key=lambda p: -p.lexical)[:limit]
        return best

    def passages(self) -> tuple[list[Passage], list[np.ndarray] | None]:
        """Every stored passage in order, and each one's vectors (float16 [k, dim]; None when some passage has
        none): for saving a session, as the store travels with it."""
        with self._sqlite():
            rows = self.db.execute(
                "SELECT id, turn, role, text, tokens, vector, vectors FROM passages ORDER BY id"
            ).fetchall()
        passages = [Passage(turn, role, text, tokens, id_) for id_, turn, role, text, tokens, _, _ in rows]
        if not rows or any(row[5] is None for row in rows):
            return passages, None
        return passages, [np.frombuffer(row[5], np.float16).reshape(row[6], -1) for row in rows]

    @property
    def has_vectors(self) -> bool:
        """Whether a semantic search can find anything (some passage has a vector)."""
        return self._totals[4] > 0

    def count(self) -> int:
        with self._sqlite():
            return self.db.execute("SELECT COUNT(*) FROM passages").fetchone()[0]

    def stats(self) -> dict[str, Any]:
        """Passages, tokens and text bytes stored, and the file's size on disk (bytes, with its journal)."""
        passages, tokens, text, vectors, _ = self._totals
        if not self.path.exists():
            raise StoreError(f"conversation memory {self.path}: the file is gone")
        size = sum(os.path.getsize(p) for p in (self.path, Path(f"{self.path}-journal")) if os.path.exists(p))
        return {
            "memory_passages": passages,
            "memory_tokens": tokens,
            "memory_text_bytes": text,
            "memory_vector_bytes": vectors,
            "memory_file_bytes": size,
            "memory_search": "fts5" if self.fts5 else "plain",
        }

    def close(self) -> None:
        """Close the file; a store that made its own temporary file deletes it."""
        try:
            self.db.close()
        except sqlite3.Error:
            pass
        if self._owned_dir is not None:
            for name in os.listdir(self._owned_dir):
                os.unlink(os.path.join(self._owned_dir, name))
            os.rmdir(self._owned_dir)
            self._owned_dir = None

    def __del__(self):
        if getattr(self, "_owned_dir", None) is not None:
            self.close()
