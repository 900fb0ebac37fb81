"""``synthaug.outputs``: the one JSON cleaner, the one atomic JSON write and the one check that a
command never writes into (or empties) a folder that is not its own."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from synthaug.outputs import jsonable, output_dir, write_json


def test_numpy_paths_and_tuples_become_json_and_nonfinite_floats_follow_the_choice(tmp_path):
    value = {1: np.int64(3), "a": (np.float32(0.5), np.array([1, 2])), "p": tmp_path, "nan": float("nan"), "inf": np.float64("inf")}
    kept = jsonable(value)
    assert kept["1"] == 3 and type(kept["1"]) is int
    assert kept["a"] == [0.5, [1, 2]] and kept["p"] == str(tmp_path)
    assert math.isnan(kept["nan"]) and kept["inf"] == math.inf
    finite = jsonable(value, finite=True)
    assert finite["nan"] is None and finite["inf"] is None
    path = write_json(tmp_path / "r.json", value, finite=True)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text and json.loads(text)["a"] == [0.5, [1, 2]]
    assert not list(tmp_path.glob("*.tmp"))


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4), max_leaves=20))
def test_whatever_json_holds_comes_back_unchanged_and_finite_output_never_holds_nan(value):
    assert json.dumps(jsonable(value)) == json.dumps(value)
    json.dumps(jsonable(value, finite=True), allow_nan=False)  # raises if a NaN or infinity is left


def test_output_dir_refuses_a_file_and_a_strangers_folder_and_keeps_or_empties_as_asked(tmp_path):
    new = output_dir(tmp_path / "a" / "b")
    assert new.is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file; give a folder"):
        output_dir(tmp_path / "file")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "theirs.txt").write_text("x")
    with pytest.raises(FileExistsError, match=r"busy is not empty; pass --overwrite"):
        output_dir(busy)
    assert (busy / "theirs.txt").exists()
    output_dir(busy, overwrite=True)  # overwrite: our files replace theirs, the rest stay
    assert (busy / "theirs.txt").exists()
    output_dir(busy, ours=lambda p: (p / "theirs.txt").exists(), empty=True)  # our own earlier output: emptied
    assert busy.is_dir() and not any(busy.iterdir())
    (busy / "x").write_text("x")
    with pytest.raises(FileExistsError, match="--out .*busy is not empty; it holds no report"):
        output_dir(busy, ours=lambda p: (p / "report.json").exists(), what="--out", hint="it holds no report")
