"""How workflow instances are laid out in storage.

Keyspaces (LMDB named databases) and their keys. ``ik`` is ``wf \\0 id``, the
instance's name; ``rk`` is ``wf \\0 n``, where ``n`` (8 bytes) is a number the
instance gets at creation, increasing in creation order:

=========  ===================================  ========================================
keyspace   key                                  value
=========  ===================================  ========================================
ids        ik                                   ``n``: where the instance's records are
numbers    ``next``                             the first record number not yet reserved
inst       rk                                   the instance record (a dict)
fence      rk                                   the instance's epoch (8 bytes), the
                                                fencing token every engine write guards
idx        wf \\0 status \\0 created \\0 id     empty: lists instances by status, newest
                                                first, and finds unfinished ones
steps      rk \\0 kind sha1(name) count         one step record (a dict)
events     rk \\0 type \\0 seq                  a buffered event, FIFO per type
hist       rk \\0 seq                           an instance-level history event
queue:wf   priority seq                         an instance id waiting for a slot
owner      ik                                   multi-node: the owner's node id
owned      node \\0 ik                          multi-node: empty, the instances of a node
nodes      node                                 multi-node: the node registry (see
                                                :mod:`actorflow.lease`)
=========  ===================================  ========================================

Why two keys: ids are often random (uuid4), and a B-tree updated at random
keys dirties a page per update. Keyed by ``rk``, the records of instances
created together sit together, and so do their later writes when those
follow creation order (a million sleepers woken in deadline order, a queue
drained in order): a group commit then dirties a few pages, not one per
instance per keyspace. Only ``ids`` is updated at random, and only once.

Engine records (instance, step, event, history and node records) are
dicts of builtins encoded with MessagePack, a format that describes data
only: decoding one cannot run code, whoever wrote the directory. User
values inside them (params, results, payloads, errors) are bytes from the
runtime's serializer, decoded only where they are used (see "Trust boundary
of a data directory" in docs/operations.md).

Records written before that are pickles (protocol 5); they are still read
if every opcode of the pickle only builds plain values (dicts, lists,
tuples, strings, bytes, numbers), then by an unpickler that refuses every
global; a record that would name or call anything is refused with
:class:`RecordFormatError`, and nothing of it runs.
"""

from __future__ import annotations

import functools
import hashlib
import io
import pickle
import pickletools
import struct
from collections.abc import Iterable
from typing import Any, NoReturn

import msgpack

from actorflow.errors import RecordFormatError

__all__ = [
    "EVENTS",
    "FENCE",
    "HIST",
    "IDS",
    "IDX",
    "INST",
    "NUMBERS",
    "STEPS",
    "RecordFormatError",
    "dump",
    "epoch_bytes",
    "event_key",
    "hist_key",
    "idx_key",
    "ikey",
    "load",
    "queue_db",
    "record_number",
    "rkey",
    "rkey_of",
    "step_key",
    "step_target",
    "target_rkey",
]

IDS = "ids"
NUMBERS = "numbers"
INST = "inst"
FENCE = "fence"
IDX = "idx"
STEPS = "steps"
EVENTS = "events"
HIST = "hist"

# Step record statuses.
DONE = "complete"
FAILED = "errored"
RUNNING = "running"
RETRYING = "retrying"
SLEEPING = "sleeping"
WAITING = "waiting"

KIND_CODES = {"do": b"d", "sleep": b"s", "wait_for_event": b"w"}
WAKE_KIND = "W"  # timer kind for instance deadlines
PRIO_WAKE = b"\x00"  # queue entries of instances to resume: served first
PRIO_NEW = b"\x01"  # queue entries of new (or restarted) instances

_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")


_BIG_INT = 1  # MessagePack extension code: an int beyond 64 bits (signed, big-endian)
# How a record written by pickle (protocol 2 and later) begins: the PROTO
# opcode. A record encoded here is a map, and the only map that begins with
# this byte is the empty one, which is that byte alone.
_PICKLE_PROTO = 0x80


def _encode_other(value: object) -> msgpack.ExtType:
    """Encodes what MessagePack has no type for: ints beyond 64 bits, nothing else."""
    if isinstance(value, int):
        n = (value.bit_length() + 8) // 8  # + 1 bit for the sign
        return msgpack.ExtType(_BIG_INT, value.to_bytes(n, "big", signed=True))
    raise TypeError(f"an engine record cannot hold a {type(value).__name__}: {value!r:.80}")


