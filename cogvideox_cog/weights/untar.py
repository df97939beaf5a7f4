"""Extract a tar as it streams in, safely, and resumably after an interruption.

Every member is checked before anything is written: an absolute path, a '..' component, a
link leaving the destination or a special file is refused. A journal in the staging folder
records the member being written and the files finished, so the next attempt starts its
stream at the first byte not yet on disk instead of at zero.

Hand-written around tarfile rather than `TarFile.extractall(filter="data")`: extractall
cannot start in the middle of an archive, hash files as they are written or say which
member a truncated stream cut off, and tarfile's stream mode ends silently when a tar is
truncated at a member boundary. tarfile still parses every header (pax, GNU long names) and
its "data" filter vets every member; Pythons before 3.11.4 (Debian 12 ships 3.11.2) lack that
filter, and there _data_filter below applies the same rules.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import io
import json
import os
import queue
import re
import tarfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from ..errors import BadSource, WeightsError
from ..files import replace_atomically
from .download import Stream
from .manifest import sha256_file

JOURNAL = ".cogvideox-progress.json"
FLUSH_BYTES = 128 << 20  # start writing a file's data to disk every this many bytes
_BLOCK = tarfile.BLOCKSIZE
_ZERO = bytes(_BLOCK)
_MAX_EXTENDED = 1 << 20  # a long name or pax record set; more is a corrupt or hostile tar
_PAX_SPARSE = re.compile(rb"\d+ GNU\.sparse\.")  # a pax record of GNU tar's sparse formats
_PAX_SPARSE_NAME = re.compile(rb"\d+ GNU\.sparse\.name=([^\n]*)\n")
_EXTENDED = {
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
}


@dataclass
class Journal:
    """How far an extraction got, kept in the staging folder between attempts."""

    source: str
    size: int | None
    validator: str | None
    offset: int = 0  # where the next member's headers start in the tar
    member: dict | None = None  # the regular file being written: name, data offset, size
    files: dict[str, dict] = field(default_factory=dict)  # finished: name -> size, sha256
    global_headers: str = ""  # pax global headers seen so far (base64), rare
    done: bool = False

    @classmethod
    def load(cls, staging: Path) -> Journal | None:
        """The journal an earlier attempt left in `staging`, or None."""
        try:
            return cls(**json.loads((staging / JOURNAL).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    @classmethod
    def resume(cls, staging: Path, source: str, size: int | None, validator: str | None):
        """The journal of an earlier attempt at this very file, or None."""
        journal = cls.load(staging)
        if journal is None or not journal.same_file(source, size, validator):
            return None
        return journal

    def same_file(self, source: str, size: int | None, validator: str | None) -> bool:
        return (self.source, self.size, self.validator) == (source, size, validator)

    def save(self, staging: Path) -> None:
        replace_atomically(staging / JOURNAL, json.dumps(asdict(self)))

    def resume_at(self, staging: Path) -> int:
        """The first byte of the tar not yet on disk: after the member being written's bytes."""
        if self.member is None:
            return self.offset
        return self.member["data"] + self.written(staging)

    def written(self, staging: Path) -> int:
        """Bytes of the member being written that are on disk."""
        path = Path(os.path.realpath(staging), self.member["name"])
        return min(path.stat().st_size, self.member["size"]) if path.is_file() else 0


def extract(
    open_stream: Callable[[int], Stream],
    staging: Path,
    journal: Journal,
    source: str,
    durable: bool = True,
) -> None:
    """Extract the tar that `open_stream(offset)` yields into `staging`, from the journal on.

    Every file is hashed as it is written: the journal records its sha256 for the marker.
    Returns with the journal marked done and, when `durable`, every file on disk.
    """
    extractor = _Extractor(staging, journal, source)
    extractor.flusher.enabled = durable
    try:
        try:
            extractor.run(open_stream)
        except BaseException:
            extractor.flusher.finish(report=False)
            raise
        extractor.flusher.finish()
        journal.done, journal.member = True, None
        journal.save(staging)
    except OSError as error:
        # The streams raise WeightsError: an OSError here is the staging folder's (a full
        # disk while the journal, a folder or a link is written).
        raise WeightsError(
            f"could not write the weights into {staging}: {error.strerror or error}. Free "
            f"disk space or set COGVIDEOX_WEIGHTS_DIR to another volume; the next setup resumes."
        ) from error


