"""Batches the daemon could not take yet, kept on local disk in order, bounded, and readable after a crash.

The reporter's sender thread writes here when the daemon has been unreachable for longer than the memory queue
covers. What goes to disk is the encoded batch itself, header included, so a batch keeps its identity (run, rank,
incarnation, sequence number) however late it is sent: the daemon recognises a resend of a batch it already
committed, by another process too, and stores it once.

File layout (little-endian), one file per sender:

    header   b"TGSPILL1" | u64 consumed offset | u32 crc32 of the offset bytes          20 bytes
    frame    u32 payload bytes | u32 records in it | u32 crc32 of (records, payload) | payload

Frames are appended; the consumed offset moves past each frame the daemon acknowledged. A frame cut short by a
crash (the last write torn) or one whose checksum does not match ends the file: it and whatever follows are
discarded and counted. A stale consumed offset only means a few acknowledged batches are sent again, which the
daemon's sequence numbers turn into duplicates it ignores, so the header is rewritten without fsync.

Every file is held under an exclusive flock while its owner lives. A reporter that starts with the same spill
directory adopts the files whose owner has gone (the lock is free) and sends them before its own records: a
training process that crashes or exits while the daemon is away loses nothing that reached the disk.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import struct
import time
import zlib
from typing import Iterator

log = logging.getLogger("trainguard.client")

MAGIC = b"TGSPILL1"
_HEADER = struct.Struct("<8sQI")
_FRAME = struct.Struct("<III")
HEADER_BYTES = _HEADER.size
FRAME_BYTES = _FRAME.size
SUFFIX = ".spill"
# The wire contract caps a batch at 4 MiB; a length beyond this cannot be ours and marks a corrupt frame.
MAX_FRAME_PAYLOAD = 8 * 1024 * 1024
# Orphans adopted at one start, each holding a descriptor until it is drained.
MAX_ADOPTED = 64


def _offset_crc(offset: int) -> int:
    return zlib.crc32(struct.pack("<Q", offset))


def _frame_crc(n: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(struct.pack("<I", n)))


def file_name(run: str, rank: int, incarnation: str) -> str:
    """The spill file's name for one sender (run ids may hold '/' and ':', which file names should not)."""
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', run)}.rank{rank}.{incarnation}{SUFFIX}"


