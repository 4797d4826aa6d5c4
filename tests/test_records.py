"""Reading and validating LLaVA records: every problem names the file, record, id and field."""

import json

import pytest

from llavakit.data.records import (
    InvalidRecordsError,
    RecordFileError,
    RecordStore,
    check_record,
    load_records,
    validate_store,
)

from .conftest import conv, write_json, write_jsonl


def test_json_and_jsonl_read_the_same(tmp_path, sample_records):
    a = RecordStore.load(write_json(tmp_path / "a.json", sample_records))
    b = RecordStore.load(write_jsonl(tmp_path / "b.jsonl", sample_records))
    assert list(a) == list(b) == sample_records


def test_user_assistant_roles_and_int_ids_accepted():
    rec, probs = check_record({"id": 7, "conversations": [{"from": "user", "value": "hi"},
                                                          {"from": "assistant", "value": "hello"}]}, 0, "f.json")
    assert probs == [] and rec.id == "7" and [t.role for t in rec.turns] == ["human", "gpt"]


def test_image_list_for_several_images():
    rec, probs = check_record({"id": "m", "image": ["a.jpg", "b.jpg"],
                               "conversations": conv("<image> and <image>?", "Both.")}, 0, "f")
    assert probs == [] and rec.images == ["a.jpg", "b.jpg"]


BAD = [
    ("missing_field", {"conversations": conv("q", "a")}, "field 'id'"),
    ("missing_field", {"id": "x"}, "field 'conversations'"),
    ("empty_conversations", {"id": "x", "conversations": []}, "field 'conversations'"),
    ("wrong_type", {"id": "x", "conversations": "hello"}, "field 'conversations'"),
    ("wrong_type", {"id": ["x"], "conversations": conv("q", "a")}, "field 'id'"),
    ("wrong_type", {"id": "x", "image": 5, "conversations": conv("<image>q", "a")}, "field 'image'"),
    ("wrong_type", {"id": "x", "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]},
     "field 'conversations[0].value'"),
    ("bad_role", {"id": "x", "conversations": [{"from": "bot", "value": "q"}]}, "conversations[0].from"),
    ("role_order", {"id": "x", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},
     "conversations[0].from"),
    ("role_order", {"id": "x", "conversations": conv("q", "a", "q2")}, "no gpt answer"),
    ("empty_answer", {"id": "x", "conversations": conv("q", "  ")}, "conversations[1].value"),
    ("image_count_mismatch", {"id": "x", "image": "a.jpg", "conversations": conv("no placeholder", "a")},
     "0 '<image>' placeholder(s) for 1 image"),
    ("image_count_mismatch", {"id": "x", "image": ["a.jpg", "b.jpg"], "conversations": conv("<image>", "a")},
     "1 '<image>' placeholder(s) for 2"),
    ("unexpected_image_token", {"id": "x", "conversations": conv("<image>\nq", "a")}, "has no 'image'"),
    ("wrong_type", [1, 2], "expected a JSON object"),
]


@pytest.mark.parametrize("kind,raw,fragment", BAD)
def test_each_invalid_kind_is_named(kind, raw, fragment):
    rec, probs = check_record(raw, 3, "data.json")
    assert rec is None
    assert kind in [p.kind for p in probs]
    msg = next(p.message for p in probs if p.kind == kind)
    assert msg.startswith("data.json: record 3 (id=")
    assert fragment in msg


def test_duplicate_ids_are_a_warning(tmp_path, sample_records):
    recs = sample_records + [dict(sample_records[0])]
    store = RecordStore.load(write_json(tmp_path / "d.json", recs))
    valid, probs = validate_store(store)
    assert len(valid) == len(recs)
    (dup,) = probs
    assert dup.kind == "duplicate_id" and dup.severity == "warning" and "duplicate of record 0" in dup.message


def test_invalid_json_reports_line_and_column(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[\n  {"id": "a", "conversations": []},\n  {"id": "b" "x"}\n]')
    with pytest.raises(RecordFileError, match=r"bad.json: invalid JSON at line 3, column 14"):
        RecordStore.load(p)


def test_invalid_jsonl_line_is_named(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"id": "a", "conversations": []}\n{"id": "b", oops}\n')
    with pytest.raises(RecordFileError, match="line 2"):
        RecordStore.load(p)


def test_invalid_utf8_reports_byte_and_line(tmp_path):
    p = tmp_path / "bad.json"
    p.write_bytes(b'[\n{"id": "a\xff"}]')
    with pytest.raises(RecordFileError, match=r"invalid UTF-8 at byte 11 \(line 2, column 10\)"):
        RecordStore.load(p)


def test_not_a_list_and_missing_file(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('"hello"')
    with pytest.raises(RecordFileError, match="JSON list"):
        RecordStore.load(p)
    with pytest.raises(RecordFileError, match="no such record file"):
        RecordStore.load(tmp_path / "missing.json")


def test_load_records_strict_raises_with_every_problem(tmp_path, sample_records):
    recs = sample_records + [{"id": "bad", "conversations": conv("q", "")}]
    with pytest.raises(InvalidRecordsError, match=r"record 4 \(id='bad'\), field 'conversations\[1\].value'"):
        load_records(write_json(tmp_path / "r.json", recs))
    store, valid, probs = load_records(tmp_path / "r.json", strict=False)
    assert valid == [0, 1, 2, 3] and [p.kind for p in probs] == ["empty_answer"]


def test_converted_store_reads_from_disk_in_forked_workers(tmp_path, sample_records):
    store = RecordStore.load(write_json(tmp_path / "r.json", sample_records))
    store.save(tmp_path / "conv")
    back = RecordStore.load(tmp_path / "conv")
    assert list(back) == sample_records
    assert json.loads((tmp_path / "conv" / "meta.json").read_text())["num_records"] == 4
    from llavakit.data.records import FileBuffer

    assert isinstance(back.buffer, FileBuffer)  # left on disk: nothing loaded
    import os

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a forked data-loader worker opens its own descriptor
        os.write(w, json.dumps(back.raw(3)).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    assert json.loads(os.read(r, 100000)) == sample_records[3] and back.raw(0) == sample_records[0]
    import pickle

    assert pickle.loads(pickle.dumps(back)).raw(2) == sample_records[2]  # spawned workers too
