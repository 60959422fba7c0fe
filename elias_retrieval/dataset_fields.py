"""Which fields of a JSON-lines dataset hold its text and its labels.

In order: what the config sets explicitly (`--set data.text_fields=...`), the dataset directory's own
`dataset.json`, and otherwise the common field names found in the train split's rows:

    {"text_fields": ["title", "abstract"], "label_field": "subjects", "language": "de,en"}

Every key of `dataset.json` is optional. `language` is recorded with the model (tf-idf itself is
language-agnostic: word n-grams, no stop-word list).
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path
from typing import Any

from elias_retrieval.config import DataConfig

DATASET_FILE = "dataset.json"
# Known text fields, in the order their texts are joined: a title before the body it heads.
TEXT_FIELD_NAMES = ("title", "header", "abstract", "summary", "recitals", "main_body", "body", "text", "content",
                    "description")
LABEL_FIELD_NAMES = ("labels", "label", "tags", "categories", "subjects")
# Rows of the train split looked at to find the fields.
_SAMPLE_ROWS = 1000


class DatasetFieldsError(ValueError):
    """A dataset's fields cannot be determined, or `dataset.json` is malformed."""


def _read_dataset_file(dataset_dir: Path) -> dict[str, Any]:
    path = dataset_dir / DATASET_FILE
    if not path.is_file():
        return {}
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetFieldsError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(spec, dict):
        raise DatasetFieldsError(f"{path}: expected a JSON object")
    unknown = sorted(set(spec) - {"text_fields", "label_field", "language"})
    if unknown:
        raise DatasetFieldsError(f"{path}: unknown key {unknown[0]!r} (known: text_fields, label_field, language)")
    fields = spec.get("text_fields", [])
    if not isinstance(fields, list) or not all(isinstance(f, str) and f for f in fields):
        raise DatasetFieldsError(f"{path}: text_fields must be a list of field names")
    for key in ("label_field", "language"):
        if not isinstance(spec.get(key, ""), str):
            raise DatasetFieldsError(f"{path}: {key} must be a string")
    return spec


def sample_fields(path: Path, rows: int = _SAMPLE_ROWS) -> tuple[Counter[str], Counter[str]]:
    """Among the first `rows` rows of a JSON-lines file: how many rows hold each field with text (a non-empty
    string or list of strings), and how many hold each field with a list (a label field candidate)."""
    from elias_retrieval.data import open_text

    texts: Counter[str] = Counter()
    lists: Counter[str] = Counter()
    with open_text(path) as f:
        seen = 0
        for line in f:
            if seen >= rows:
                break
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # the reader reports it, with its line number
            if not isinstance(row, dict):
                continue
            seen += 1
            for key, value in row.items():
                if isinstance(value, list):
                    lists[key] += 1
                if (isinstance(value, str) and value.strip()) or (
                        isinstance(value, list) and any(isinstance(v, str) and v.strip() for v in value)):
                    texts[key] += 1
    return texts, lists


def describe_fields(counts: Counter[str]) -> str:
    """'a, b, c' (the fields the rows have), for error messages."""
    return ", ".join(sorted(counts)) or "none"


def resolve_data_config(dataset_dir: str | Path, cfg: DataConfig, train_file: Path | None = None) -> DataConfig:
    """`cfg` with its text and label fields decided: explicit settings, then `dataset.json`, then the common
    field names found in `train_file` (the train split, a JSON-lines file; None: no rows to look at)."""
    d = Path(dataset_dir)
    spec = _read_dataset_file(d)
    out = dataclasses.replace(cfg, text_fields=list(cfg.text_fields))
    if not out.text_fields:
        out.text_fields = list(spec.get("text_fields", []))
    if not out.label_field:
        out.label_field = spec.get("label_field", "")
    if not out.language:
        out.language = spec.get("language", "")
    if (out.text_fields and out.label_field) or train_file is None:
        out.label_field = out.label_field or LABEL_FIELD_NAMES[0]
        return out
    texts, lists = sample_fields(train_file)
    if not out.label_field:
        found = [n for n in LABEL_FIELD_NAMES if lists[n]]
        if not found:
            raise DatasetFieldsError(
                f"{train_file}: no label field found (looked for {', '.join(LABEL_FIELD_NAMES)}); the rows have "
                f"fields {describe_fields(texts | lists)}: name it in {d / DATASET_FILE} or with "
                "--set data.label_field=NAME")
        out.label_field = found[0]
    if not out.text_fields:
        out.text_fields = [n for n in TEXT_FIELD_NAMES if texts[n] and n != out.label_field]
        if not out.text_fields:
            raise DatasetFieldsError(
                f"{train_file}: no text field found (looked for {', '.join(TEXT_FIELD_NAMES)}); the rows have "
                f"fields {describe_fields(texts | lists)}: name them in {d / DATASET_FILE} or with "
                "--set 'data.text_fields=[\"NAME\"]'")
    return out