class SpillFile:
    """One spill file, locked by this process: append frames at the end, take them in order from the front."""

    def __init__(self, path: str, fd: int, consumed: int, end: int, records: int, frames: int, torn: int = 0):
        self.path = path
        self.fd = fd
        self.consumed = consumed  # offset of the oldest frame not yet acknowledged
        self.end = end  # offset where the next frame goes
        self.records = records  # records in the frames between consumed and end
        self.frames = frames
        self.torn = torn  # frames found cut short or corrupt, and discarded
        self.lost_records = 0  # records in frames discarded as corrupt
        self.gone = False
        self._peeked = 0  # size of the frame peek() returned last, for consume()

    # -- opening -----------------------------------------------------------------------------------

    @classmethod
    def create(cls, directory: str, name: str) -> "SpillFile":
        """A new, empty, locked spill file (raises OSError)."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, name)
        # Made under a name the orphan scan ignores, locked, given its header, and only then renamed: a scan
        # can never lock it first and mistake the empty file for one whose owner died.
        tmp = path + ".new"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.pwrite(fd, _HEADER.pack(MAGIC, HEADER_BYTES, _offset_crc(HEADER_BYTES)), 0)
            os.rename(tmp, path)
        except BaseException:
            os.close(fd)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return cls(path, fd, HEADER_BYTES, HEADER_BYTES, 0, 0)

    @classmethod
    def adopt(cls, path: str) -> "SpillFile | None":
        """Lock a spill file whose owner has gone and index its frames; None if it is live, drained or not ours."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                return None  # its owner is alive
            st = os.fstat(fd)
            # Its last owner drained and removed it between our open and our lock.
            if st.st_nlink == 0:
                os.close(fd)
                return None
            head = os.pread(fd, HEADER_BYTES, 0)
            if len(head) < HEADER_BYTES:
                os.close(fd)
                return None
            magic, consumed, crc = _HEADER.unpack(head)
            if magic != MAGIC:
                os.close(fd)
                return None  # someone else's file: leave it alone
            if crc != _offset_crc(consumed) or not HEADER_BYTES <= consumed <= st.st_size:
                consumed = HEADER_BYTES  # a torn header write: send everything again, the daemon dedups
            f = cls(path, fd, consumed, consumed, 0, 0)
            f._index(st.st_size)
            return f
        except OSError:
            try:
                os.close(fd)
            except OSError:
                pass
            return None

    def _index(self, size: int) -> None:
        """Walk the frame headers from `consumed`, counting records; cut the file at the first torn frame."""
        off = self.consumed
        while off < size:
            head = os.pread(self.fd, FRAME_BYTES, off)
            if len(head) < FRAME_BYTES:
                break
            length, n, _crc = _FRAME.unpack(head)
            if length > MAX_FRAME_PAYLOAD or off + FRAME_BYTES + length > size:
                break
            off += FRAME_BYTES + length
            self.records += n
            self.frames += 1
        self.end = off
        if off < size:
            # The last write was cut short (a crash or a full disk): what is there cannot be trusted.
            self.torn += 1
            os.ftruncate(self.fd, off)

    # -- writing and reading -----------------------------------------------------------------------

    @property
    def pending_bytes(self) -> int:
        """Bytes of frames not yet acknowledged."""
        return self.end - self.consumed

    def append(self, payload: bytes, n: int) -> None:
        """Write one frame at the end (raises OSError; a failed write leaves the file as it was)."""
        frame = _FRAME.pack(len(payload), n, _frame_crc(n, payload)) + payload
        try:
            written = os.pwrite(self.fd, frame, self.end)
            if written != len(frame):
                raise OSError(f"short write to {self.path}: {written} of {len(frame)} bytes")
        except OSError:
            try:
                os.ftruncate(self.fd, self.end)  # no torn frame left for the next append to sit behind
            except OSError:
                pass
            raise
        self.end += len(frame)
        self.records += n
        self.frames += 1

    def peek(self) -> tuple[int, bytes] | None:
        """The oldest unacknowledged frame as (records, payload); None when drained (or the rest was corrupt)."""
        while self.consumed < self.end:
            head = os.pread(self.fd, FRAME_BYTES, self.consumed)
            if len(head) == FRAME_BYTES:
                length, n, crc = _FRAME.unpack(head)
                if length <= MAX_FRAME_PAYLOAD and self.consumed + FRAME_BYTES + length <= self.end:
                    payload = os.pread(self.fd, length, self.consumed + FRAME_BYTES)
                    if len(payload) == length and _frame_crc(n, payload) == crc:
                        self._peeked = FRAME_BYTES + length
                        return n, payload
            self._discard_rest()
        return None

    def _discard_rest(self) -> None:
        """A frame failed its checksum: it and everything after it are dropped and counted."""
        self.torn += 1
        self.lost_records += self.records
        log.warning("trainguard: spill file %s is corrupt at byte %d; %d record(s) in it are lost",
                    self.path, self.consumed, self.records)
        self.records = 0
        self.frames = 0
        self.end = self.consumed
        try:
            os.ftruncate(self.fd, self.end)
        except OSError:
            pass

    def consume(self, n: int) -> None:
        """Move past the frame peek() returned, now acknowledged (or refused for good)."""
        self.consumed += self._peeked
        self._peeked = 0
        self.records -= n
        self.frames -= 1
        try:
            os.pwrite(self.fd, _HEADER.pack(MAGIC, self.consumed, _offset_crc(self.consumed)), 0)
        except OSError:
            pass  # a stale offset costs a few resends the daemon recognises, nothing more

    # -- closing -----------------------------------------------------------------------------------

    def remove(self) -> None:
        """Delete the drained file and release it (unlinked before unlocking, so no one adopts it meanwhile)."""
        if self.gone:
            return
        self.gone = True
        try:
            os.unlink(self.path)
        except OSError:
            pass
        self.forget()

    def release(self, sync: bool = True) -> None:
        """Keep the file for a later process: write it out (sync) and unlock it; remove it if it is empty."""
        if self.gone:
            return
        if self.frames == 0:
            self.remove()
            return
        self.gone = True
        if sync:
            try:
                os.fsync(self.fd)
            except OSError:
                pass
        self.forget()

    def forget(self) -> None:
        """Close the descriptor without touching the file (also what a forked child does with its parent's)."""
        self.gone = True
        try:
            os.close(self.fd)
        except OSError:
            pass


def orphans(directory: str, skip: str | None = None) -> Iterator[SpillFile]:
    """Adopt the spill files in `directory` whose owners have gone, oldest first (at most MAX_ADOPTED)."""
    try:
        names = [n for n in os.listdir(directory) if n.endswith(SUFFIX) and n != skip]
    except OSError:
        return
    paths = []
    for n in names:
        p = os.path.join(directory, n)
        try:
            paths.append((os.stat(p).st_mtime, p))
        except OSError:
            continue
    taken = 0
    for _, p in sorted(paths):
        if taken >= MAX_ADOPTED:
            return
        f = SpillFile.adopt(p)
        if f is None:
            continue
        if f.frames == 0:
            f.remove()  # drained (or wholly torn) by a process that died before it could remove it
            continue
        taken += 1
        yield f


