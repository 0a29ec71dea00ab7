"""Atomic writes: a failure midway leaves neither the file nor a temporary; success replaces."""

import json
import os
import stat

import numpy as np
import pytest

from mammojax.atomic_files import (
  atomic_path,
  atomic_write,
  temporary_path,
  write_json_atomic,
  write_npy_atomic,
)


def test_failure_midway_leaves_no_file_and_no_temporary(tmp_path):
  path = tmp_path / "out.txt"
  with pytest.raises(RuntimeError, match="midway"):
    with atomic_write(path) as f:
      f.write("partial")
      assert os.path.exists(temporary_path(path))
      raise RuntimeError("midway")
  assert os.listdir(tmp_path) == []


def test_failure_keeps_the_old_file(tmp_path):
  path = tmp_path / "report.json"
  write_json_atomic(path, {"old": 1})
  with pytest.raises(TypeError):
    write_json_atomic(path, {"new": object()})  # not serialisable, fails while writing
  assert json.loads(path.read_text()) == {"old": 1}
  assert os.listdir(tmp_path) == ["report.json"]


def test_success_replaces_an_old_file(tmp_path):
  path = tmp_path / "report.json"
  path.write_text("old and longer than the new content")
  write_json_atomic(path, {"a": [1, 2]}, indent=2)
  assert path.read_text() == json.dumps({"a": [1, 2]}, indent=2)
  assert os.listdir(tmp_path) == ["report.json"]
  with atomic_write(path, "wb", fsync=True) as f:
    f.write(b"\x00\x01")
  assert path.read_bytes() == b"\x00\x01"
  assert os.listdir(tmp_path) == ["report.json"]


def test_atomic_path_for_writers_that_take_a_file_name(tmp_path):
  path = tmp_path / "shard.bin"
  with atomic_path(path) as tmp:
    assert os.path.dirname(tmp) == str(tmp_path)
    with open(tmp, "wb") as f:
      f.write(b"data")
    assert not path.exists()
  assert path.read_bytes() == b"data"
  with pytest.raises(KeyboardInterrupt):
    with atomic_path(path) as tmp:
      with open(tmp, "wb") as f:
        f.write(b"half")
      raise KeyboardInterrupt
  assert path.read_bytes() == b"data"
  assert os.listdir(tmp_path) == ["shard.bin"]


def test_permissions_npy_and_mode(tmp_path):
  secret = tmp_path / "salt.txt"
  with atomic_write(secret, permissions=0o600) as f:
    f.write("s3cret\n")
  assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
  array = np.arange(6, dtype=np.float32).reshape(2, 3)
  write_npy_atomic(tmp_path / "a.npy", array)
  np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), array)
  with pytest.raises(ValueError, match="mode"):
    with atomic_write(tmp_path / "x", "a"):
      pass
  assert sorted(os.listdir(tmp_path)) == ["a.npy", "salt.txt"]