class _Extractor:
    def __init__(self, staging: Path, journal: Journal, source: str):
        self.staging, self.journal, self.source = staging, journal, source
        self.dest = os.path.realpath(staging)
        self.flusher = _Flusher()

    def run(self, open_stream: Callable[[int], Stream]) -> None:
        journal, member = self.journal, self.journal.member
        # Resume inside the member being written, after the bytes it already has.
        written = journal.written(self.staging) if member is not None else 0
        with open_stream(journal.resume_at(self.staging)) as s:
            if member is not None:
                with _writing(member["name"], self.source):
                    self.write_file(s, member, written)
            globals_ = base64.b64decode(journal.global_headers)
            while True:
                header_at = s.position
                info, globals_ = _next_member(s, globals_, self.source)
                if info is None:
                    return
                info = _vet(info, self.dest, self.source)
                with _writing(info.name, self.source):
                    if info.isreg():
                        self.start_file(s, info, header_at, globals_)
                    else:
                        _skip(s, _padded(info.size) if info.size else 0)
                        _make_other(info, Path(self.dest, info.name), self.dest, self.source)

    def start_file(self, stream: Stream, info: tarfile.TarInfo, header_at: int, globals_: bytes):
        """Name a regular member in the journal, then write it."""
        path = Path(self.dest, info.name)
        if os.path.lexists(path):
            # A member named again replaces the earlier one, as tar does, and before the
            # journal names it: a resume would take the old file's bytes for its own, and
            # write on into every name a hard link shares.
            _remove(path, info.name, self.source)
        member = {"name": info.name, "data": stream.position, "size": info.size}
        self.journal.offset, self.journal.member = header_at, member
        self.journal.global_headers = base64.b64encode(globals_).decode()
        self.journal.save(self.staging)
        self.write_file(stream, member, 0)

    def write_file(self, stream: Stream, member: dict, written: int) -> None:
        """Write a member's data from byte `written` on, then record it in the journal."""
        path, name, size = Path(self.dest, member["name"]), member["name"], member["size"]
        path.parent.mkdir(parents=True, exist_ok=True)
        if not written and os.path.lexists(path):
            _remove(path, name, self.source)  # never write through a link left there
        digest = sha256_file(path, written) if written else hashlib.sha256()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(fd, written)
            os.lseek(fd, written, os.SEEK_SET)
            unflushed = 0
            for view in _views(stream, size - written, name):
                digest.update(view)
                unflushed += len(view)
                while view:
                    try:
                        view = view[os.write(fd, view) :]
                    except OSError as error:
                        raise WeightsError(
                            f"could not write {name} into {path.parent}: {error.strerror}. "
                            f"Free disk space or set COGVIDEOX_WEIGHTS_DIR to another volume; "
                            f"the next setup resumes."
                        ) from error
                if unflushed >= FLUSH_BYTES:
                    self.flusher.flush(fd)
                    unflushed = 0
            self.flusher.flush(fd)
        finally:
            os.close(fd)
        _skip(stream, _padded(size) - size)
        self.journal.files[name] = {"size": size, "sha256": digest.hexdigest()}
        self.journal.offset, self.journal.member = stream.position, None
        self.journal.save(self.staging)


