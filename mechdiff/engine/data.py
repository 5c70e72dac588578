"""Prompt sets: load CSV / JSON / JSONL datasets of prompts into a :class:`PromptSet`.

The loader accepts the shapes real research datasets come in unchanged:

* "geometry-of-truth" style CSVs: ``statement,label[,...]``;
* instruction lists (harmful / harmless prompts): ``instruction`` or ``goal`` field, optional label;
* generic ``text`` / ``prompt`` datasets.

Every bad input raises :class:`DataError` with a one-line message naming the file, the row where
relevant (1-based, counting data rows: the first row after a CSV header is row 1; JSONL errors
give the file line) and the problem.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from mechdiff.errors import MechdiffError

__all__ = ["DataError", "PromptSet", "load_prompts", "TEXT_COLUMNS"]

#: Column names tried, in order, when ``text_column`` is not given.
TEXT_COLUMNS: tuple[str, ...] = ("text", "statement", "instruction", "goal", "prompt")

# Keys under which a JSON object may hold its list of rows, preferred in this order.
_LIST_KEYS = ("data", "examples", "rows", "items", "records", "prompts", "instructions")

_TRUE = {"1", "true"}
_FALSE = {"0", "false"}


class DataError(MechdiffError, ValueError):
    """A prompt file could not be loaded; the message names the file, row and problem."""


@dataclass
class PromptSet:
    """Prompts plus per-example columns (labels, topics, ...), all of one length."""

    texts: list[str]
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    source: str = "<memory>"
    text_column: str = "text"

    def __post_init__(self) -> None:
        self.texts = [str(t) for t in self.texts]
        n = len(self.texts)
        for name, col in self.columns.items():
            if len(col) != n:
                raise ValueError(f"column {name!r} has {len(col)} values for {n} texts")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def hash(self) -> str:
        """sha256 hex digest over the texts and the columns (names, kinds and values).

        Independent of the file path and of dict order, stable across runs and platforms.
        """
        h = hashlib.sha256()
        h.update(b"mechdiff.PromptSet.v1\0")
        _hash_strings(h, self.texts)
        for name in sorted(self.columns):
            col = np.asarray(self.columns[name])
            h.update(b"\0col\0" + name.encode() + b"\0")
            if col.dtype.kind in "iub":
                h.update(b"i" + col.astype("<i8").tobytes())
            elif col.dtype.kind == "f":
                h.update(b"f" + col.astype("<f8").tobytes())
            else:
                h.update(b"s")
                _hash_strings(h, [str(v) for v in col.tolist()])
        return h.hexdigest()

    def subset(self, indices: Sequence[int] | np.ndarray) -> PromptSet:
        """A new PromptSet with the rows at ``indices`` (integer positions or a boolean mask)."""
        idx = np.asarray(indices)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise ValueError(f"boolean mask of shape {idx.shape} for {len(self)} prompts")
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64, copy=False).reshape(-1)
        return PromptSet(
            texts=[self.texts[i] for i in idx.tolist()],
            columns={k: v[idx] for k, v in self.columns.items()},
            source=self.source,
            text_column=self.text_column,
        )

    @classmethod
    def from_texts(cls, texts: Iterable[str], **columns: Any) -> PromptSet:
        """Build a PromptSet in memory; columns are normalised like loaded ones (label -> 0/1)."""
        texts = list(texts)
        source = "<memory>"
        for i, t in enumerate(texts, start=1):
            if not isinstance(t, str) or not t.strip():
                raise DataError(f"{source}: row {i}: empty text")
        cols = {
            name: _column_array(source, name, list(values), row_base=1) for name, values in columns.items()
        }
        return cls(texts=texts, columns=cols, source=source, text_column="text")


def load_prompts(
    path: str | Path, *, text_column: str | None = None, limit: int | None = None
) -> PromptSet:
    """Load prompts from a CSV (or TSV), JSON or JSONL file.

    Args:
        path: the file; the format comes from its suffix (.csv, .tsv, .json, .jsonl, .ndjson).
        text_column: the column holding the prompt text; default the first of
            ``text, statement, instruction, goal, prompt`` present.
        limit: keep only the first ``limit`` rows.

    All other columns become ``PromptSet.columns``: numeric columns as int64/float64 arrays,
    all-boolean JSON columns as bool arrays, the rest as str arrays. A ``label`` column is
    normalised to int64 0/1 (accepts 0/1, "0"/"1", true/false in any case, booleans).
    """
    p = Path(path)
    src = str(path)
    if limit is not None and limit < 0:
        raise DataError(f"{src}: limit must be >= 0, got {limit}")
    if not p.exists():
        raise DataError(f"{src}: file not found")
    if not p.is_file():
        raise DataError(f"{src}: not a file")
    try:
        raw = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{src}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{src}: cannot read file ({e.strerror or e})") from None

    suffix = p.suffix.lower()
    if suffix in (".csv", ".tsv"):
        names, rows, where = _read_csv(src, raw, "\t" if suffix == ".tsv" else ",", limit)
    elif suffix in (".jsonl", ".ndjson"):
        names, rows, where = _read_jsonl(src, raw, limit)
    elif suffix == ".json":
        names, rows, where = _read_json(src, raw, limit)
    else:
        raise DataError(f"{src}: unsupported file type {suffix or '(no suffix)'!r}; use .csv, .tsv, .json or .jsonl")

    if not rows:
        raise DataError(f"{src}: empty dataset (no data rows)")

    tcol = _pick_text_column(src, names, text_column)
    texts: list[str] = []
    for r, row in enumerate(rows):
        value = row.get(tcol)
        text = "" if value is None else (value if isinstance(value, str) else str(value))
        if not text.strip():
            raise DataError(f"{src}: {where(r)}: empty text in column {tcol!r}")
        texts.append(text)

    columns: dict[str, np.ndarray] = {}
    for name in names:
        if name == tcol:
            continue
        values = [row.get(name) for row in rows]
        columns[name] = _column_array(src, name, values, where=where)
    return PromptSet(texts=texts, columns=columns, source=src, text_column=tcol)


# ---------------------------------------------------------------------------------------------
# readers: each returns (column names in file order, rows as dicts, row index -> "row N" text)


def _read_csv(src: str, raw: str, delimiter: str, limit: int | None):
    reader = csv.reader(raw.splitlines(keepends=True), delimiter=delimiter)
    try:
        header: list[str] | None = None
        rows: list[dict[str, Any]] = []
        for fields in reader:
            if not fields or all(not f.strip() for f in fields):
                continue  # blank lines are not data
            if header is None:
                header = [h.strip() for h in fields]
                _check_header(src, header)
                continue
            if limit is not None and len(rows) >= limit:
                break
            if len(fields) != len(header):
                raise DataError(
                    f"{src}: row {len(rows) + 1} (line {reader.line_num}) has {len(fields)} fields, "
                    f"the header has {len(header)}"
                )
            rows.append(dict(zip(header, fields)))
    except csv.Error as e:
        raise DataError(f"{src}: malformed CSV at line {reader.line_num}: {e}") from None
    if header is None:
        raise DataError(f"{src}: empty dataset (no header, no rows)")
    return header, rows, lambda i: f"row {i + 1}"


def _check_header(src: str, header: list[str]) -> None:
    seen: set[str] = set()
    for j, h in enumerate(header, start=1):
        if not h:
            raise DataError(f"{src}: header column {j} has no name")
        if h in seen:
            raise DataError(f"{src}: header names column {h!r} twice")
        seen.add(h)


def _read_jsonl(src: str, raw: str, limit: int | None):
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        if limit is not None and len(rows) >= limit:
            break
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{src}: line {lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        rows.append(_as_row(src, obj, f"line {lineno}"))
        lines.append(lineno)
    return _union_keys(rows), rows, lambda i: f"line {lines[i]}"


def _read_json(src: str, raw: str, limit: int | None):
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as e:
        # A .json file holding JSON Lines is common enough to accept.
        if e.msg == "Extra data" and raw.lstrip().startswith("{"):
            return _read_jsonl(src, raw, limit)
        raise DataError(f"{src}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if isinstance(doc, dict):
        doc = _list_in_object(src, doc)
    if not isinstance(doc, list):
        raise DataError(f"{src}: expected a list of objects (or an object holding one), got {type(doc).__name__}")
    if limit is not None:
        doc = doc[:limit]
    rows = [_as_row(src, obj, f"row {i}") for i, obj in enumerate(doc, start=1)]
    return _union_keys(rows), rows, lambda i: f"row {i + 1}"


def _list_in_object(src: str, doc: dict) -> list:
    lists = [k for k, v in doc.items() if isinstance(v, list)]
    if len(lists) == 1:
        return doc[lists[0]]
    for k in _LIST_KEYS:
        if k in lists:
            return doc[k]
    if not lists:
        raise DataError(f"{src}: JSON object holds no list of rows (keys: {', '.join(map(str, doc)) or 'none'})")
    raise DataError(f"{src}: JSON object holds several lists ({', '.join(lists)}); cannot tell which holds the rows")


def _as_row(src: str, obj: Any, where: str) -> dict[str, Any]:
    if isinstance(obj, dict):
        return obj
    if isinstance(obj, str):
        return {"text": obj}  # a plain list of prompts
    raise DataError(f"{src}: {where}: expected an object, got {type(obj).__name__}")


def _union_keys(rows: list[dict[str, Any]]) -> list[str]:
    names: dict[str, None] = {}
    for row in rows:
        for k in row:
            names.setdefault(str(k), None)
    return list(names)


def _pick_text_column(src: str, names: list[str], text_column: str | None) -> str:
    found = ", ".join(names) or "none"
    if text_column is not None:
        if text_column not in names:
            raise DataError(f"{src}: text column {text_column!r} not found (columns: {found})")
        return text_column
    for c in TEXT_COLUMNS:
        if c in names:
            return c
    raise DataError(
        f"{src}: no text column (columns: {found}); expected one of {', '.join(TEXT_COLUMNS)} or pass text_column="
    )


# ---------------------------------------------------------------------------------------------
# column typing


def _column_array(src: str, name: str, values: list[Any], *, where=None, row_base: int = 1) -> np.ndarray:
    """Type one column: label -> int 0/1; numbers -> int64/float64; all-bool -> bool; else str."""
    where = where or (lambda i: f"row {i + row_base}")
    if name == "label":
        return _labels(src, values, where)
    if isinstance(values, np.ndarray):
        values = values.tolist()
    # CSV cells arrive as strings: parse numbers out of them; JSON values keep their own types.
    parsed = [_parse_cell(v) for v in values]
    non_null = [v for v in parsed if v is not None]
    if non_null and all(isinstance(v, bool) for v in non_null) and len(non_null) == len(parsed):
        return np.array(parsed, dtype=bool)
    if non_null and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in non_null):
        if len(non_null) == len(parsed) and all(isinstance(v, int) for v in parsed):
            return np.array(parsed, dtype=np.int64)
        return np.array([math.nan if v is None else float(v) for v in parsed], dtype=np.float64)
    return np.array([_as_str(v) for v in values], dtype=str)


def _parse_cell(v: Any) -> Any:
    if v is None:
        return None
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return None if math.isnan(v) else float(v)
    if isinstance(v, str):
        s = v.strip()
        if not s:
            return None
        try:
            return int(s)
        except ValueError:
            pass
        try:
            f = float(s)
        except ValueError:
            return s
        return f if math.isfinite(f) or s.lower() in ("inf", "-inf", "nan") else s
    return v


def _as_str(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, (dict, list)):
        return json.dumps(v, ensure_ascii=False, sort_keys=True)
    return str(v)


def _labels(src: str, values: list[Any], where) -> np.ndarray:
    out = np.empty(len(values), dtype=np.int64)
    for i, v in enumerate(values):
        lab = _label(v)
        if lab is None:
            shown = repr(v) if not isinstance(v, str) or len(v) <= 40 else repr(v[:40] + "...")
            raise DataError(f"{src}: {where(i)}: label {shown} is not 0/1/true/false")
        out[i] = lab
    return out


def _label(v: Any) -> int | None:
    if isinstance(v, (bool, np.bool_)):
        return int(v)
    if isinstance(v, (int, np.integer)):
        return int(v) if v in (0, 1) else None
    if isinstance(v, (float, np.floating)):
        return int(v) if v in (0.0, 1.0) else None
    if isinstance(v, str):
        s = v.strip().lower()
        if s in _TRUE:
            return 1
        if s in _FALSE:
            return 0
    return None


def _hash_strings(h: "hashlib._Hash", strings: Iterable[str]) -> None:
    # Length-prefixed so that ["ab", "c"] and ["a", "bc"] hash differently.
    for s in strings:
        b = s.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
