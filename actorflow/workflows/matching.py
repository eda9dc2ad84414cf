"""How a replay of ``run`` meets the steps an instance recorded.

One set of rules, used by the engine (each activation replays ``run``) and by
:func:`actorflow.workflows.replay.replay_check` (a replay that runs no step
body):

- A step call is keyed by its kind, its name and the occurrence number of that
  (kind, name) in the run: :meth:`StepMatcher.count`. The stored record of that
  key, if any, is the call's result.
- Positions: the recorded steps, in the order they started (their ``seq``),
  are positions 0, 1, ...; every step call of a replay takes the next
  position. A call from the run's own flow (the task of an ``async def run``,
  the thread of a plain ``def run``) is *sequential*: its position is the same
  on every replay, and the recorded step there must be the same (kind, name,
  count), else the code has diverged. Calls from concurrent branches
  (``step.map``, ``step.parallel``, ``asyncio.gather``, tasks and threads of
  ``run``) start in an order that depends on timing: they are compared as a
  set, at the next sequential call, with the recorded steps between the two
  sequential positions.
- ``step.patched(id)``: the first time an instance reaches the call, it
  answers False if some recorded step has not been met yet by this replay
  (the instance started on older code and the recording goes past this
  point), else True (:meth:`StepMatcher.unreached`). The answer is then
  recorded (a step record of kind :data:`PATCH_KIND`) and given back on every
  later replay.

Only ``do``, ``sleep`` and ``wait_for_event`` steps take positions: rollback
handlers run after ``run`` and patch markers are not steps.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["ORDERED_KINDS", "PATCH_KIND", "Divergence", "StepMatcher", "StepRef"]

#: The kind of the record that keeps the answer of ``step.patched(patch_id)``
#: (its name is the patch id, its count 1).
PATCH_KIND = "patch"
#: The kinds of step that take a position in the run.
ORDERED_KINDS = frozenset({"do", "sleep", "wait_for_event"})

#: A step call or record: ``(kind, name, count)``.
StepRef = tuple[str, str, int]


@dataclass(frozen=True)
class Divergence:
    """Where a replay met another step than the one recorded at that position.

    ``expected`` is the recorded step there (None: the recording has none),
    ``found`` the one the code calls now (None: ``run`` ended there). For the
    steps of concurrent branches, compared as a set, both are sorted lists of
    steps and ``concurrent`` is True.
    """

    position: int
    expected: StepRef | list[StepRef] | None
    found: StepRef | list[StepRef] | None
    concurrent: bool = False

    @property
    def step(self) -> str | None:
        """The name of the step the code calls there (None: none)."""
        f = self.found
        if isinstance(f, list):
            return f[0][1] if f else None
        return f[1] if f is not None else None

    def record(self) -> dict[str, Any]:
        """The form kept in the step record (``dv``), plain data."""
        return {
            "pos": self.position,
            "exp": _plain(self.expected),
            "got": _plain(self.found),
            "conc": self.concurrent,
        }

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Divergence:
        """The divergence a step record keeps (see :meth:`record`)."""
        return cls(rec["pos"], _ref(rec["exp"]), _ref(rec["got"]), bool(rec.get("conc")))

    def document(self) -> dict[str, Any]:
        """The JSON form shown by ``steps()``, the CLI, the HTTP API and reports."""
        return {
            "position": self.position,
            "expected": _doc(self.expected),
            "found": _doc(self.found),
            "concurrent": self.concurrent,
        }

    def describe(self) -> str:
        """One line: ``position 3: expected do 'a' (1), found sleep 'b' (1)``."""
        return (
            f"position {self.position}: expected {_text(self.expected)}, found {_text(self.found)}"
        )


def _plain(ref: StepRef | list[StepRef] | None) -> Any:
    if ref is None:
        return None
    if isinstance(ref, list):
        return [list(r) for r in ref]
    return list(ref)


def _ref(data: Any) -> StepRef | list[StepRef] | None:
    if data is None:
        return None
    if data and isinstance(data[0], list | tuple):
        return [(str(k), str(n), int(c)) for k, n, c in data]
    if not data:
        return []
    k, n, c = data
    return (str(k), str(n), int(c))


def _doc(ref: StepRef | list[StepRef] | None) -> Any:
    if ref is None:
        return None
    if isinstance(ref, list):
        return [{"kind": k, "name": n, "count": c} for k, n, c in ref]
    return {"kind": ref[0], "name": ref[1], "count": ref[2]}


def _text(ref: StepRef | list[StepRef] | None) -> str:
    if ref is None:
        return "nothing (the end)"
    if isinstance(ref, list):
        return "{" + ", ".join(_text(r) for r in ref) + "}"
    return f"{ref[0]} {ref[1]!r} ({ref[2]})"


class StepMatcher:
    """The keys and positions of one replay of ``run`` (see the module's docstring).

    Args:
        recorded: ``(seq, kind, name, count)`` of every step record the
            instance had when the replay began (any kind: only the ordered
            ones take positions).
    """

    __slots__ = ("_block", "_block_start", "_order", "counters", "n", "pos")

    def __init__(self, recorded: Iterable[tuple[int, str, str, int]] = ()) -> None:
        self.counters: dict[tuple[str, str], int] = {}
        rows = sorted(r for r in recorded if r[1] in ORDERED_KINDS)
        self._order: list[StepRef] = [(k, n, c) for _s, k, n, c in rows]
        #: How many recorded positions are left to compare (0: nothing to follow).
        self.n = len(self._order)
        self.pos = 0
        self._block: list[StepRef] = []
        self._block_start = 0

    def count(self, kind: str, name: str) -> int:
        """Takes the next occurrence number of ``(kind, name)`` (1-based)."""
        ck = (kind, name)
        c = self.counters.get(ck, 0) + 1
        self.counters[ck] = c
        return c

    def follow(self, ref: StepRef, sequential: bool) -> Divergence | None:
        """Compares step call ``ref`` with the recording; its position is the next one.

        Called only while :attr:`pos` < :attr:`n` (after the recording,
        nothing is compared). After the first divergence nothing more is
        compared either: the positions after it say nothing new.
        """
        p = self.pos
        self.pos = p + 1
        if not sequential:
            self._block.append(ref)
            return None
        dv = self._close_block(p)
        if dv is None and self._order[p] != ref:
            dv = Divergence(p, self._order[p], ref)
        if dv is not None:
            self.n = 0
        return dv

    def _close_block(self, p: int) -> Divergence | None:
        """Compares the concurrent calls since the last sequential one with the recording."""
        start, block = self._block_start, self._block
        self._block_start, self._block = p + 1, []
        if start >= p:
            return None
        want = sorted(self._order[start:p])
        got = sorted(block)
        if want != got:
            return Divergence(start, want, got, concurrent=True)
        return None

    def finish(self) -> Divergence | None:
        """At the end of ``run``: a divergence if recorded steps were never met."""
        if self.pos < self.n:
            p = self.pos
            dv = self._close_block(p)
            if dv is not None:
                return dv
            return Divergence(p, self._order[p], None)
        if self.n and self._block:
            return self._close_block(self.n)
        return None

    def unreached(self, records: Iterable[StepRef]) -> bool:
        """True if a recorded ordered step has not been met by this replay yet.

        ``records`` are the instance's step records; those this replay made
        itself count as met.
        """
        counters = self.counters
        return any(c > counters.get((k, n), 0) for k, n, c in records if k in ORDERED_KINDS)
