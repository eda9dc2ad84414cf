"""The data directory's own files, beside LMDB's ``data.mdb`` and ``lock.mdb``.

- **Who has it open.** A runtime without a node id holds
  ``actorflow.runtime.lock`` exclusively; a node holds it shared, and holds
  the lock file of its node id (``actorflow.node-<hash>.lock``) exclusively.
  These are ``flock`` locks, taken without waiting: the kernel drops them when
  the process dies, and each belongs to one open file, so a second runtime in
  the same process is refused as surely as one in another process. A lock
  file names the process that holds it, for the error the next one gets.
- **That it holds data.** :data:`MARKER` is written and fsync'd once the
  directory's data file exists. A directory that has it but no data file, or
  an empty one, has lost its data: it refuses to open rather than start empty.
- **That its data file is whole.** :func:`check_data_file` reads the two meta
  pages of ``data.mdb`` before LMDB maps it: a file shorter than its last
  commit needs would kill the process with SIGBUS at the first read.
- **Room for the lock table.** :func:`preallocate_lock_file` allocates a new
  ``lock.mdb`` before LMDB maps it, so that a full disk is an error instead of
  a SIGBUS.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import struct
import time
import uuid
from typing import Any

from actorflow.core.errors import DataDirectoryLocked, StorageCorrupted, StorageError, StorageFull

__all__ = [
    "DATA_FILE",
    "MARKER",
    "RUNTIME_LOCK",
    "DirectoryClaim",
    "check_data_file",
    "claim_directory",
    "hold_shared",
    "mark",
    "node_lock_name",
    "preallocate_lock_file",
]

DATA_FILE = "data.mdb"
LOCK_FILE = "lock.mdb"
#: Held exclusively by a runtime without a node id, shared by every node.
RUNTIME_LOCK = "actorflow.runtime.lock"
#: Written once the directory holds a data file: its absence later is damage.
MARKER = "actorflow.json"
_NODE_LOCK = "actorflow.node-{}.lock"

_FIX_LONE = (
    "Close the other runtime first; to run several runtimes on one directory, give each "
    "its own node_id (Runtime(..., node_id='web-1'), or the ACTORFLOW_NODE_ID environment "
    "variable). Under gunicorn or any server with several worker processes, open the "
    "runtime in one process only, or give each worker its own node_id"
)


# -- who has the directory open ----------------------------------------------------


def node_lock_name(node_id: str) -> str:
    """The name of node ``node_id``'s lock file (node ids need not be file names)."""
    return _NODE_LOCK.format(hashlib.sha256(node_id.encode()).hexdigest()[:20])


class DirectoryClaim:
    """The locks by which one runtime holds its data directory; see :func:`claim_directory`."""

    def __init__(self, path: str, fds: list[int], node_file: str | None) -> None:
        self.path = path
        self._fds = fds
        self._node_file = node_file

    def release(self) -> None:
        """Lets the next runtime (or node of the same id) open the directory."""
        fds, self._fds = self._fds, []
        if not fds:
            return
        try:
            if self._node_file is not None:
                # Removed while still locked: whoever opened it meanwhile finds
                # on locking that it is no longer the file at that path.
                os.unlink(self._node_file)
            else:
                os.ftruncate(fds[0], 0)  # a lone runtime's holder record
        except OSError:
            pass
        for fd in fds:
            os.close(fd)


def claim_directory(path: str, node_id: str | None) -> DirectoryClaim:
    """Claims data directory ``path`` for a runtime, alone or as node ``node_id``.

    Never waits.

    Raises:
        DataDirectoryLocked: Another runtime holds it: any runtime, for a
            runtime without a node id; a runtime without a node id, or one
            with the same node id, for a node.
    """
    os.makedirs(path, exist_ok=True)
    shared = os.path.join(path, RUNTIME_LOCK)
    fd = _open_lock(shared)
    try:
        if not _try_flock(fd, fcntl.LOCK_SH if node_id else fcntl.LOCK_EX):
            raise _refused(path, node_id)
        if node_id is None:
            _write_holder(fd, None)
            return DirectoryClaim(path, [fd], None)
        node_file = os.path.join(path, node_lock_name(node_id))
        nfd = _lock_exclusive(node_file)
        if nfd is None:
            holder = _holder(node_file)
            raise DataDirectoryLocked(
                f"node {node_id!r} is already open on data directory {path} "
                f"({_where(holder)}): a node id runs in one runtime at a time. Close that "
                "runtime first, or give this one another node_id",
                path=path,
                pid=_pid(holder),
                node=node_id,
            )
        _write_holder(nfd, node_id)
        return DirectoryClaim(path, [nfd, fd], node_file)
    except BaseException:
        os.close(fd)
        raise


