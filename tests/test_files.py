"""The one JSON-row reader and the atomic writers every command uses."""

import json

import pytest

from jax_implicit import files


@pytest.mark.parametrize("name,text", [
    ("rows.json", json.dumps([{"instruction": "a"}, {"instruction": "b"}], indent=2)),
    ("rows.jsonl", '{"instruction": "a"}\n\n{"instruction": "b"}\n'),
    ("rows.json", '{"instruction": "a"}\n{"instruction": "b"}\n'),  # JSON Lines under a .json name
])
def test_read_rows_formats(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    assert files.read_rows(tmp_path / name, ("instruction",)) == [{"instruction": "a"}, {"instruction": "b"}]


@pytest.mark.parametrize("name,text,message", [
    ("x.json", '{"instruction": "a"}', r"x.json: expected a list of rows or JSON Lines, found dict"),
    ("x.json", '[{"instruction": "a"},', r"x.json is not valid JSON \(line 1"),
    ("x.jsonl", '{"instruction": "a"}\nnot json\n', r"x.jsonl is not JSON Lines: line 2 does not parse"),
    ("x.jsonl", "\n", r"x.jsonl is empty: it has no rows"),
    ("x.json", '[{"instruction": "a"}, 3]', r"x.json, row 1: expected an object, found int"),
    ("x.json", '[{"instruction": "a"}, {"input": "b"}]', r"x.json, row 1: key 'instruction' is missing"),
    ("x.json", '[{"instruction": 7}]', r"x.json, row 0: key 'instruction' is int, not a string"),
])
def test_read_rows_errors_name_the_file_and_row(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        files.read_rows(tmp_path / name, ("instruction",), what="outputs file")
    with pytest.raises(FileNotFoundError, match="outputs file .*nope.json does not exist"):
        files.read_rows(tmp_path / "nope.json", what="outputs file")


def test_write_atomic_replaces_whole_or_not_at_all(tmp_path):
    out = files.write_json(tmp_path / "sub" / "r.json", {"a": 1})
    assert json.loads(out.read_text()) == {"a": 1}

    class Boom(str):  # fails once the temporary file exists
        def encode(self, *args):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        files.write_atomic(out, Boom("x"))
    assert json.loads(out.read_text()) == {"a": 1}
    assert sorted(p.name for p in out.parent.iterdir()) == ["r.json"]  # no temporary left behind


def test_save_figure_writes_a_png(tmp_path):
    fig, ax = files.figure((2, 2))
    ax.plot([0, 1], [1, 0])
    assert files.save_figure(fig, tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
