"""User datasets (JSONL, Parquet, HF saved to disk, S3) and the prep_data job end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from forge.config import DatasetSpec, load_config
from forge.data.datasets import dataset_name, load_rows
from forge.data.prepare import user_row_split
from forge.data.records import DataError, read_jsonl, validate_row
from forge.data.suites import check_answer
from forge.modifiers.local_teachers import free_port

CHATS = [
    {"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                  {"role": "assistant", "content": str(2 * i)}]}
    for i in range(30)
]
SMALL_SUITES = {"train": 12, "dev": 4, "heldout": 6, "pretrain": 10, "calib": 8}


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _check_rows(rows: list[dict], name: str, domain: str = "general") -> None:
    assert [r["id"] for r in rows] == [f"{name}-{i}" for i in range(len(rows))]
    for row, chat in zip(rows, CHATS, strict=False):
        validate_row(row, row["id"])
        assert row["messages"] == chat["messages"]
        assert row["domain"] == domain
        assert row["check"] == {"kind": "reference"}
    assert check_answer(rows[3], "6").correct and not check_answer(rows[3], "7").correct


def test_jsonl_local_path_and_file_uri(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "chats.jsonl", CHATS)
    rows = load_rows(DatasetSpec(uri=str(path), domain="reasoning"))
    assert len(rows) == 30 and rows[0]["source"] == str(path)
    _check_rows(rows, "chats", "reasoning")
    via_uri = load_rows(DatasetSpec(uri=f"file://{path}", max_rows=5))
    assert [(r["id"], r["messages"]) for r in via_uri] == [(r["id"], r["messages"]) for r in rows[:5]]


def test_jsonl_keeps_checks_custom_field_and_sharegpt(tmp_path: Path) -> None:
    records = [
        {"conv": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "Answer: 4"}],
         "check": {"kind": "numeric", "answer": 4}},
        {"conv": [{"role": "user", "content": "hi", "name": "u1"},
                  {"role": "assistant", "content": "hello"}]},
    ]
    path = _write_jsonl(tmp_path / "mix.jsonl", records)
    rows = load_rows(DatasetSpec(uri=str(path), messages_field="conv"))
    assert rows[0]["messages"][0] == {"role": "user", "content": "2+2?"}
    assert rows[0]["check"] == {"kind": "numeric", "answer": 4}
    assert check_answer(rows[0], "it is 4").correct
    assert rows[1]["messages"][0] == {"role": "user", "content": "hi"}


@pytest.mark.parametrize(("record", "message"), [
    ({"text": "no messages"}, r"bad\.jsonl: row 2: missing field 'messages'"),
    ({"messages": [{"role": "user", "content": "only a question"}]},
     r"row 2: 'messages' must be a list of at least 2"),
    ({"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]},
     r"row 2: messages\[0\] must be"),
    ({"messages": CHATS[0]["messages"][::-1]}, r"row 2: the last message must be the assistant"),
    ({**CHATS[0], "check": {"kind": "magic"}}, r"row 2: field 'check.kind' is 'magic'"),
    ({**CHATS[0], "check": {"kind": "python_tests"}},
     r"row 2: check kind 'python_tests' needs field 'check.tests'"),
])
def test_bad_rows_name_uri_row_and_field(tmp_path: Path, record: dict, message: str) -> None:
    path = _write_jsonl(tmp_path / "bad.jsonl", [CHATS[0], record])
    with pytest.raises(DataError, match=message):
        load_rows(DatasetSpec(uri=str(path)))


def test_invalid_json_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(CHATS[0]) + "\n\n{not json\n")
    with pytest.raises(DataError, match=r"broken\.jsonl: row 3: not valid JSON"):
        load_rows(DatasetSpec(uri=str(path)))
    with pytest.raises(DataError, match="dataset file not found"):
        load_rows(DatasetSpec(uri=str(tmp_path / "absent.jsonl")))


def test_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "chats.parquet"
    pq.write_table(pa.Table.from_pylist(CHATS), path, row_group_size=7)
    rows = load_rows(DatasetSpec(uri=str(path), format="parquet", domain="code"))
    assert len(rows) == 30
    _check_rows(rows, "chats", "code")
    assert len(load_rows(DatasetSpec(uri=str(path), format="parquet", max_rows=9))) == 9


def test_parquet_messages_as_json_strings_and_bad_row(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "strings.parquet"
    records = [{"messages": json.dumps(c["messages"])} for c in CHATS[:3]] + [{"messages": "[oops"}]
    pq.write_table(pa.Table.from_pylist(records), path)
    rows = load_rows(DatasetSpec(uri=str(path), format="parquet", max_rows=3))
    assert rows[2]["messages"] == CHATS[2]["messages"]
    with pytest.raises(DataError, match=r"strings\.parquet: row 4: field 'messages' is a string that is not"):
        load_rows(DatasetSpec(uri=str(path), format="parquet"))


def test_hf_dataset_saved_to_disk(tmp_path: Path) -> None:
    import datasets

    ds = datasets.Dataset.from_list(CHATS)
    ds.save_to_disk(str(tmp_path / "hf_chats"))
    rows = load_rows(DatasetSpec(uri=str(tmp_path / "hf_chats"), format="hf"))
    _check_rows(rows, "hf_chats")
    datasets.DatasetDict({"train": ds, "test": ds.select(range(4))}).save_to_disk(str(tmp_path / "dd"))
    test_rows = load_rows(DatasetSpec(uri=f"file://{tmp_path / 'dd'}", format="hf", split="test"))
    assert [r["messages"] for r in test_rows] == [c["messages"] for c in CHATS[:4]]
    with pytest.raises(DataError, match="no split 'validation'; it has"):
        load_rows(DatasetSpec(uri=str(tmp_path / "dd"), format="hf", split="validation"))


def test_dataset_names() -> None:
    assert dataset_name(DatasetSpec(uri="s3://bucket/dir/chats.jsonl.gz")) == "chats"
    assert dataset_name(DatasetSpec(uri="hf://org/my-set", format="hf")) == "my-set"
    assert dataset_name(DatasetSpec(uri="/data/saved/", format="hf")) == "saved"


def test_jsonl_from_s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3
    from moto.server import ThreadedMotoServer

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "forge-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "forge-test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="forge-data")
        body = "".join(json.dumps(c) + "\n" for c in CHATS)
        s3.put_object(Bucket="forge-data", Key="sets/chats.jsonl", Body=body)
        rows = load_rows(DatasetSpec(uri="s3://forge-data/sets/chats.jsonl", max_rows=10),
                         storage_options={"client_kwargs": {"endpoint_url": endpoint}})
        assert len(rows) == 10
        _check_rows(rows, "chats")
    finally:
        server.stop()


# --- prep_data through the runner -------------------------------------------------------------

def _prep(home: Path, monkeypatch: pytest.MonkeyPatch, run_id: str = "t1", **data) -> Path:
    from forge.runner import make_store, run_phase

    monkeypatch.setenv("FORGE_HOME", str(home))
    cfg = load_config(overrides={"data": {"suites": SMALL_SUITES, **data}})
    manifest = run_phase("prep_data", cfg, run_id, track=False)
    assert manifest.status == "complete"
    return make_store(cfg).materialize(manifest)


def test_prepare_writes_splits_corpus_and_stats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = _prep(tmp_path / "home", monkeypatch)
    assert {p.name for p in out.iterdir()} >= {"train.jsonl", "dev.jsonl", "heldout.jsonl", "calib.jsonl",
                                              "pretrain.txt", "stats.json"}
    stats = json.loads((out / "stats.json").read_text())
    assert stats["splits"] == {"train": 48, "dev": 16, "heldout": 24, "calib": 32, "pretrain": 40}
    assert stats["by_domain"]["heldout"] == {"automation": 6, "code": 6, "general": 6, "reasoning": 6}
    assert stats["reference_self_check"]["checked"] == 120
    for split in ("train", "dev", "heldout", "calib"):
        rows = read_jsonl(out / f"{split}.jsonl")
        assert len(rows) == stats["splits"][split] and all("check" in r for r in rows)
    train = read_jsonl(out / "train.jsonl")
    assert len({r["domain"] for r in train[:12]}) > 1  # shuffled, not grouped by domain
    corpus = (out / "pretrain.txt").read_text()
    blocks = corpus.split("\n\n")
    assert len(blocks) == 41 and blocks[-1] == ""  # 40 rows, each "prompt\nanswer" + blank line
    assert "<|" not in corpus
    assert all(len(b.split("\n", 1)) == 2 for b in blocks[:-1] if "def " not in b)


def test_prepare_is_deterministic_by_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = ("train.jsonl", "dev.jsonl", "heldout.jsonl", "pretrain.txt", "stats.json")
    a = _prep(tmp_path / "a", monkeypatch)
    b = _prep(tmp_path / "b", monkeypatch)
    c = _prep(tmp_path / "c", monkeypatch, seed=99)
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    for name in ("train.jsonl", "dev.jsonl", "heldout.jsonl", "pretrain.txt"):
        assert (a / name).read_bytes() != (c / name).read_bytes(), name


def test_prepare_adds_user_datasets_with_a_stable_heldout_share(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    many = [{"messages": [{"role": "user", "content": f"Say {i}"}, {"role": "assistant", "content": f"{i}"}]}
            for i in range(400)]
    path = _write_jsonl(tmp_path / "user.jsonl", many)
    out = _prep(tmp_path / "home", monkeypatch, datasets=[{"uri": str(path), "domain": "general"}])
    train, heldout = read_jsonl(out / "train.jsonl"), read_jsonl(out / "heldout.jsonl")
    user_train = [r for r in train if r["source"] == str(path)]
    user_heldout = [r for r in heldout if r["source"] == str(path)]
    assert len(user_train) + len(user_heldout) == 400
    assert 8 <= len(user_heldout) <= 36  # ~5%
    assert all(user_row_split(r["id"]) == "heldout" for r in user_heldout)
    assert all(r["check"] == {"kind": "reference"} for r in user_heldout)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["datasets"][0]["rows"] == 400 and stats["datasets"][0]["heldout"] == len(user_heldout)
    pretrain = (out / "pretrain.txt").read_text()
    assert "Say 1\n" not in pretrain  # user data is not in the pretraining corpus


def test_prepare_fails_clearly_on_a_bad_user_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write_jsonl(tmp_path / "user.jsonl", [CHATS[0], {"messages": 5}])
    with pytest.raises(DataError, match=r"user\.jsonl: row 2: 'messages' must be a list"):
        _prep(tmp_path / "home", monkeypatch, datasets=[{"uri": str(path)}])


def test_prepare_rejects_a_user_check_that_fails_its_own_reference(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    bad = [{**c, "check": {"kind": "numeric", "answer": 999}} for c in CHATS]
    path = _write_jsonl(tmp_path / "user.jsonl", bad)
    with pytest.raises(DataError, match=r"sampled reference answers fail their own check: .*expected 999"):
        _prep(tmp_path / "home", monkeypatch, datasets=[{"uri": str(path)}])
