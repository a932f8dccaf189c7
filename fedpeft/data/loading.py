"""Read train/test text from TSV, CSV, JSONL or Hugging Face datasets into one shape.

Whatever the source, the result is a pair of ``datasets.Dataset`` with a ``text``
column and, for classification, an integer ``label`` column (class names are kept in
:attr:`TextData.label_names`). Extra columns survive only when asked for (a column to
partition by).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import datasets

from fedpeft.config import DataConfig
from fedpeft.errors import DataError

TEXT = "text"
LABEL = "label"

_SUFFIX_FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}


@dataclass(frozen=True)
class TextData:
    """Train and test splits in the common shape, plus the class names (None for LM)."""

    train: datasets.Dataset
    test: datasets.Dataset
    label_names: list[str] | None

    @property
    def num_labels(self) -> int | None:
        """Number of classes, or None when there are no labels."""
        return None if self.label_names is None else len(self.label_names)


def resolve_data_path(location: str) -> Path:
    """``builtin:<file>`` -> the file inside fedpeft's package data; other paths as given."""
    if location.startswith("builtin:"):
        return Path(str(resources.files("fedpeft.data") / "builtin" / location.removeprefix("builtin:")))
    return Path(location).expanduser()


def load_text_data(config: DataConfig, keep_columns: Sequence[str] = ()) -> TextData:
    """Load both splits, check the configured columns and encode labels as integers.

    Args:
        config: The data section.
        keep_columns: Extra source columns to keep (e.g. the partition column).

    """
    train_rows = _read_split(config, config.train, config.train_split, "data.train")
    test_rows = _read_split(config, config.test, config.test_split, "data.test")
    wanted = [config.text_column, *([config.label_column] if config.label_column else [])]
    for name, rows in (("data.train", train_rows), ("data.test", test_rows)):
        _check_columns(rows, [*wanted, *keep_columns] if name == "data.train" else wanted, name)
    if config.max_train_examples:
        train_rows = train_rows.select(range(min(config.max_train_examples, len(train_rows))))
    if config.max_test_examples:
        test_rows = test_rows.select(range(min(config.max_test_examples, len(test_rows))))

    label_names = None
    if config.label_column:
        label_names = sorted({str(v) for v in train_rows[config.label_column]}, key=_natural_key)
    train = _to_common_shape(train_rows, config, label_names, keep_columns, "data.train")
    test = _to_common_shape(test_rows, config, label_names, (), "data.test")
    return TextData(train=train, test=test, label_names=label_names)


def _natural_key(value: str) -> tuple[int, Any]:
    """Sort numeric labels numerically ("2" < "10") and others alphabetically."""
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)


def _read_split(config: DataConfig, location: str, split: str, key: str) -> datasets.Dataset:
    if config.format == "hf":
        return _read_hf(location, split, key)
    path = resolve_data_path(location)
    if not path.is_file():
        raise DataError(f"{key}: file not found: {path}")
    fmt: str = config.format
    if fmt == "auto":
        fmt = _SUFFIX_FORMATS.get(path.suffix.lower(), "")
        if not fmt:
            raise DataError(
                f"{key}: cannot tell the format of {path.name} from its suffix; "
                "set data.format to tsv, csv, jsonl or hf"
            )
    if fmt == "jsonl":
        records = _read_jsonl(path, key)
    else:
        records = _read_delimited(path, "\t" if fmt == "tsv" else ",", key)
    if not records:
        raise DataError(f"{key}: {path} holds no rows")
    return datasets.Dataset.from_list(records)


def _read_delimited(path: Path, delimiter: str, key: str) -> list[dict[str, Any]]:
    # GLUE-style TSVs contain bare quotes inside sentences: read them without quoting.
    quoting: Literal[0, 3] = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter, quoting=quoting)
        rows = []
        for line_no, row in enumerate(reader, start=2):
            if None in row:
                raise DataError(f"{key}: {path}:{line_no}: more fields than header columns")
            rows.append({k.strip(): (v.strip() if v is not None else v) for k, v in row.items()})
    return rows


def _read_jsonl(path: Path, key: str) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{key}: {path}:{line_no}: not valid JSON: {err.msg}") from None
            if not isinstance(record, dict):
                raise DataError(f"{key}: {path}:{line_no}: expected a JSON object per line")
            rows.append(record)
    return rows


def _read_hf(location: str, split: str, key: str) -> datasets.Dataset:
    """A dataset saved with ``save_to_disk``, a local dataset folder, or a hub name."""
    path = Path(location).expanduser()
    try:
        if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DataError(f"{key}: split {split!r} not in {path} ({', '.join(loaded)})")
                return loaded[split]
            return loaded
        result = datasets.load_dataset(location, split=split)
    except DataError:
        raise
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as err:
        raise DataError(
            f"{key}: cannot load Hugging Face dataset {location!r} split {split!r}: {err}"
        ) from None
    assert isinstance(result, datasets.Dataset)
    return result


def _check_columns(rows: datasets.Dataset, wanted: Sequence[str], key: str) -> None:
    for column in wanted:
        if column not in rows.column_names:
            have = ", ".join(rows.column_names)
            raise DataError(f"{key}: column {column!r} not found (columns: {have})")


def _to_common_shape(
    rows: datasets.Dataset,
    config: DataConfig,
    label_names: list[str] | None,
    keep_columns: Sequence[str],
    key: str,
) -> datasets.Dataset:
    columns: dict[str, list[Any]] = {TEXT: [str(t) for t in rows[config.text_column]]}
    if config.label_column and label_names is not None:
        index = {name: i for i, name in enumerate(label_names)}
        labels = []
        for value in rows[config.label_column]:
            if str(value) not in index:
                raise DataError(f"{key}: label {value!r} does not occur in the training split")
            labels.append(index[str(value)])
        columns[LABEL] = labels
    for column in keep_columns:
        columns[column] = list(rows[column])
    return datasets.Dataset.from_dict(columns)