def _next_member(stream: Stream, globals_: bytes, source: str):
    """The next member's TarInfo (None at the end) and the pax global headers so far."""
    at = stream.position
    group = bytearray()
    while True:
        block = _read_exactly(stream, _BLOCK, source, "a header")
        if block == _ZERO:
            if group:
                raise BadSource(
                    f"corrupt tar {source}: extended header at byte {at:,} leads nowhere"
                )
            return None, globals_
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError as error:
            compressed = _compression(block) if stream.position == _BLOCK else None
            if compressed:
                raise BadSource(
                    f"{source} is {compressed}-compressed, not a plain tar (or its server sent "
                    f"it with Content-Encoding: {compressed}). Decompress it and use the .tar, "
                    f"or serve it without Content-Encoding."
                ) from error
            raise BadSource(
                f"corrupt tar {source}: bad header at byte {stream.position - _BLOCK:,} "
                f"({error}); the download is corrupt or not a tar"
            ) from error
        if info.type in _EXTENDED and info.size > _MAX_EXTENDED:
            raise BadSource(f"corrupt tar {source}: a {info.size:,}-byte header at byte {at:,}")
        extra = (
            _read_exactly(stream, _padded(info.size), source, "a header")
            if info.type in _EXTENDED
            else b""
        )
        if info.type == tarfile.XGLTYPE:
            globals_ += block + extra
            continue
        group += block + extra
        if info.type not in _EXTENDED:
            break
    if info.type == tarfile.GNUTYPE_SPARSE or _PAX_SPARSE.search(group):
        # In pax format (GNU tar --sparse --format=posix) a sparse member is a regular file
        # whose data holds only the parts that are not holes; tarfile cannot say how many
        # bytes that is before reading them, so the stream would lose its place.
        named = _PAX_SPARSE_NAME.search(group)
        name = named[1].decode("utf-8", "surrogateescape") if named else info.name
        raise BadSource(
            f"unsupported weights tar {source}: sparse member {name!r}. Rebuild the tar "
            f"without --sparse (-S)."
        )
    # Let tarfile apply the long names and pax records: parse the header group on its own.
    try:
        with tarfile.open(fileobj=io.BytesIO(globals_ + group), mode="r:") as headers:
            return headers.firstmember, globals_
    except (tarfile.TarError, ValueError) as error:
        raise BadSource(f"corrupt tar {source}: bad header at byte {at:,}: {error}") from error


_MAGIC = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"\x04\x22\x4d\x18": "lz4",
}


def _compression(block: bytes) -> str | None:
    """The compression whose magic number starts `block`, or None."""
    return next((name for magic, name in _MAGIC.items() if block.startswith(magic)), None)


def _vet(info: tarfile.TarInfo, dest: str, source: str) -> tarfile.TarInfo:
    """Refuse a member that would land, or point, outside the destination."""
    name = info.name
    problem = None
    if name.startswith("/") or os.path.isabs(name):
        problem = f"member {name!r} has an absolute path"
    elif ".." in PurePosixPath(name).parts:
        problem = f"member {name!r} has a '..' component"
    else:
        try:
            info = _data_filter(info, dest)
        except _FilterError as error:
            problem = str(error)
    if problem:
        raise BadSource(
            f"refusing unsafe weights tar {source}: {problem}. Nothing was written outside the "
            f"staging folder; the tar must be rebuilt without such members."
        )
    info.name = os.path.normpath(info.name)
    return info


class _UnsafeMember(Exception):
    """A member refused by _own_data_filter (tarfile.FilterError where that exists)."""


