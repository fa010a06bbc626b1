"""User datasets (config `data.datasets`) loaded into rows of the records schema.

Sources: JSONL or Parquet at a local path, file:// or s3:// (fsspec; S3 credentials come from
the environment or `storage_options`), or a Hugging Face dataset ("hf": a folder written by
`Dataset.save_to_disk`, local or remote, else a hub id, optionally written "hf://<id>").
Rows without a `check` get {"kind": "reference"}; every row is validated and a bad one fails
with the dataset's uri, the row number and the field.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from forge.config import DatasetSpec
from forge.data.records import DataError, validate_row
from forge.data.suites.checks import validate_check

log = logging.getLogger("forge.data")

# ShareGPT-style messages ({"from": "human", "value": ...}) are common; map them to chat roles.
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system"}
_SUFFIXES = (".jsonl", ".json", ".parquet", ".gz", ".bz2", ".zst", ".xz")


def dataset_name(spec: DatasetSpec) -> str:
    """A short name for row ids: the file or folder name without extensions, or the hub id's last part."""
    name = spec.uri.rstrip("/").split("://", 1)[-1].rsplit("/", 1)[-1]
    while name.endswith(_SUFFIXES):
        name = name[: name.rfind(".")]
    return name or "dataset"


def load_rows(spec: DatasetSpec, storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """All rows of one dataset (at most spec.max_rows), validated, in the records schema."""
    if spec.max_rows is not None and spec.max_rows < 0:
        raise DataError(f"{spec.uri}: max_rows must be >= 0 (got {spec.max_rows})")
    readers = {"jsonl": _iter_jsonl, "parquet": _iter_parquet, "hf": _iter_hf}
    name = dataset_name(spec)
    rows = []
    for number, record in readers[spec.format](spec, storage_options or {}):
        if spec.max_rows is not None and len(rows) >= spec.max_rows:
            break
        rows.append(_to_row(record, spec, name, len(rows), f"{spec.uri}: row {number}"))
    if not rows:
        log.warning("dataset %s has no rows", spec.uri)
    log.info("loaded %d rows from %s (%s)", len(rows), spec.uri, spec.format)
    return rows


def _to_row(record: Any, spec: DatasetSpec, name: str, index: int, where: str) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, got {type(record).__name__}")
    if spec.messages_field not in record:
        raise DataError(f"{where}: missing field {spec.messages_field!r} (set messages_field in the "
                        f"dataset's config if the conversation lives under another name; "
                        f"fields here: {sorted(record)[:10]})")
    messages = record[spec.messages_field]
    if isinstance(messages, str):  # some Parquet/CSV exports store the list as a JSON string
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise DataError(f"{where}: field {spec.messages_field!r} is a string that is not JSON") from None
    if isinstance(messages, list):
        messages = [_chat_message(m) for m in messages]
    check = record.get("check")
    if isinstance(check, str):
        try:
            check = json.loads(check)
        except json.JSONDecodeError:
            raise DataError(f"{where}: field 'check' is a string that is not JSON") from None
    row = {
        "id": f"{name}-{index}",
        "domain": spec.domain,
        "messages": messages,
        "check": check if check is not None else {"kind": "reference"},
        "source": spec.uri,
    }
    try:
        validate_row(row, where)
    except DataError as exc:
        # validate_row names the messages list generically; say which field the user configured.
        raise DataError(str(exc).replace("'messages'", repr(spec.messages_field))
                        .replace(" messages[", f" {spec.messages_field}[")) from None
    validate_check(row["check"], where)
    return row


def _chat_message(message: Any) -> Any:
    if isinstance(message, dict) and "from" in message and "value" in message and "role" not in message:
        return {"role": _SHAREGPT_ROLES.get(str(message["from"]), str(message["from"])),
                "content": message["value"]}
    if isinstance(message, dict) and set(message) > {"role", "content"}:
        return {"role": message["role"], "content": message["content"]}  # drop extras (name, tool ids...)
    return message


def _open(uri: str, storage_options: dict[str, Any], mode: str = "rt"):
    import fsspec

    try:
        return fsspec.open(uri, mode, compression="infer", **storage_options).open()
    except FileNotFoundError:
        raise DataError(f"{uri}: dataset file not found") from None


def _iter_jsonl(spec: DatasetSpec, storage_options: dict[str, Any]) -> Iterator[tuple[int, Any]]:
    with _open(spec.uri, storage_options) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{spec.uri}: row {number}: not valid JSON ({exc.msg})") from None


def _iter_parquet(spec: DatasetSpec, storage_options: dict[str, Any]) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    with _open(spec.uri, storage_options, "rb") as f:
        try:
            parquet = pq.ParquetFile(f)
        except Exception as exc:  # pyarrow raises ArrowInvalid and friends
            raise DataError(f"{spec.uri}: not a readable Parquet file ({exc})") from None
        number = 0
        for batch in parquet.iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                number += 1
                yield number, record


def _local_path(uri: str) -> Path | None:
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    return None if "://" in uri else Path(uri)


def _iter_hf(spec: DatasetSpec, storage_options: dict[str, Any]) -> Iterator[tuple[int, Any]]:
    import datasets

    local = _local_path(spec.uri)
    if spec.uri.startswith("hf://"):
        loaded = datasets.load_dataset(spec.uri[len("hf://"):], split=spec.split)
    elif local is not None and local.exists():
        loaded = datasets.load_from_disk(str(local))
    elif local is None:  # a remote folder written by save_to_disk, e.g. s3://bucket/ds
        loaded = datasets.load_from_disk(spec.uri, storage_options=storage_options or None)
    else:  # not a local folder: a hub id
        loaded = datasets.load_dataset(spec.uri, split=spec.split)
    if isinstance(loaded, datasets.DatasetDict):
        if spec.split not in loaded:
            raise DataError(f"{spec.uri}: no split {spec.split!r}; it has {sorted(loaded)}")
        loaded = loaded[spec.split]
    yield from enumerate(loaded, 1)
