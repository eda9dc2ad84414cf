"""The encoding of engine records: MessagePack, which describes data and runs nothing.

Every layer that keeps records of its own (the workflow engine, the node
registry) encodes them here: dicts of builtins (``None``, bools, ints of
any size, floats, strings, bytes, lists and dicts). Decoding one cannot run
code, whoever wrote the data directory.

Records written by earlier versions are pickles (protocol 5); they are
still read if every opcode of the pickle only builds plain values (dicts,
lists, tuples, strings, bytes, numbers), then by an unpickler that refuses
every global; a record that would name or call anything is refused with
:class:`~actorflow.core.errors.RecordFormatError`, and nothing of it runs.
"""

from __future__ import annotations

import io
import pickle
import pickletools
from typing import Any, NoReturn

import msgpack

from actorflow.core.errors import RecordFormatError

__all__ = ["dump", "load"]

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
                "written by something other than actorflow"
            ) from None
    if not isinstance(rec, dict):
        raise RecordFormatError(
            f"not an engine record: it decodes to a {type(rec).__name__}, not a dict"
        )
    return rec


def _what(e: Exception) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


# The pickle opcodes that only push or combine plain values. Every other
# opcode can call something: GLOBAL, STACK_GLOBAL, INST and OBJ name a class
# or function; REDUCE, BUILD, NEWOBJ and NEWOBJ_EX call what is on the stack;
# EXT1/2/4 fetch an object from the process's extension registry (and its
# cache, which no find_class override sees); PERSID, BINPERSID, NEXT_BUFFER
# and READONLY_BUFFER reach outside the stream.
_DATA_OPCODES = frozenset(
    {
        "PROTO",
        "FRAME",
        "STOP",
        "MARK",
        "POP",
        "POP_MARK",
        "DUP",
        "INT",
        "BININT",
        "BININT1",
        "BININT2",
        "LONG",
        "LONG1",
        "LONG4",
        "NONE",
        "NEWTRUE",
        "NEWFALSE",
        "FLOAT",
        "BINFLOAT",
        "STRING",
        "BINSTRING",
        "SHORT_BINSTRING",
        "UNICODE",
        "SHORT_BINUNICODE",
        "BINUNICODE",
        "BINUNICODE8",
        "BINBYTES",
        "SHORT_BINBYTES",
        "BINBYTES8",
        "BYTEARRAY8",
        "EMPTY_LIST",
        "APPEND",
        "APPENDS",
        "LIST",
        "EMPTY_TUPLE",
        "TUPLE",
        "TUPLE1",
        "TUPLE2",
        "TUPLE3",
        "EMPTY_DICT",
        "DICT",
        "SETITEM",
        "SETITEMS",
        "EMPTY_SET",
        "ADDITEMS",
        "FROZENSET",
        "GET",
        "BINGET",
        "LONG_BINGET",
        "PUT",
        "BINPUT",
        "LONG_BINPUT",
        "MEMOIZE",
    }
)


class _BuiltinsOnly(pickle.Unpickler):
    """An unpickler that refuses every global (a second wall behind the opcode check)."""

    def find_class(self, module: str, name: str) -> NoReturn:
        raise _refused(f"names {module}.{name}")


def _refused(what: str) -> RecordFormatError:
    return RecordFormatError(
        f"engine record refused: it is a pickle that {what}, which an engine record never "
        "does; the data directory may have been tampered with"
    )


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
            "actorflow"
        ) from None
