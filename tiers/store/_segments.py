"""The append-only log of open inputs' and pending partials' envelope bytes; no sqlite3, no trio.

Why: an envelope stored as a sqlite row is written twice (the WAL, then the
checkpoint into the table) and copied through sqlite's page cache on the way;
``fedtier bench edge`` measured 1.9x the wire bytes written per dense update
and most of the edge's CPU in that commit thread. Here each envelope is written
once, with one ``os.writev`` from the received buffer, and the sqlite row keeps
only a short reference (``ref``): ``seg:<segment>:<offset>:<length>``, stored
as TEXT in ``input_envelopes.envelope`` where an older store keeps the bytes
as a BLOB (the type tells the two apart, no magic needed).

The ordering that keeps acceptance exact (docs/architecture.md, data
guarantees): the committer appends a batch's envelopes, syncs (``fdatasync``) the
segment, and only then commits the sqlite transaction that references them.
So a reference that is durable always points at durable bytes; bytes whose
transaction never committed (a crash between append and commit, a torn tail)
are never referenced and never read. Each opening starts a new segment, so
nothing is ever appended after a torn tail. Each sync pads the segment with
zeros to a page boundary (``PAGE_BYTES``), so a batch never rewrites the page
the previous sync wrote.

Outbox partials are stored the same way. A segment is deleted
(:meth:`SegmentLog.prune`) once no committed row references it and it is not
the one being appended to: an input's reference leaves with its cut (the
partial carries what it contributed), a quarantine (which copies the bytes
inline) or retention; a partial's when the upstream acknowledges it. So a
segment goes once every input in it was cut and every partial in it
acknowledged upstream. The prune runs on the committer's thread after a
commit, so it never races a transaction that is still adding references.
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path
from typing import Final

from fedtier.protocol.errors import StoreError

__all__ = [
    "DEFAULT_SEGMENT_BYTES",
    "PAGE_BYTES",
    "SegmentLog",
    "is_ref",
    "referenced_segments",
    "segment_folder",
]

DEFAULT_SEGMENT_BYTES: Final = 64 * 1024 * 1024
"""A new segment starts once the current one is past this size."""

PAGE_BYTES: Final = 4096
"""Each sync pads the segment with zeros to a multiple of this (the page size).