def hold_shared(lock_file: str, timeout: float) -> int:
    """Takes a shared ``flock`` on ``lock_file``, waiting at most ``timeout`` seconds.

    Returns the descriptor holding it (closing it releases the lock).

    Raises:
        DataDirectoryLocked: It stayed held exclusively (by the ``actorflow``
            command changing a closed directory) for ``timeout`` seconds.
    """
    fd = _open_lock(lock_file)
    deadline = time.monotonic() + timeout
    delay = 0.001
    while not _try_flock(fd, fcntl.LOCK_SH):
        if time.monotonic() >= deadline:
            os.close(fd)
            path = os.path.dirname(lock_file)
            raise DataDirectoryLocked(
                f"data directory {path} stayed locked for {timeout:g} s by the `actorflow` "
                f"command (it holds {os.path.basename(lock_file)} while it changes a closed "
                "directory); open the runtime once the command is done",
                path=path,
            )
        time.sleep(delay)  # the command's change is short: a few polls
        delay = min(delay * 2, 0.05)
    return fd


def _open_lock(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)


def _try_flock(fd: int, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _lock_exclusive(path: str) -> int | None:
    """Locks ``path`` exclusively; None if another holds it. Survives its removal by a releaser."""
    for _ in range(100):
        fd = _open_lock(path)
        if not _try_flock(fd, fcntl.LOCK_EX):
            os.close(fd)
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # locked a file its holder removed on release: take the new one
    raise StorageError(f"could not lock {path}: it keeps being replaced")


def _write_holder(fd: int, node_id: str | None) -> None:
    record = json.dumps({"pid": os.getpid(), "node": node_id}).encode()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
    except OSError:
        pass  # only for messages; a full disk must not stop the runtime here


def _holder(path: str) -> dict[str, Any] | None:
    """The live holder recorded in lock file ``path``, if any."""
    try:
        with open(path, "rb") as f:
            record = json.loads(f.read(4096) or b"null")
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("pid"), int):
        return None
    return record if _alive(record["pid"]) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid(holder: dict[str, Any] | None) -> int | None:
    return None if holder is None else int(holder["pid"])


