"""Write batches: the unit of an atomic, durable write (see :mod:`actorflow.core.storage`).

A :class:`WriteBatch` collects puts, deletes and guards; :class:`Chain` ties
batches into a sequence that lands as a prefix. Keys are checked when they
are added, in the caller's thread, so that a bad key fails its caller and not
the group commit it would have joined.
"""

from __future__ import annotations

from actorflow.core.errors import LimitExceeded

__all__ = ["MAX_KEY_BYTES", "Chain", "WriteBatch"]

MAX_KEY_BYTES = 511  # LMDB's compiled-in key size limit
# Operation codes of WriteBatch.ops (also read by actorflow.metrics).
_PUT, _DELETE, _DELETE_PREFIX = 0, 1, 2


def _check_key(key: bytes) -> None:
    # LMDB rejects these inside the write transaction, which would fail every
    # batch of the group; refuse them here, in the caller's thread, instead.
    if len(key) > MAX_KEY_BYTES:
        raise LimitExceeded(f"storage key of {len(key)} bytes exceeds {MAX_KEY_BYTES} bytes")
    if not key:
        raise ValueError("storage keys must not be empty")


class Chain:
    """Ties batches into a sequence that lands as a prefix (see the module doc).

    Once :attr:`failed` is set (by the writer thread, when a batch of the
    chain fails), every later batch of the chain fails without being applied.
    A chain never recovers: start a new one.
    """

    __slots__ = ("error", "failed")

    def __init__(self) -> None:
        self.failed = False
        self.error: BaseException | None = None


class WriteBatch:
    """Writes to apply atomically, with optional guards.

    Operations are applied in the order they were added.
    """

    __slots__ = ("chain", "guards", "notes", "ops")

    def __init__(self, chain: Chain | None = None) -> None:
        self.ops: list[tuple[int, str, bytes, bytes | None]] = []
        self.guards: list[tuple[str, bytes, bytes | None]] = []
        self.chain = chain
        # What the batch means, told by its writer, for commit observers
        # (metrics): storage ignores them, and observers need parse no key.
        self.notes: list[object] | None = None

    def note(self, what: object) -> WriteBatch:
        """Attaches ``what`` for the commit observers; storage does not read it."""
        if self.notes is None:
            self.notes = [what]
        else:
            self.notes.append(what)
        return self

    def put(self, keyspace: str, key: bytes, value: bytes) -> WriteBatch:
        """Sets ``key`` to ``value`` in ``keyspace``.

        Raises:
            LimitExceeded: The key is longer than LMDB allows.
            ValueError: The key is empty.
        """
        if not key or len(key) > MAX_KEY_BYTES:  # the common case skips a call
            _check_key(key)
        self.ops.append((_PUT, keyspace, key, value))
        return self

    def delete(self, keyspace: str, key: bytes) -> WriteBatch:
        """Removes ``key`` (a no-op if it is absent)."""
        if not key or len(key) > MAX_KEY_BYTES:
            _check_key(key)
        self.ops.append((_DELETE, keyspace, key, None))
        return self

    def delete_prefix(self, keyspace: str, prefix: bytes) -> WriteBatch:
        """Removes every key that starts with ``prefix``."""
        self.ops.append((_DELETE_PREFIX, keyspace, prefix, None))
        return self

    def guard(self, keyspace: str, key: bytes, expected: bytes | None) -> WriteBatch:
        """Applies the batch only if ``key`` holds ``expected`` (None: absent)."""
        self.guards.append((keyspace, key, expected))
        return self

    def extend(self, other: WriteBatch) -> WriteBatch:
        """Appends the operations, guards and notes of ``other``."""
        self.ops.extend(other.ops)
        self.guards.extend(other.guards)
        if other.notes:
            for what in other.notes:
                self.note(what)
        return self

    def __len__(self) -> int:
        return len(self.ops)