class Spill:
    """The sender thread's view: its own bounded spill file, plus orphans adopted at start, drained first."""

    def __init__(self, directory: str, name: str, max_bytes: int):
        self.directory = directory
        self.name = name
        self.max_bytes = max(0, int(max_bytes))
        self.own: SpillFile | None = None
        self.adopted: list[SpillFile] = []
        self.spilled = 0  # records written to the own file
        self.torn = 0  # torn or corrupt frames found in files already closed
        self._lost_closed = 0
        self.left = 0  # records of the own file left on disk for a later process at close
        self._create_failed_at = 0.0
        self.last_error: str | None = None

    def adopt_orphans(self) -> int:
        """Take over the files that dead processes left in the directory; return how many records they hold."""
        found = list(orphans(self.directory, skip=self.name))
        self.adopted.extend(found)
        return sum(f.records for f in found)

    # -- the own file ------------------------------------------------------------------------------

    def room(self) -> int:
        """Bytes the own file may still grow by."""
        used = self.own.end if self.own is not None else HEADER_BYTES
        return max(0, self.max_bytes - used)

    def write(self, payload: bytes, n: int) -> bool:
        """Append one encoded batch of `n` records to the own file; False if it does not fit or cannot be written."""
        if FRAME_BYTES + len(payload) > self.room():
            self.last_error = f"spill file full ({self.max_bytes} bytes)"
            return False
        try:
            if self.own is None:
                if time.monotonic() - self._create_failed_at < 5.0:
                    return False  # an unwritable directory: not one failing syscall per batch
                self.own = SpillFile.create(self.directory, self.name)
            self.own.append(payload, n)
        except OSError as e:
            if self.own is None:
                self._create_failed_at = time.monotonic()
            self.last_error = f"spill: {e}"
            return False
        self.spilled += n
        return True

    @property
    def own_records(self) -> int:
        """Records of this sender waiting on disk (after close: left there for a later process)."""
        return self.own.records if self.own is not None else self.left

    # -- draining ----------------------------------------------------------------------------------

    def next(self) -> tuple[SpillFile, int, bytes] | None:
        """The oldest frame still to send, adopted files first: (its file, records, payload)."""
        for f in list(self.adopted):
            got = f.peek()
            if got is not None:
                return f, got[0], got[1]
            self._closed(f)
            f.remove()
            self.adopted.remove(f)
        f = self.own
        if f is not None:
            got = f.peek()
            if got is not None:
                return f, got[0], got[1]
            if f.frames == 0:
                # Drained: the file goes, so a healthy run leaves nothing behind; the next outage makes a new one.
                self._closed(f)
                f.remove()
                self.own = None
        return None

    def tidy(self) -> None:
        """Remove the files whose every frame was acknowledged."""
        for f in [f for f in self.adopted if f.frames == 0]:
            self._closed(f)
            f.remove()
            self.adopted.remove(f)
        if self.own is not None and self.own.frames == 0:
            self._closed(self.own)
            self.own.remove()
            self.own = None

    def _closed(self, f: SpillFile) -> None:
        self.torn += f.torn
        if f is self.own:
            self._lost_closed += f.lost_records

    @property
    def pending(self) -> bool:
        """Whether any frame waits to be sent."""
        return any(f.frames for f in self.adopted) or (self.own is not None and self.own.frames > 0)

    @property
    def pending_bytes(self) -> int:
        """Bytes waiting on disk, the adopted files' included."""
        return sum(f.pending_bytes for f in self.adopted) + (self.own.pending_bytes if self.own else 0)

    @property
    def torn_total(self) -> int:
        """Frames found cut short or corrupt so far."""
        return self.torn + sum(f.torn for f in self.adopted) + (self.own.torn if self.own else 0)

    @property
    def own_lost(self) -> int:
        """This sender's records lost to a corrupt frame in its own file."""
        return self._lost_closed + (self.own.lost_records if self.own else 0)

    def close(self) -> None:
        """Release every file: a drained one is removed, one with frames left stays for the next process."""
        for f in self.adopted:
            f.release()
        self.adopted = []
        if self.own is not None:
            self.left = self.own.records
            self._closed(self.own)
            self.own.release()
            self.own = None

    def forget(self) -> None:
        """Drop the descriptors without touching the files (a forked child's copy of its parent's state)."""
        for f in self.adopted:
            f.forget()
        if self.own is not None:
            self.own.forget()
        self.adopted = []
        self.own = None