def _own_data_filter(info: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """The refusals of tarfile.data_filter (3.11.4+), with its messages, for older Pythons.

    Only what extraction relies on: paths and link targets stay inside `dest`, no special
    files. Modes and owners are not taken from the tar anyway (files are written 0644).
    """
    name = info.name.lstrip("/" + os.sep)
    path = os.path.realpath(os.path.join(dest, name))
    if os.path.commonpath([path, dest]) != dest:
        raise _UnsafeMember(
            f"{info.name!r} would be extracted to {path!r}, which is outside the destination"
        )
    if not (info.isreg() or info.isdir() or info.issym() or info.islnk()):
        raise _UnsafeMember(f"{info.name!r} is a special file")
    if info.issym() or info.islnk():
        if os.path.isabs(info.linkname):
            raise _UnsafeMember(f"{info.name!r} is a link to an absolute path")
        if info.issym():
            target = os.path.join(dest, os.path.dirname(name), info.linkname)
        else:
            target = os.path.join(dest, info.linkname)
        target = os.path.realpath(target)
        if os.path.commonpath([target, dest]) != dest:
            raise _UnsafeMember(
                f"{info.name!r} would link to {target!r}, which is outside the destination"
            )
    return info


if hasattr(tarfile, "data_filter"):
    _data_filter, _FilterError = tarfile.data_filter, tarfile.FilterError
else:  # Python 3.11.0 to 3.11.3
    _data_filter, _FilterError = _own_data_filter, _UnsafeMember


class _Flusher:
    """Writes extracted data to disk while the download goes on.

    The weights are fsynced before their completion marker is written (cache.publish), so
    that a power cut cannot leave a marker over data that never reached the disk. Left to
    the end, that fsync would wait for the whole download to be written out; started as the
    data arrives, the disk works alongside the network instead of after it.
    """

    def __init__(self) -> None:
        self._queue: queue.Queue[int | None] = queue.Queue()
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name="weights-flush", daemon=True)
        self._thread.start()

    enabled = True

    def flush(self, fd: int) -> None:
        if self.enabled:
            self._queue.put(os.dup(fd))  # a copy: the writer may close its own meanwhile

    def finish(self, report: bool = True) -> None:
        """Wait until everything asked is on disk."""
        self._queue.put(None)
        self._thread.join()
        if report and self._error is not None:
            raise WeightsError(f"could not write the weights to disk: {self._error}")

    def _run(self) -> None:
        while (fd := self._queue.get()) is not None:
            try:
                os.fdatasync(fd)
            except OSError as error:
                self._error = error
            finally:
                os.close(fd)


# What writing a member fails with because of its own name or kind, not the disk: the same
# on every resume, so the tar is corrupt (a file under a file, a name over 255 bytes).
_THE_TARS_FAULT = {errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP}


@contextmanager
def _writing(name: str, source: str) -> Iterator[None]:
    try:
        yield
    except OSError as error:
        if error.errno not in _THE_TARS_FAULT:
            raise  # the disk's: extract() says to free space, and the next setup resumes
        raise BadSource(
            f"corrupt tar {source}: member {name!r} cannot be written ({error.strerror}). "
            f"The tar must be rebuilt."
        ) from error


def _views(stream: Stream, n: int, name: str):
    try:
        yield from stream.views(n)
    except WeightsError as error:
        raise type(error)(f"{error} (in the middle of {name})") from error


def _make_other(info: tarfile.TarInfo, path: Path, dest: str, source: str) -> None:
    if info.isdir():
        path.mkdir(parents=True, exist_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(path):
        _remove(path, info.name, source)
    if info.issym():
        os.symlink(info.linkname, path)
    elif info.islnk():
        # The file the vetting checked: the target with every symlink on its way resolved,
        # as the kernel would (a normpath of the name would drop a '..' after a symlink).
        target = os.path.realpath(os.path.join(dest, info.linkname))
        if os.path.commonpath([target, dest]) != dest or not os.path.isfile(target):
            raise BadSource(
                f"refusing unsafe weights tar {source}: hard link {info.name!r} to "
                f"{info.linkname!r} does not name a file extracted before it"
            )
        os.link(target, path, follow_symlinks=False)


def _remove(path: Path, name: str, source: str) -> None:
    if path.is_dir() and not path.is_symlink():
        raise BadSource(f"corrupt tar {source}: member {name!r} replaces a folder")
    path.unlink()


def _read_exactly(stream: Stream, n: int, source: str, what: str) -> bytes:
    data = stream.read(n)
    if len(data) < n:
        raise BadSource(f"truncated tar {source}: it ends at byte {stream.position:,} in {what}")
    return data


def _skip(stream: Stream, n: int) -> None:
    for _ in stream.views(n):
        pass


def _padded(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK
