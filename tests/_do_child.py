"""Child process of test_objects_durability: an endless stream of Durable Object calls.

Each call writes two keys of its object in one batch (a counter and a log entry
numbered by it) and returns the new count. The child prints ``<object> <count>
<token>`` for every call whose result it received, flushing each line, until
it is killed.

Usage: python _do_child.py DATA_DIR OBJECTS
"""

from __future__ import annotations

import sys
from collections import deque
from typing import Any

import actorflow as af


class Ledger(af.DurableObject):
    def record(self, token: int) -> int:
        n: int = self.ctx.storage.get("count", 0) + 1
        self.ctx.storage.put({"count": n, f"entry:{n:08d}": token})
        return n


def main() -> None:
    data_dir, objects = sys.argv[1], int(sys.argv[2])
    with af.Runtime(data_dir) as rt:
        ns = rt.durable_objects(Ledger, name="ledger")
        stubs = [ns.get_by_name(f"o{i}") for i in range(objects)]
        print("ready", flush=True)
        inflight: deque[tuple[int, int, Any]] = deque()
        token = 0
        while True:
            # Keep many calls in flight, so replies ride on pipelined commits.
            while len(inflight) < 64:
                obj = token % objects
                inflight.append((obj, token, stubs[obj].record.future(token)))
                token += 1
            obj, tok, future = inflight.popleft()
            n = future.get(timeout=30)
            sys.stdout.write(f"{obj} {n} {tok}\n")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
