"""Running a scenario in a fresh child process, with its peak RSS from the kernel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import asdict
from pathlib import Path

from actorflow.bench.progress import Progress
from actorflow.bench.scenarios import Options, Outcome

__all__ = ["run_isolated"]


def run_isolated(name: str, size: int, root: Path, progress: Progress, opts: Options) -> Outcome:
    """Runs scenario ``name`` in a new interpreter and returns its outcome.

    The child prints its outcome as one ``RESULT`` JSON line and its progress
    as ``PROGRESS`` lines on stderr. Its peak RSS (``peak_rss_mib``) is the
    high-water mark of its own address space, which it reports itself
    (``VmHWM``); where that is unavailable, the ``ru_maxrss`` that ``wait4``
    returns for it (which also counts the parent's pages at the fork). When
    the child reports ``n`` and ``rss_start_mib``, ``kib_per_instance`` is the
    peak growth over the start, per instance.

    Raises:
        RuntimeError: The child failed; the message ends with its stderr.
    """
    cmd = [
        sys.executable,
        "-m",
        "actorflow.bench.child",
        name,
        str(size),
        str(root),
        json.dumps(asdict(opts)),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    errors: list[str] = []

    def relay() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            parts = line.rstrip("\n").split(" ", 3)
            if parts[0] == "PROGRESS" and parts[1] == "phase" and len(parts) == 4:
                progress.phase(parts[3], int(parts[2]))
            elif parts[0] == "PROGRESS" and parts[1] == "update":
                progress.update(int(parts[2]))
            else:
                errors.append(line)

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    assert proc.stdout is not None
    try:
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:  # interrupted: leave no child behind
        proc.kill()
        proc.wait()
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join()
    proc.stdout.close()
    assert proc.stderr is not None
    proc.stderr.close()
    result = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not result:
        tail = "".join(errors[-20:])
        raise RuntimeError(f"scenario {name!r} failed (exit {proc.returncode}):\n{tail}")
    data = json.loads(result[-1][len("RESULT ") :])
    outcome = Outcome(data["figures"], data["samples"])
    if "peak_rss_mib" not in outcome.figures:
        outcome.figures["peak_rss_mib"] = usage.ru_maxrss / (
            2**20 if sys.platform == "darwin" else 1024
        )
    peak = outcome.figures["peak_rss_mib"]
    n, start = outcome.figures.get("n"), outcome.figures.get("rss_start_mib")
    if n and start is not None:
        outcome.figures["kib_per_instance"] = max(0.0, peak - start) * 1024 / n
    return outcome
