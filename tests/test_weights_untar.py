"""The streaming extraction on its own (weights/untar.py): resuming inside a member, and the
limits on what a header may hold. A local tar read through download.open_file, as a local
COGVIDEOX_WEIGHTS_URL is."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from cogvideox_cog.errors import BadSource
from cogvideox_cog.weights import download, untar
from cogvideox_cog.weights.untar import Journal

FIRST = b"first member's bytes " * 50
SECOND = b"the member after it"


def _tar(path: Path, members: list[tuple[str, bytes]], **options) -> Path:
    with tarfile.open(path, "w", **options) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def _extract(tar: Path, staging: Path, journal: Journal, starts: list[int] | None = None):
    """untar.extract as fetch_tar calls it on a local file; `starts` collects stream offsets."""

    def open_stream(start: int) -> download.Stream:
        if starts is not None:
            starts.append(start)
        return download.open_file(tar, start, f"extraction of {tar.name}")

    untar.extract(open_stream, staging, journal, tar.name, durable=False)


def _stopped_in_first(tmp_path: Path, on_disk: bytes) -> tuple[Path, Path, Journal, int]:
    """A tar of two members, and a staging folder whose journal says FIRST is being written
    and holds `on_disk` under its name: as a setup stopped part-way leaves it."""
    tar = _tar(tmp_path / "weights.tar", [("first.bin", FIRST), ("second.txt", SECOND)])
    with tarfile.open(tar) as archive:
        first = archive.getmember("first.bin")
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "first.bin").write_bytes(on_disk)
    member = {"name": "first.bin", "data": first.offset_data, "size": first.size}
    journal = Journal(tar.name, tar.stat().st_size, None, offset=first.offset, member=member)
    journal.save(staging)
    return tar, staging, journal, first.offset_data


def test_a_resume_over_a_file_longer_than_its_member_starts_after_the_members_bytes(tmp_path):
    """Bytes past the member's size are not the member's: counted as written, the stream
    would start inside the next header."""
    tar, staging, journal, data_at = _stopped_in_first(tmp_path, FIRST + b"left over")
    assert journal.resume_at(staging) == data_at + len(FIRST)
    starts: list[int] = []
    _extract(tar, staging, journal, starts)
    assert starts == [data_at + len(FIRST)]
    assert (staging / "second.txt").read_bytes() == SECOND


def test_a_resume_over_a_file_longer_than_its_member_cuts_it_to_the_members_size(tmp_path):
    tar, staging, journal, _ = _stopped_in_first(tmp_path, FIRST + b"left over")
    _extract(tar, staging, journal)
    assert (staging / "first.bin").read_bytes() == FIRST
    assert journal.files["first.bin"]["sha256"] == hashlib.sha256(FIRST).hexdigest()


@pytest.mark.parametrize("link", ["hard link to an empty file", "dangling symlink"])
def test_a_resume_from_byte_zero_replaces_what_is_at_the_members_name(tmp_path, link):
    """A journal naming a member over a link (as a release that journaled the member before
    removing the old one left it): written through, the link's target would change too."""
    tar, staging, journal, _ = _stopped_in_first(tmp_path, b"")
    (staging / "first.bin").unlink()
    if link == "dangling symlink":
        (staging / "first.bin").symlink_to("nowhere")
    else:
        (staging / "empty.txt").write_bytes(b"")
        (staging / "first.bin").hardlink_to(staging / "empty.txt")
    _extract(tar, staging, journal)
    assert (staging / "first.bin").read_bytes() == FIRST
    assert not (staging / "first.bin").is_symlink()
    if link != "dangling symlink":
        assert (staging / "empty.txt").read_bytes() == b""


def _pax_tar(path: Path, header_bytes: int) -> Path:
    """A pax tar whose one member's extended header is `header_bytes` long."""
    record = len(f"{header_bytes} comment=\n")  # what a record holds besides its value
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo("a.txt")
        info.size, info.pax_headers = len(SECOND), {"comment": "x" * (header_bytes - record)}
        archive.addfile(info, io.BytesIO(SECOND))
    header = tarfile.TarInfo.frombuf(path.read_bytes()[: tarfile.BLOCKSIZE], "utf-8", "strict")
    assert (header.type, header.size) == (tarfile.XHDTYPE, header_bytes)
    return path


def test_an_extended_header_of_the_limits_size_is_read(tmp_path):
    tar = _pax_tar(tmp_path / "pax.tar", untar._MAX_EXTENDED)
    (tmp_path / "staging").mkdir()
    _extract(tar, tmp_path / "staging", Journal(tar.name, tar.stat().st_size, None))
    assert (tmp_path / "staging" / "a.txt").read_bytes() == SECOND


def test_an_extended_header_over_one_mib_is_refused(tmp_path):
    """A corrupt size field would otherwise have the extraction read gigabytes into memory."""
    tar = _pax_tar(tmp_path / "pax.tar", (1 << 20) + 1)
    (tmp_path / "staging").mkdir()
    with pytest.raises(BadSource, match=r"corrupt tar pax.tar: a 1,048,577-byte header at byte 0"):
        _extract(tar, tmp_path / "staging", Journal(tar.name, tar.stat().st_size, None))
    assert not (tmp_path / "staging" / "a.txt").exists()
