"""Tests for mechdiff.engine.data: prompt loading, typing, hashing and every DataError case."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mechdiff.engine.data import DataError, PromptSet, load_prompts


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content, encoding="utf-8")
    return p


# ------------------------------------------------------------------------- formats


def test_geometry_of_truth_csv(tmp_path):
    p = write(
        tmp_path,
        "cities.csv",
        "statement,label,city,country,correct_country\n"
        "The city of Krasnodar is in Russia.,1,Krasnodar,Russia,Russia\n"
        "The city of Krasnodar is in South Africa.,0,Krasnodar,South Africa,Russia\n"
        '"The city of Paris, France is in France.",TRUE,Paris,France,France\n',
    )
    ps = load_prompts(p)
    assert ps.text_column == "statement"
    assert ps.texts == [
        "The city of Krasnodar is in Russia.",
        "The city of Krasnodar is in South Africa.",
        "The city of Paris, France is in France.",
    ]
    assert set(ps.columns) == {"label", "city", "country", "correct_country"}
    np.testing.assert_array_equal(ps.columns["label"], [1, 0, 1])
    assert ps.columns["label"].dtype == np.int64
    assert ps.columns["country"].dtype.kind == "U"
    np.testing.assert_array_equal(ps.columns["country"], ["Russia", "South Africa", "France"])
    assert ps.source == str(p)
    assert len(ps) == 3


def test_csv_numeric_columns(tmp_path):
    p = write(tmp_path, "n.csv", "text,count,score,code\na,1,0.5,x1\nb,2,1,007\nc,3,,y\n")
    ps = load_prompts(p)
    assert ps.columns["count"].dtype == np.int64
    np.testing.assert_array_equal(ps.columns["count"], [1, 2, 3])
    assert ps.columns["score"].dtype == np.float64
    np.testing.assert_array_equal(ps.columns["score"][:2], [0.5, 1.0])
    assert np.isnan(ps.columns["score"][2])
    # a mixed column stays text, original spelling kept
    np.testing.assert_array_equal(ps.columns["code"], ["x1", "007", "y"])


def test_tsv_and_blank_lines(tmp_path):
    p = write(tmp_path, "t.tsv", "prompt\tlabel\n\nhello there\t1\n\nbye\t0\n\n")
    ps = load_prompts(p)
    assert ps.texts == ["hello there", "bye"]
    np.testing.assert_array_equal(ps.columns["label"], [1, 0])


def test_json_list_of_objects_instructions(tmp_path):
    rows = [
        {"instruction": "Write a poem", "category": "benign", "label": False},
        {"instruction": "Explain tides", "category": "science", "label": True},
    ]
    p = write(tmp_path, "harmless.json", json.dumps(rows))
    ps = load_prompts(p)
    assert ps.text_column == "instruction"
    assert ps.texts == ["Write a poem", "Explain tides"]
    np.testing.assert_array_equal(ps.columns["label"], [0, 1])
    np.testing.assert_array_equal(ps.columns["category"], ["benign", "science"])


def test_json_object_holding_list_and_goal(tmp_path):
    doc = {"name": "advbench", "data": [{"goal": "g1", "target": "t1"}, {"goal": "g2", "target": "t2"}]}
    ps = load_prompts(write(tmp_path, "adv.json", json.dumps(doc)))
    assert ps.text_column == "goal"
    assert ps.texts == ["g1", "g2"]
    np.testing.assert_array_equal(ps.columns["target"], ["t1", "t2"])


def test_json_list_of_strings_and_heterogeneous_keys(tmp_path):
    ps = load_prompts(write(tmp_path, "s.json", json.dumps(["one", "two"])))
    assert ps.texts == ["one", "two"] and ps.columns == {}
    ps = load_prompts(write(tmp_path, "h.json", json.dumps([{"text": "a", "n": 1}, {"text": "b", "tag": "x"}])))
    assert ps.columns["n"].dtype == np.float64 and np.isnan(ps.columns["n"][1])
    np.testing.assert_array_equal(ps.columns["tag"], ["", "x"])


def test_jsonl_and_types(tmp_path):
    lines = [
        {"prompt": "p1", "label": "1", "w": 0.25, "ok": True, "meta": {"a": 1}},
        {"prompt": "p2", "label": "false", "w": 2, "ok": False, "meta": {"a": 2}},
    ]
    p = write(tmp_path, "x.jsonl", "\n".join(json.dumps(r) for r in lines) + "\n\n")
    ps = load_prompts(p)
    assert ps.text_column == "prompt"
    np.testing.assert_array_equal(ps.columns["label"], [1, 0])
    assert ps.columns["w"].dtype == np.float64
    assert ps.columns["ok"].dtype == bool
    np.testing.assert_array_equal(ps.columns["meta"], ['{"a": 1}', '{"a": 2}'])


def test_json_file_holding_jsonl(tmp_path):
    p = write(tmp_path, "x.json", '{"text": "a"}\n{"text": "b"}\n')
    assert load_prompts(p).texts == ["a", "b"]


@pytest.mark.parametrize(
    "raw, expected",
    [
        (["0", "1"], [0, 1]),
        (["true", "FALSE"], [1, 0]),
        (["True", "false"], [1, 0]),
        (["TRUE", "0"], [1, 0]),
    ],
)
def test_label_spellings_csv(tmp_path, raw, expected):
    p = write(tmp_path, "l.csv", "text,label\n" + "".join(f"s{i},{v}\n" for i, v in enumerate(raw)))
    np.testing.assert_array_equal(load_prompts(p).columns["label"], expected)


def test_label_spellings_json(tmp_path):
    p = write(tmp_path, "l.json", json.dumps([{"text": f"s{i}", "label": v} for i, v in enumerate([0, 1, True, False, "1", 1.0])]))
    np.testing.assert_array_equal(load_prompts(p).columns["label"], [0, 1, 1, 0, 1, 1])


def test_text_column_override_and_limit(tmp_path):
    p = write(tmp_path, "o.csv", "text,question\na,q1\nb,q2\nc,q3\n")
    ps = load_prompts(p, text_column="question", limit=2)
    assert ps.texts == ["q1", "q2"] and ps.text_column == "question"
    np.testing.assert_array_equal(ps.columns["text"], ["a", "b"])
    # the first accepted name wins when several are present
    p2 = write(tmp_path, "two.csv", "prompt,statement\np,s\n")
    assert load_prompts(p2).text_column == "statement"


def test_limit_stops_before_bad_rows(tmp_path):
    p = write(tmp_path, "b.jsonl", '{"text": "a"}\n{"text": "b"}\nnot json\n')
    assert load_prompts(p, limit=2).texts == ["a", "b"]


# ------------------------------------------------------------------------- PromptSet


def test_hash_stable_and_sensitive(tmp_path):
    p = write(tmp_path, "h.csv", "statement,label\nx,1\ny,0\n")
    a, b = load_prompts(p), load_prompts(p)
    assert a.hash == b.hash and len(a.hash) == 64
    # hash is a function of the content, not the file or the column order
    p2 = write(tmp_path, "h2.json", json.dumps([{"label": 1, "statement": "x"}, {"label": 0, "statement": "y"}]))
    assert load_prompts(p2).hash == a.hash
    assert PromptSet.from_texts(["x", "y"], label=[1, 0]).hash == a.hash
    assert PromptSet.from_texts(["x", "y"], label=[0, 1]).hash != a.hash
    assert PromptSet.from_texts(["x", "z"], label=[1, 0]).hash != a.hash
    assert PromptSet.from_texts(["xy", "z"]).hash != PromptSet.from_texts(["x", "yz"]).hash
    assert PromptSet.from_texts(["x", "y"], label=[1, 0], topic=["a", "b"]).hash != a.hash


def test_hash_stable_across_processes():
    code = (
        "from mechdiff.engine.data import PromptSet;"
        "print(PromptSet.from_texts(['a','b'], label=[1,0], topic=['t','u'], w=[0.5, 2.0]).hash)"
    )
    out = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout for _ in range(2)}
    here = PromptSet.from_texts(["a", "b"], label=[1, 0], topic=["t", "u"], w=[0.5, 2.0]).hash
    assert out == {here + "\n"}


def test_subset_and_from_texts():
    ps = PromptSet.from_texts(["a", "b", "c", "d"], label=["1", "0", True, 0], topic=["x", "y", "z", "w"], n=[1, 2, 3, 4])
    assert ps.source == "<memory>" and ps.text_column == "text"
    np.testing.assert_array_equal(ps.columns["label"], [1, 0, 1, 0])
    sub = ps.subset([3, 1])
    assert sub.texts == ["d", "b"]
    np.testing.assert_array_equal(sub.columns["topic"], ["w", "y"])
    np.testing.assert_array_equal(sub.columns["n"], [4, 2])
    masked = ps.subset(np.array([True, False, True, False]))
    assert masked.texts == ["a", "c"]
    assert len(ps.subset([])) == 0
    with pytest.raises(ValueError):
        PromptSet(texts=["a"], columns={"x": np.array([1, 2])})


# ------------------------------------------------------------------------- DataError cases


def expect_error(path: Path, *fragments: str, **kw) -> str:
    with pytest.raises(DataError) as ei:
        load_prompts(path, **kw)
    msg = str(ei.value)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.csv", "file not found")


def test_malformed_jsonl_line(tmp_path):
    p = write(tmp_path, "m.jsonl", '{"text": "a"}\n\n{"text": "b"\n')
    expect_error(p, "line 3", "malformed JSON")


def test_malformed_json(tmp_path):
    p = write(tmp_path, "m.json", '[{"text": "a"},\n {"text": }]')
    expect_error(p, "malformed JSON", "line 2")


def test_jsonl_line_not_object(tmp_path):
    expect_error(write(tmp_path, "n.jsonl", '{"text": "a"}\n[1, 2]\n'), "line 2", "expected an object")


def test_no_text_column(tmp_path):
    p = write(tmp_path, "nt.csv", "sentence,label\nhi,1\n")
    msg = expect_error(p, "no text column", "sentence, label")
    for name in ("text", "statement", "instruction", "goal", "prompt"):
        assert name in msg


def test_text_column_not_found(tmp_path):
    expect_error(write(tmp_path, "c.csv", "text\na\n"), "'question' not found", "text", text_column="question")


def test_empty_dataset(tmp_path):
    expect_error(write(tmp_path, "e.csv", ""), "empty dataset")
    expect_error(write(tmp_path, "h.csv", "statement,label\n"), "empty dataset")
    expect_error(write(tmp_path, "e.json", "[]"), "empty dataset")
    expect_error(write(tmp_path, "e.jsonl", "\n\n"), "empty dataset")


def test_empty_text(tmp_path):
    expect_error(write(tmp_path, "et.csv", "statement,label\na,1\n  ,0\n"), "row 2", "empty text", "'statement'")
    expect_error(write(tmp_path, "et.json", json.dumps([{"text": "a"}, {"text": None}])), "row 2", "empty text")
    expect_error(write(tmp_path, "et.jsonl", '{"text": "a"}\n\n{"x": 1}\n'), "line 3", "empty text")
    with pytest.raises(DataError, match="row 2: empty text"):
        PromptSet.from_texts(["a", ""])


def test_bad_labels(tmp_path):
    expect_error(write(tmp_path, "bl.csv", "statement,label\na,1\nb,2\n"), "row 2", "label '2'", "0/1/true/false")
    expect_error(write(tmp_path, "bl2.csv", "statement,label\na,yes\n"), "row 1", "'yes'")
    expect_error(write(tmp_path, "bl3.csv", "statement,label\na,\n"), "row 1", "label")
    expect_error(write(tmp_path, "bl.json", json.dumps([{"text": "a", "label": 0.5}])), "row 1", "0.5")
    expect_error(write(tmp_path, "bl.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": null}\n'), "line 2", "None")


def test_ragged_csv(tmp_path):
    expect_error(write(tmp_path, "r.csv", "statement,label\na,1\nb,0,extra\n"), "row 2", "3 fields", "header has 2")
    expect_error(write(tmp_path, "r2.csv", "statement,label\na\n"), "row 1", "1 fields")


def test_other_bad_inputs(tmp_path):
    expect_error(write(tmp_path, "x.txt", "hi"), "unsupported file type")
    expect_error(write(tmp_path, "b.csv", b"text\n\xff\xfe bad\n"), "not UTF-8")
    expect_error(write(tmp_path, "dup.csv", "text,text\na,b\n"), "twice")
    expect_error(write(tmp_path, "o.json", json.dumps({"a": 1})), "no list of rows")
    expect_error(write(tmp_path, "s.json", json.dumps("just a string")), "expected a list")
    expect_error(write(tmp_path, "n.json", json.dumps([{"text": "a"}, 3])), "row 2", "expected an object")
    expect_error(tmp_path, "not a file")