Why: the kernel counts (and writes back) whole pages. Without the padding,
the next batch's first append went into the page the last sync had just
written, so that page was written twice: one page per commit, about 2% of a
50 KB sparse update's wire size at five updates per commit (``fedtier bench
edge``, docs/performance.md). The zeros fill a page the batch already wrote;
no reference ever names them."""
_ZEROS: Final = bytes(PAGE_BYTES)

# Per record: magic, then the envelope's length; read back and compared with
# the reference, so a reference into the wrong bytes is an error, never data.
_HEADER: Final = struct.Struct("<4sQ")
_MAGIC: Final = b"FTS1"
_REF_PREFIX: Final = "seg:"
_NAME: Final = re.compile(r"^(\d{8,})\.seg$")
_REF: Final = re.compile(r"^seg:(\d+):(\d+):(\d+)$")


def segment_folder(store_path: Path) -> Path:
    """Where the segments of the sqlite store at ``store_path`` live (beside it)."""
    return store_path.with_name(store_path.name + ".segments")


def is_ref(value: object) -> bool:
    """Whether a stored ``input_envelopes.envelope`` value is a segment reference."""
    return isinstance(value, str) and value.startswith(_REF_PREFIX)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SegmentLog:
    """Numbered append-only files ``<n>.seg`` in one folder; used by one committer thread.

    Args:
        folder: the segments' folder (created if missing).
        segment_bytes: size past which appends go to a new segment.

    ``append`` and ``sync`` run on the committer's thread; ``read`` may run
    on any thread (``os.pread`` on its own descriptor).
    """

    def __init__(self, folder: Path, *, segment_bytes: int = DEFAULT_SEGMENT_BYTES) -> None:
        if segment_bytes < 1:
            raise StoreError(f"segment size must be >= 1 byte, got {segment_bytes}")
        self.folder = folder
        self.segment_bytes = segment_bytes
        self.active = 0
        self._fd: int | None = None
        self._size = 0
        self._dirty = False
        self._new_file = False
        self.bytes_appended = 0
        """Envelope bytes appended since opening (headers excluded)."""
        self.oldest = 0
        """The lowest segment number present (``active`` when none is older)."""

    # -- opening -----------------------------------------------------------------------

    def open_sync(self) -> None:
        """Create the folder if needed and pick the next segment number (never reopen one)."""
        try:
            created = not self.folder.is_dir()
            self.folder.mkdir(parents=True, exist_ok=True)
            if created:
                _fsync_dir(self.folder.parent)
        except OSError as exc:
            raise StoreError(f"cannot open segment folder {self.folder}: {exc}") from exc
        numbers = self.segments()
        # A new segment per opening: the last one may end in a torn, unreferenced tail.
        self.active = (max(numbers) + 1) if numbers else 1
        self.oldest = min(numbers) if numbers else self.active

    def segments(self) -> list[int]:
        """The numbers of the segment files present, ascending."""
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return []
        found = (_NAME.match(name) for name in names)
        return sorted(int(m.group(1)) for m in found if m is not None)

    def path_of(self, segment: int) -> Path:
        """The file of segment ``segment``."""
        return self.folder / f"{segment:08d}.seg"

    def close(self) -> None:
        """Close the file being appended to (what is not synced may be lost, as in a crash)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- appending (committer thread) ---------------------------------------------------

    def append(self, data: bytes | memoryview) -> str:
        """Append one envelope; return its reference. Durable only after :meth:`sync`."""
        if self._fd is not None and self._size >= self.segment_bytes:
            self._roll()
        if self._fd is None:
            path = self.path_of(self.active)
            try:
                self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
            except OSError as exc:
                raise StoreError(f"cannot create segment {path}: {exc}") from exc
            self._size = 0
            self._new_file = True
        length = len(data)
        offset = self._size
        header = _HEADER.pack(_MAGIC, length)
        # One writev from the caller's buffer: no copy in this process.
        self._write_all([header, data])
        self._size += _HEADER.size + length
        self._dirty = True
        self.bytes_appended += length
        return f"{_REF_PREFIX}{self.active}:{offset}:{length}"

    def _write_all(self, parts: list[bytes | memoryview]) -> None:
        assert self._fd is not None
        views = [memoryview(p).cast("B") for p in parts]
        while views:
            try:
                written = os.writev(self._fd, views)
            except OSError as exc:
                raise StoreError(f"cannot append to segment {self.active}: {exc}") from exc
            while views and written >= len(views[0]):
                written -= len(views[0])
                views.pop(0)
            if views and written:
                views[0] = views[0][written:]

    def _roll(self) -> None:
        # The full segment is synced before it is closed, so sync() only ever
        # has the current one to care about.
        self.sync()
        self.close()
        self.active += 1

    def sync(self) -> None:
        """Make every append so far durable (``fdatasync``; the folder too for a new file).

        Pads the segment to a page boundary first (:data:`PAGE_BYTES`), so the
        next append starts on a fresh page.
        """
        if self._fd is None or not self._dirty:
            return
        tail = self._size % PAGE_BYTES
        if tail:
            self._write_all([_ZEROS[: PAGE_BYTES - tail]])
            self._size += PAGE_BYTES - tail
        try:
            os.fdatasync(self._fd)
            if self._new_file:
                # The file's name must survive a power loss as well as its bytes.
                _fsync_dir(self.folder)
                self._new_file = False
        except OSError as exc:
            raise StoreError(f"cannot sync segment {self.active}: {exc}") from exc
        self._dirty = False

    # -- reading -------------------------------------------------------------------------

    def read(self, ref: str) -> bytes:
        """The envelope bytes ``ref`` points at.

        Raises:
            StoreError: a malformed reference, a missing segment, or bytes that
                are not the record the reference names (the store is inconsistent).
        """
        return self._read(ref, with_data=True)

    def check(self, ref: str) -> None:
        """Check that ``ref`` names a whole record, reading only its header.

        Recovery checks every open input this way and reads each envelope
        only when it refolds it: a buffer of large envelopes is never in
        memory at once.

        Raises:
            StoreError: as :meth:`read` would.
        """
        self._read(ref, with_data=False)

    def _read(self, ref: str, *, with_data: bool) -> bytes:
        match = _REF.match(ref)
        if match is None:
            raise StoreError(f"malformed segment reference {ref!r}")
        segment, offset, length = (int(g) for g in match.groups())
        path = self.path_of(segment)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise StoreError(f"envelope {ref} is referenced but {path} is gone: {exc}") from exc
        try:
            header = os.pread(fd, _HEADER.size, offset)
            if with_data:
                data = os.pread(fd, length, offset + _HEADER.size) if length else b""
                size = len(data)
            else:
                data = b""
                size = min(length, max(0, os.fstat(fd).st_size - offset - _HEADER.size))
        finally:
            os.close(fd)
        if len(header) != _HEADER.size or _HEADER.unpack(header) != (_MAGIC, length):
            raise StoreError(f"envelope {ref}: {path} holds no such record; it is inconsistent")
        if size != length:
            raise StoreError(f"envelope {ref}: {path} ends early; it is inconsistent")
        return data

    # -- dropping ------------------------------------------------------------------------

    def prune(self, referenced: set[int]) -> int:
        """Delete the segments below the active one that no committed row references.

        Call only on the committer's thread, after a commit (module docstring).
        Returns how many files were deleted.
        """
        removed = 0
        for segment in self.segments():
            if segment >= self.active or segment in referenced:
                continue
            try:
                self.path_of(segment).unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StoreError(f"cannot delete segment {self.path_of(segment)}: {exc}") from exc
            removed += 1
        self.oldest = min([self.active, *(s for s in self.segments() if s < self.active)])
        return removed


def referenced_segments(refs: list[str]) -> set[int]:
    """The segment numbers named by ``refs`` (a malformed one names none)."""
    found: set[int] = set()
    for ref in refs:
        match = _REF.match(ref)
        if match is not None:
            found.add(int(match.group(1)))
    return found
