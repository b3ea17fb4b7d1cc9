"""Self-checking JSON cache files: a damaged file is recomputed, never used."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rpsft.core.json_cache import cached_json, read_cached_json, write_cached_json

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


@settings(max_examples=60, deadline=None)
@given(value=json_values)
def test_a_written_value_reads_back_unchanged(tmp_path_factory, value):
    path = tmp_path_factory.mktemp("c") / "v.json"
    write_cached_json(path, value)
    assert read_cached_json(path) == value or value is None


def _edit_number(path):
    stored = json.loads(path.read_text())
    stored["value"]["nll"][1] = 9.5  # parseable, plausible, wrong
    path.write_text(json.dumps(stored))


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_text(p.read_text()[: len(p.read_text()) // 2]),  # truncated
        lambda p: p.write_bytes(b"\xff\xfe\x00garbage"),  # not text
        _edit_number,  # a changed value: only the hash can tell
        lambda p: p.write_text(json.dumps({"nll": [1.0, 2.0]})),  # a file of the old, unchecked format
    ],
    ids=["truncated", "binary", "edited", "unchecked"],
)
def test_a_damaged_file_is_recomputed(tmp_path, damage):
    path = tmp_path / "base.json"
    calls = []

    def compute():
        calls.append(1)
        return {"nll": [1.0, 2.0]}

    assert cached_json(path, compute) == {"nll": [1.0, 2.0]}
    assert cached_json(path, compute) == {"nll": [1.0, 2.0]} and len(calls) == 1  # reused
    damage(path)
    assert read_cached_json(path) is None
    assert cached_json(path, compute) == {"nll": [1.0, 2.0]} and len(calls) == 2  # recomputed
    assert read_cached_json(path) == {"nll": [1.0, 2.0]}
