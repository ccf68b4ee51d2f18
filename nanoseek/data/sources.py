"""Documents from local files: text (one document per file), JSONL (one per line, a configurable field) and
Parquet (one per row of a column), by path, directory or glob. Bad input names the file and line."""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".md")
SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".parquet")


class DataError(ValueError):
    """Unusable training data; the message names the file (and line) and the problem."""


def resolve(paths: list[str]) -> list[Path]:
    """Expand globs and directories into a sorted list of supported files."""
    files: list[Path] = []
    for pattern in paths:
        matches = sorted(glob.glob(pattern, recursive=True)) or [pattern]
        for match in map(Path, matches):
            if match.is_dir():
                files.extend(sorted(p for p in match.rglob("*") if p.suffix in SUFFIXES and p.is_file()))
            elif match.is_file():
                if match.suffix not in SUFFIXES:
                    raise DataError(f"{match}: unsupported file type {match.suffix!r}; use {', '.join(SUFFIXES)}")
                files.append(match)
            else:
                raise DataError(f"{pattern}: no such file, directory or glob match")
    if not files:
        raise DataError(f"no data files in {', '.join(paths)}")
    return files


def read_documents(files: list[Path], field: str = "text") -> Iterator[str]:
    for file in files:
        if file.suffix in TEXT_SUFFIXES:
            try:
                text = file.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
            if text.strip():
                yield text
        elif file.suffix == ".jsonl":
            yield from _jsonl(file, field)
        else:
            yield from _parquet(file, field)


def iter_jsonl(file: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for each non-blank line; bad JSON names the file and line."""
    with Path(file).open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{file}:{number}: not UTF-8 text ({exc.reason})") from exc
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{file}:{number}: not valid JSON ({exc.msg})") from exc


def _jsonl(file: Path, field: str) -> Iterator[str]:
    for number, record in iter_jsonl(file):
        if not isinstance(record, dict) or field not in record:
            raise DataError(f"{file}:{number}: no field {field!r} (set the field to read with --field)")
        if not isinstance(record[field], str):
            raise DataError(f"{file}:{number}: field {field!r} is {type(record[field]).__name__}, not text")
        yield record[field]


def _parquet(file: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(file)
    except Exception as exc:  # pyarrow raises its own error types
        raise DataError(f"{file}: cannot read Parquet ({exc})") from exc
    if field not in table.column_names:
        raise DataError(f"{file}: no column {field!r} (columns: {', '.join(table.column_names)})")
    for row, value in enumerate(table.column(field).to_pylist()):
        if not isinstance(value, str):
            raise DataError(f"{file}: row {row} of column {field!r} is {type(value).__name__}, not text")
        yield value
