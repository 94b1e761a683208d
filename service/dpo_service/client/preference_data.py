"""Preference datasets for the remote trainer: JSONL or Parquet, in TRL's three forms.

One row per example, read by the file's extension (``.jsonl`` / ``.ndjson``: one JSON object
per line, blank lines skipped; ``.parquet``: read with pyarrow, the ``trainer`` extra):

- **standard**: ``prompt``, ``chosen``, ``rejected`` strings;
- **conversational**: ``prompt`` a list of ``{"role", "content"}`` messages, ``chosen`` /
  ``rejected`` lists of assistant messages (or strings);
- **implicit prompt**: no ``prompt``. Conversations (``chosen`` / ``rejected`` message lists
  sharing their first messages) are sent as they are: the service finds the prompt. Strings
  are split here the way TRL's ``extract_prompt`` splits them: the prompt is their longest
  common prefix, less a trailing space, which starts both responses instead.

Other columns are ignored. A malformed row raises :class:`DatasetError` naming the file, the
line (JSONL, 1-based) or row (Parquet, 0-based) and the field.

The ``datasets`` library is not used: it would add pandas, fsspec, the Hub client and an on-disk
cache to read two local formats that ``json`` and pyarrow (its own Parquet engine) read directly.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dpo_service.client.messages import check_conversation_pair, is_message_list

__all__ = ["DatasetError", "PreferenceExample", "load_examples", "parse_example", "read_rows"]

Form = Literal["standard", "conversational", "implicit"]
Text = str | list[dict[str, str]]
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)


class DatasetError(ValueError):
    """A dataset that cannot be read, or a row that is not a preference example."""


@dataclass(frozen=True)
class PreferenceExample:
    """One example; ``prompt`` is None for an implicit-prompt conversation."""

    form: Form
    chosen: Text
    rejected: Text
    prompt: Text | None = None

    def to_pair(self) -> dict[str, Any]:
        """The request's pair: ``{"prompt", "chosen", "rejected"}`` (no prompt if None)."""
        pair: dict[str, Any] = {"chosen": self.chosen, "rejected": self.rejected}
        if self.prompt is not None:
            pair = {"prompt": self.prompt, **pair}
        return pair


def _string(row: Mapping[str, Any], key: str, *, allow_empty: bool = False) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise ValueError(f"{key}: expected a string, got {type(value).__name__}")
    if not value and not allow_empty:
        raise ValueError(f"{key}: the response is empty")
    return value


def split_implicit_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """``(prompt, chosen, rejected)`` from two texts that start with the same prompt (TRL's
    ``extract_prompt`` rule: the longest common prefix, less a trailing space)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == len(chosen) or n == len(rejected):
        side = "chosen" if n == len(chosen) else "rejected"
        raise ValueError(f"{side}: nothing follows the prompt shared with the other response")
    if n > 0 and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def parse_example(row: object) -> PreferenceExample:
    """One row as an example; ``ValueError("<field>: <problem>")`` when it is not one."""
    if not isinstance(row, Mapping):
        raise ValueError(f"row: expected an object, got {type(row).__name__}")
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            raise ValueError(f"{key}: missing")
    prompt = row.get("prompt")
    conversational = any(is_message_list(row.get(k)) for k in ("prompt", "chosen", "rejected"))
    if conversational or (prompt is not None and not isinstance(prompt, str)):
        pair = check_conversation_pair(
            {k: row[k] for k in ("prompt", "chosen", "rejected") if row.get(k) is not None}
        )
        form: Form = "conversational" if "prompt" in pair else "implicit"
        return PreferenceExample(form, pair["chosen"], pair["rejected"], pair.get("prompt"))
    if prompt is None:
        cut = split_implicit_prompt(_string(row, "chosen"), _string(row, "rejected"))
        return PreferenceExample("implicit", cut[1], cut[2], cut[0])
    return PreferenceExample(
        "standard",
        _string(row, "chosen"),
        _string(row, "rejected"),
        _string(row, "prompt", allow_empty=True),
    )


def read_rows(path: Path) -> Iterator[tuple[str, object]]:
    """``(where, row)`` for every row of a JSONL or Parquet file (``where``: ``file:line`` or
    ``file: row i``)."""
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        yield from _jsonl_rows(path)
    elif suffix in PARQUET_SUFFIXES:
        yield from _parquet_rows(path)
    else:
        known = ", ".join(JSONL_SUFFIXES + PARQUET_SUFFIXES)
        raise DatasetError(f"{path}: unknown dataset format {suffix or '(none)'!r}: use {known}")


def _jsonl_rows(path: Path) -> Iterator[tuple[str, object]]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            yield f"{path}:{lineno}", row


def _parquet_rows(path: Path) -> Iterator[tuple[str, object]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - the trainer extra installs it
        raise DatasetError(
            f"{path}: reading Parquet needs pyarrow (pip install 'dpo-loss-service[trainer]')"
        ) from None
    try:
        parquet = pq.ParquetFile(path)
        index = 0
        for batch in parquet.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield f"{path}: row {index}", row
                index += 1
    except (pa.ArrowException, OSError) as exc:
        raise DatasetError(f"{path}: not a readable Parquet file ({exc})") from None


def load_examples(path: Path) -> list[PreferenceExample]:
    """Every example of a dataset file; :class:`DatasetError` for the first bad row."""
    examples = []
    for where, row in read_rows(path):
        try:
            examples.append(parse_example(row))
        except ValueError as exc:
            raise DatasetError(f"{where}: {exc}") from None
    if not examples:
        raise DatasetError(f"{path}: no preference pairs")
    return examples