def _decode_ext(code: int, data: bytes) -> int:
    if code == _BIG_INT:
        return int.from_bytes(data, "big", signed=True)
    raise RecordFormatError(f"engine record holds an unknown extension type {code}")


def dump(record: dict[str, Any]) -> bytes:
    """Encodes an engine record (MessagePack).

    Tuples come back as lists; bytes stay bytes.

    Raises:
        TypeError: The record holds something that is not a builtin value
            (an engine bug: user values are bytes by then).
    """
    return msgpack.packb(record, use_bin_type=True, default=_encode_other)


def load(data: bytes) -> dict[str, Any]:
    """Decodes an engine record, of this format or the pickles of earlier versions.

    Neither can run code: MessagePack describes data only, and an old
    pickle is read only if its every opcode builds plain values.

    Raises:
        RecordFormatError: The bytes are not an engine record (damaged, or
            written by something else, such as a crafted pickle).
    """
    if len(data) > 1 and data[0] == _PICKLE_PROTO:
        rec: Any = _load_pickled(data)
    else:
        try:
            rec = msgpack.unpackb(data, raw=False, ext_hook=_decode_ext)
        except RecordFormatError:
            raise
        except Exception as e:
            raise RecordFormatError(
                f"not an engine record ({_what(e)}); the data directory is damaged or was "
                "written by something other than actorflow") from None
    if not isinstance(rec, dict):
        raise RecordFormatError(
            f"not an engine record: it decodes to a {type(rec).__name__}, not a dict")
    return rec


def _what(e: Exception) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


# The pickle opcodes that only push or combine plain values. Every other
# opcode can call something: GLOBAL, STACK_GLOBAL, INST and OBJ name a class
# or function; REDUCE, BUILD, NEWOBJ and NEWOBJ_EX call what is on the stack;
# EXT1/2/4 fetch an object from the process's extension registry (and its
# cache, which no find_class override sees); PERSID, BINPERSID, NEXT_BUFFER
# and READONLY_BUFFER reach outside the stream.
_DATA_OPCODES = frozenset({
    "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP",
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4",
    "NONE", "NEWTRUE", "NEWFALSE", "FLOAT", "BINFLOAT",
    "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE",
    "BINUNICODE", "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8",
    "EMPTY_LIST", "APPEND", "APPENDS", "LIST",
    "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
    "EMPTY_DICT", "DICT", "SETITEM", "SETITEMS",
    "EMPTY_SET", "ADDITEMS", "FROZENSET",
    "GET", "BINGET", "LONG_BINGET", "PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE",
})


class _BuiltinsOnly(pickle.Unpickler):
    """An unpickler that refuses every global (a second wall behind the opcode check)."""

    def find_class(self, module: str, name: str) -> NoReturn:
        raise _refused(f"names {module}.{name}")


def _refused(what: str) -> RecordFormatError:
    return RecordFormatError(
        f"engine record refused: it is a pickle that {what}, which an engine record never "
        "does; the data directory may have been tampered with")


def _load_pickled(data: bytes) -> Any:
    """Reads a record pickled by an earlier version, if it holds only plain values.

    Every opcode is checked first (:data:`_DATA_OPCODES`): a pickle made of
    those alone can build only dicts, lists, tuples, sets, strings, bytes,
    numbers, booleans and None, and none of those is callable, so nothing
    runs. Only then is it unpickled, with :class:`_BuiltinsOnly`.
    """
    try:
        strings: list[str] = []
        for op, arg, _pos in pickletools.genops(data):
            if op.name not in _DATA_OPCODES:
                if op.name in ("GLOBAL", "INST") and isinstance(arg, str):
                    raise _refused("names " + arg.replace(" ", "."))
                if op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    raise _refused(f"names {strings[-2]}.{strings[-1]}")
                raise _refused(f"uses the opcode {op.name}")
            if isinstance(arg, str):
                strings.append(arg)
        return _BuiltinsOnly(io.BytesIO(data)).load()
    except RecordFormatError:
        raise
    except Exception as e:
        raise RecordFormatError(
            f"not an engine record: a pickle that cannot be read ({_what(e)}); "
            "the data directory is damaged or was written by something other than "
            "actorflow") from None


