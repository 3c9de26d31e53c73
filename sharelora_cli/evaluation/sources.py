"""Benchmark rows from a local file or a hub dataset, as a list of plain dicts."""

import csv
import json
from pathlib import Path

from sharelora_cli.core.errors import UserError, first_line

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".txt", ".parquet")


def is_local(path_or_id: str) -> bool:
    """A path (existing, absolute, relative or with a data-file suffix) rather than a hub id like openai/gsm8k."""
    return (
        Path(path_or_id).exists()
        or path_or_id.startswith(("/", ".", "~"))
        or Path(path_or_id).suffix.lower() in LOCAL_SUFFIXES
    )


def read_local(path: Path) -> list[dict]:
    """Rows of a .jsonl/.json/.csv/.parquet file; a .txt file is one row {"text": whole file}."""
    if not path.is_file():
        raise UserError(f"{path} not found: give an existing data file or set SHARELORA_DATA")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if suffix == ".json":
            rows = json.loads(path.read_text(encoding="utf-8"))
            return rows if isinstance(rows, list) else [rows]
        if suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as handle:
                return list(csv.DictReader(handle))
        if suffix == ".txt":
            return [{"text": path.read_text(encoding="utf-8")}]
        if suffix == ".parquet":
            return read_hub("parquet", split="train", data_files=str(path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as err:
        raise UserError(f"{path} cannot be read ({first_line(err)}); check the file") from None
    raise UserError(f"{path}: unsupported file type '{suffix}'; use one of {', '.join(LOCAL_SUFFIXES)}")


def first_rows(rows: list[dict], count: int, source: str, key: str) -> list[dict]:
    """The first `count` rows (few-shot examples): fewer than asked is refused, never silently used."""
    if len(rows) < count:
        raise UserError(
            f"{key}={count} but {source} has only {len(rows)} rows: pass --num-fewshot {len(rows)} "
            f"(or {key}={len(rows)}), or add rows to it"
        )
    return rows[:count]


def read_hub(dataset_id: str, split: str, name: str | None = None, data_files: str | None = None) -> list[dict]:
    """One split of a dataset loaded with `datasets` (from its cache when offline)."""
    import datasets

    try:
        rows = datasets.load_dataset(dataset_id, name, split=split, data_files=data_files)
    except Exception as err:  # datasets raises many unrelated types for a missing or unreachable dataset
        hint = "pass a local path, or check the id and your network (HF_HUB_OFFLINE=1 only uses the cache)"
        raise UserError(
            f"dataset '{dataset_id}' split '{split}' cannot be loaded ({first_line(err)}): {hint}"
        ) from None
    return [dict(row) for row in rows]


def read_rows(path_or_id: str, split: str, name: str | None = None) -> list[dict]:
    """A local file's rows, or one split of a hub dataset."""
    return read_local(Path(path_or_id).expanduser()) if is_local(path_or_id) else read_hub(path_or_id, split, name)
