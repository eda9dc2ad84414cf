"""Entry point of the child processes the benchmark starts.

python -m actorflow.bench.child SCENARIO SIZE ROOT OPTIONS_JSON
python -m actorflow.bench.child recovery-worker DATA_DIR JOURNAL N
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from actorflow.bench.progress import ChildProgress
from actorflow.bench.scenarios import (
    SCENARIOS,
    Options,
    peak_rss_since_exec_mib,
    recovery_worker,
)

__all__ = ["main", "peak_rss_since_exec_mib"]


def main(argv: list[str]) -> int:
    """Runs one scenario and prints its outcome as a ``RESULT`` JSON line."""
    if argv[0] == "recovery-worker":
        recovery_worker(argv[1], argv[2], int(argv[3]))
        return 0
    name, size, root = argv[0], int(argv[1]), Path(argv[2])
    opts = Options(**json.loads(argv[3]))
    outcome = SCENARIOS[name].run(root, size, ChildProgress(), opts)
    hwm = peak_rss_since_exec_mib()
    if hwm is not None:
        outcome.figures["peak_rss_mib"] = hwm
    print("RESULT " + json.dumps(asdict(outcome)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