def ikey(wf: str, iid: str) -> bytes:
    """Returns the key of an instance."""
    return f"{wf}\x00{iid}".encode()


def rkey(wf: str, n: bytes) -> bytes:
    """Returns the key of an instance's records from its ``ids`` entry ``n``."""
    return wf.encode() + b"\x00" + n


def rkey_of(ik: bytes, n: bytes) -> bytes:
    """Returns the key of the records of instance ``ik`` from its ``ids`` entry ``n``."""
    return ik[:ik.index(b"\x00") + 1] + n


def record_number(n: int) -> bytes:
    """Encodes an instance's record number (its ``ids`` value)."""
    return _U64.pack(n)


def split_ikey(ik: bytes) -> tuple[str, str]:
    """Returns ``(workflow, instance id)`` of an instance key."""
    wf, iid = ik.split(b"\x00", 2)[:2]
    return wf.decode(), iid.decode()


def epoch_bytes(epoch: int) -> bytes:
    """Encodes an epoch for the fence keyspace."""
    return _U64.pack(epoch)


@functools.lru_cache(maxsize=8192)
def _name_digest(kind: str, name: str) -> bytes:
    return KIND_CODES[kind] + hashlib.sha1(name.encode()).digest()[:12]


def step_key(rk: bytes, kind: str, name: str, count: int) -> bytes:
    """Returns the key of occurrence ``count`` of step ``name`` of ``kind``."""
    return rk + b"\x00" + _name_digest(kind, name) + _U32.pack(count)


def steps_prefix(rk: bytes) -> bytes:
    """Returns the prefix of every step key of an instance."""
    return rk + b"\x00"


def step_target(ik: bytes, rk: bytes, key: bytes) -> bytes:
    """Returns the timer target of step ``key``: ``ik \\0 n \\0 step``.

    ``ik`` says whose deadline it is; ``n`` lets the wake-up find the
    instance's records without reading ``ids``.
    """
    return ik + key[rk.index(b"\x00"):]


def target_rkey(target: bytes) -> bytes | None:
    """Returns the record key in a timer target made by :func:`step_target` (else None)."""
    parts = target.split(b"\x00", 2)
    if len(parts) < 3 or len(parts[2]) <= 8:
        return None
    return parts[0] + b"\x00" + parts[2][:8]


def event_key(rk: bytes, event_type: str, seq: int) -> bytes:
    """Returns the key of a buffered event."""
    return rk + b"\x00" + event_type.encode() + b"\x00" + _U64.pack(seq)


def events_prefix(rk: bytes, event_type: str | None = None) -> bytes:
    """Returns the prefix of an instance's buffered events (of one type, if given)."""
    if event_type is None:
        return rk + b"\x00"
    return rk + b"\x00" + event_type.encode() + b"\x00"


def hist_key(rk: bytes, seq: int) -> bytes:
    """Returns the key of an instance-level history event."""
    return rk + b"\x00" + _U64.pack(seq)


def idx_key(wf: str, status: str, created_ms: int, iid: str) -> bytes:
    """Returns the status-index key of an instance (newest first within a status)."""
    return f"{wf}\x00{status}\x00".encode() + _U64.pack(2**63 - created_ms) + b"\x00" + iid.encode()


def idx_prefix(wf: str, status: str | None = None) -> bytes:
    """Returns the prefix of a workflow's status index (of one status, if given)."""
    return f"{wf}\x00{status}\x00".encode() if status else f"{wf}\x00".encode()


def idx_iid(key: bytes) -> str:
    """Returns the instance id of a status-index key."""
    return key.rsplit(b"\x00", 1)[1].decode()


def queue_db(wf: str) -> str:
    """Returns the keyspace of a workflow's queue."""
    return f"queue:{wf}"


def queue_key(priority: bytes, seq: int) -> bytes:
    """Returns a queue key; lower priority bytes are served first."""
    return priority + _U64.pack(seq)


BLOCKED = (SLEEPING, WAITING, RETRYING)


def step_timers(steps: Iterable[dict[str, Any]]) -> list[bytes]:
    """Returns the timer keys of the steps still blocked on a deadline."""
    return [r["tk"] for r in steps if r.get("tk") and r["s"] in BLOCKED]


def error_dict(exc: BaseException) -> dict[str, str]:
    """Returns Cloudflare's ``{name, message}`` form of an exception."""
    return {"name": type(exc).__name__, "message": str(exc)}
