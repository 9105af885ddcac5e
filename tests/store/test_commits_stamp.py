"""The commit records' stamp in a seal record (``commits_stamp``, store.commits.records_stamp).

A reader of a sealed group whose records carry the stamp the seal recorded does one ``stat`` per
record instead of reading each one; any change to a record (rewritten, even with its old size and
modification time put back, replaced, chmod-ed, a new one) makes it read and check them all, so
readers still refuse what ``verify`` refuses (issue 21.6).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from store_helpers import fill_group, toy_spec

from cusa.store import FeatureLookup, FeatureStore
from cusa.store.commits import records_stamp
from cusa.store.group import BrokenGroupError, FeatureGroup


def _sealed(tmp_path: Path, name: str = "store"):
    store = FeatureStore.open(tmp_path / name, create=True)
    group = store.group("coco", "train", toy_spec(), manifest_hash="m" * 16, create=True)
    filled = fill_group(group, shards=4, rows=5)
    group.seal()
    return group, filled


def _commits(group: FeatureGroup) -> Path:
    return Path(group.fs.local_path(f"{group.rel}/commits"))


@pytest.fixture
def reads(monkeypatch):
    """How many commit records readers parse (a spy on the real method, which still runs)."""
    count = {"n": 0}
    real = FeatureGroup._commit_record

    def counted(self, *args, **kwargs):
        count["n"] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FeatureGroup, "_commit_record", counted)
    return count


def test_seal_records_the_stamp_and_readers_skip_reading_the_records(tmp_path, reads):
    group, filled = _sealed(tmp_path)
    assert group.sealed["commits_stamp"] == records_stamp(group.fs, group.rel)
    assert len(list(_commits(group).glob("*.json"))) == 4
    reads["n"] = 0
    lookup = FeatureLookup(group)
    assert reads["n"] == 0
    ids = sorted(filled.expected)
    np.testing.assert_array_equal(
        lookup.gather(ids).astype(np.float32), np.stack([filled.expected[i] for i in ids])
    )


def test_a_chmod_or_a_copied_store_makes_readers_read_the_records_and_serve(tmp_path, reads):
    group, filled = _sealed(tmp_path)
    record = next(_commits(group).glob("*.json"))
    os.chmod(record, 0o600)  # same bytes, a new change time
    reads["n"] = 0
    FeatureLookup(group)
    assert reads["n"] == 4  # every record read and checked: they are fine

    shutil.copytree(tmp_path / "store", tmp_path / "copy")  # new inodes
    copy = FeatureStore.open(tmp_path / "copy").find_group("coco", "train", "toy-text")
    reads["n"] = 0
    lookup = FeatureLookup(copy)
    assert reads["n"] == 4
    some = sorted(filled.expected)[:3]
    assert lookup.gather(some).shape == (3, group.dim)


def test_a_rewrite_with_its_size_and_mtime_put_back_is_still_refused(tmp_path):
    group, _ = _sealed(tmp_path)
    record = sorted(_commits(group).glob("*.json"))[1]
    before = record.stat()
    garbage = b"x" * before.st_size  # same size, not JSON
    record.write_bytes(garbage)
    os.utime(record, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert record.stat().st_size == before.st_size
    assert record.stat().st_mtime_ns == before.st_mtime_ns
    with pytest.raises(BrokenGroupError, match=f"commits/{record.name} is not valid JSON"):
        FeatureLookup(group)


@pytest.mark.parametrize("change", ["symlink to a copy", "new garbage record", "fifo record"])
def test_other_changes_are_refused_naming_the_record(tmp_path, change):
    group, _ = _sealed(tmp_path)
    folder = _commits(group)
    if change == "symlink to a copy":
        record = sorted(folder.glob("*.json"))[0]
        copy = tmp_path / "outside.json"
        copy.write_bytes(record.read_bytes())
        record.unlink()
        record.symlink_to(copy)
        name = record.name
    elif change == "new garbage record":
        name = "zz-extra.json"
        (folder / name).write_text("{}")
    else:
        name = "zz-fifo.json"
        os.mkfifo(folder / name)  # reading it would block forever: refused from its stat
    with pytest.raises(BrokenGroupError, match=f"commits/{name}"):
        FeatureLookup(group)


def test_a_seal_record_without_a_stamp_reads_the_records(tmp_path, reads):
    """A group sealed by an older cusa (no ``commits_stamp``) is read as before."""
    group, _ = _sealed(tmp_path)
    path = Path(group.fs.local_path(f"{group.rel}/sealed.json"))
    record = json.loads(path.read_text())
    del record["commits_stamp"]
    path.write_text(json.dumps(record))
    reads["n"] = 0
    FeatureLookup(group)
    assert reads["n"] == 4


def test_no_stamp_for_a_symlinked_commits_folder_or_a_non_regular_record(tmp_path):
    group, _ = _sealed(tmp_path)
    folder = _commits(group)
    assert records_stamp(group.fs, group.rel) is not None
    os.mkfifo(folder / "fifo.json")
    assert records_stamp(group.fs, group.rel) is None
    os.unlink(folder / "fifo.json")
    moved = tmp_path / "moved-commits"
    folder.rename(moved)
    folder.symlink_to(moved)
    assert records_stamp(group.fs, group.rel) is None
    with pytest.raises(BrokenGroupError, match="symlink"):
        FeatureLookup(group)


def test_reindex_renews_a_stamp_that_no_longer_matches(tmp_path, reads):
    from cusa.store.reindex import reindex_group

    group, _ = _sealed(tmp_path)
    assert reindex_group(group) == "up-to-date"
    for record in _commits(group).glob("*.json"):
        os.chmod(record, 0o600)  # e.g. a lab making its cache private: new change times
    reads["n"] = 0
    FeatureLookup(group)
    assert reads["n"] == 4
    assert reindex_group(group) == "restamped"  # every record read and checked again
    assert group.sealed["commits_stamp"] == records_stamp(group.fs, group.rel)
    reads["n"] = 0
    FeatureLookup(group)
    assert reads["n"] == 0
    assert reindex_group(group) == "up-to-date"


def test_reindex_refuses_to_stamp_a_garbage_record(tmp_path):
    from cusa.store.reindex import reindex_group

    group, _ = _sealed(tmp_path)
    stamp = group.sealed["commits_stamp"]
    record = sorted(_commits(group).glob("*.json"))[2]
    record.write_text("garbage")
    with pytest.raises(BrokenGroupError, match=f"commits/{record.name} is not valid JSON"):
        reindex_group(group)
    assert group.sealed["commits_stamp"] == stamp  # the seal record is left as it was
    assert not Path(group.fs.local_path(f"{group.rel}/id_index.lock")).exists()