def _where(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "process unknown"
    if holder["pid"] == os.getpid():
        return f"another Runtime in this process, pid {holder['pid']}"
    return f"process {holder['pid']}"


def _refused(path: str, node_id: str | None) -> DataDirectoryLocked:
    lone = _holder(os.path.join(path, RUNTIME_LOCK))
    if node_id is not None:
        return DataDirectoryLocked(
            f"data directory {path} is in use by a runtime without a node_id "
            f"({_where(lone)}): nodes share a data directory only with other nodes. Close "
            "that runtime first, or open it as a node too (node_id=...)",
            path=path,
            pid=_pid(lone),
            node=node_id,
        )
    if lone is not None and lone.get("node") is None:
        who = f"a runtime without a node_id ({_where(lone)})"
        pid = _pid(lone)
    else:
        nodes = []
        try:
            names = sorted(n for n in os.listdir(path) if n.startswith("actorflow.node-"))
        except OSError:
            names = []
        for name in names:
            holder = _holder(os.path.join(path, name))
            if holder is not None:
                nodes.append(holder)
        if nodes:
            nodes.sort(key=lambda n: str(n.get("node")))
            who = "nodes " + ", ".join(f"{n.get('node')!r} ({_where(n)})" for n in nodes)
            pid = _pid(nodes[0])
        else:
            who, pid = "another runtime", None
    return DataDirectoryLocked(
        f"data directory {path} is in use by {who}: a runtime without a node_id must have "
        f"its data directory to itself. {_FIX_LONE}",
        path=path,
        pid=pid,
    )


# -- what the directory holds ------------------------------------------------------

# The head of an LMDB meta page: the page header (16 bytes in LMDB 0.9, 24 in
# 1.0; mp_flags is its third field from the end), then MDB_meta: mm_magic,
# mm_version, mm_address, mm_mapsize, the free and main MDB_db records (48
# bytes each; the free one's md_pad is the page size), mm_last_pg, mm_txnid.
_MAGIC = 0xBEEFC0DE
_P_META = 0x08
_META = struct.Struct("=IIQQ" + "IHHQQQQQ" * 2 + "QQ")
_U16 = struct.Struct("=H")
_U32 = struct.Struct("=I")


def _meta(head: bytes, hdrsz: int) -> tuple[int, int, int] | None:
    """``(page size, last page, txnid)`` of the meta page ``head``, or None if it is not one."""
    if len(head) < hdrsz + _META.size:
        return None
    if not _U16.unpack_from(head, hdrsz - 6)[0] & _P_META:
        return None
    fields = _META.unpack_from(head, hdrsz)
    if fields[0] != _MAGIC:
        return None
    return fields[4], fields[-2], fields[-1]


def _has_marker(path: str) -> bool:
    return os.path.exists(os.path.join(path, MARKER))


def check_data_file(path: str) -> bool:
    """Checks ``data.mdb`` of data directory ``path`` before LMDB maps it.

    Returns True when the directory holds no data yet (LMDB will create it).

    Raises:
        StorageCorrupted: The directory held data (it has :data:`MARKER`) and
            its data file is gone or empty; or the data file's meta pages are
            damaged; or it is shorter than its last commit needs.
    """
    data = os.path.join(path, DATA_FILE)
    try:
        fd = os.open(data, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        fd = -1
    try:
        size = os.fstat(fd).st_size if fd >= 0 else 0
        if size == 0:
            if not _has_marker(path):
                return True
            state = "is missing" if fd < 0 else "is empty (0 bytes)"
            raise StorageCorrupted(
                f"data directory {path} held data, but its data file {DATA_FILE} {state}: it "
                "was deleted or truncated. Nothing was opened. Restore the directory from a "
                f"backup; to start over with no data, remove the directory (or its {MARKER})",
                path=path,
            )
        head = os.pread(fd, 64 + _META.size, 0)
        hdrsz = next((h for h in (16, 24) if _meta(head, h) is not None), 0)
        m0 = _meta(head, hdrsz) if hdrsz else None
        psize = m0[0] if m0 is not None else 0
        m1 = None
        if m0 is not None and 256 <= psize <= 1 << 16 and psize & (psize - 1) == 0:
            m1 = _meta(os.pread(fd, hdrsz + _META.size, psize), hdrsz)
    finally:
        if fd >= 0:
            os.close(fd)
    if m0 is None or m1 is None:
        raise StorageCorrupted(
            f"the data file {data} is damaged: its meta pages (the first two pages, where "
            f"each commit is recorded) are unreadable ({size} bytes). Nothing was opened. "
            "Restore the directory from a backup",
            path=path,
        )
    _, last_pg, txnid = max(m0, m1, key=lambda m: m[2])
    need = (last_pg + 1) * psize
    if size < need:
        problems = _problems(path)
        if problems:
            raise StorageCorrupted(
                f"the data file {data} is truncated: it has {size} bytes, but its last commit "
                f"(transaction {txnid}) uses {need} (pages 0 to {last_pg} of {psize} bytes); "
                f"{'; '.join(problems[:3])}. Nothing was opened: opening it would crash the "
                "process at the first read. Restore the directory from a backup",
                path=path,
            )
    return False


def _problems(path: str) -> list[str]:
    """What py-lmdb's structural verifier finds wrong with the data file of ``path``.

    A short data file is not always a truncated one: LMDB may leave free pages
    it never wrote at its end. The verifier (which reads the file and never
    maps it) tells them apart; without it (py-lmdb before 3.0), a short file is
    taken as truncated.
    """
    try:
        from lmdb import verify as lmdb_verify
    except ImportError:
        return ["pages past its end are unreadable"]
    try:
        return list(lmdb_verify.verify(path))
    except Exception as exc:  # VerifyError: it could not even begin
        return [str(exc)]


def mark(path: str) -> None:
    """Records durably that data directory ``path`` holds data (see :data:`MARKER`).

    Raises:
        StorageFull: The disk is full.
        StorageError: Another failure to write it.
    """
    final = os.path.join(path, MARKER)
    tmp = f"{final}.{os.getpid()}.tmp"
    record = json.dumps({"actorflow": 1, "id": uuid.uuid4().hex}).encode()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, record)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        dfd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise disk_error(path, f"writing {MARKER}", exc) from exc


def preallocate_lock_file(path: str, max_readers: int) -> None:
    """Creates ``lock.mdb`` of a directory that has none, with its space allocated.

    LMDB sizes a new lock file with ``ftruncate`` (leaving it sparse) and maps
    it: on a full disk, its first write to the map kills the process with
    SIGBUS. Allocated here first, with the size LMDB gives it (its reader
    table: 64 bytes a reader after a 192-byte header), a full disk is an
    ``ENOSPC`` instead. The file is made aside and linked into place, so that
    ``lock.mdb`` never exists unallocated and a process opening the directory
    meanwhile never sees a half-made one. An existing lock file is left alone.

    Raises:
        StorageFull: The disk is full.
    """
    lock = os.path.join(path, LOCK_FILE)
    if os.path.exists(lock):
        return
    tmp = f"{lock}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        try:
            os.posix_fallocate(fd, 0, (max_readers - 1) * 64 + 192)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise disk_error(path, f"creating {LOCK_FILE}", exc) from exc
            # A file system without fallocate: LMDB sizes the file as it always did.
        try:
            os.link(tmp, lock)
        except FileExistsError:
            pass  # another process made it first
    finally:
        os.close(fd)
        os.unlink(tmp)


def disk_error(path: str, doing: str, exc: OSError) -> StorageError:
    """The named error for an ``OSError`` met while ``doing`` something in ``path``."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(
            f"the disk holding data directory {path} is full ({doing}: {exc.strerror}); "
            "nothing was written. Free some space and retry",
            path=path,
        )
    return StorageError(f"data directory {path}: {doing} failed: {exc}", path=path)
