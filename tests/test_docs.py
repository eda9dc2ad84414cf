"""Every complete Python example in README.md and docs/*.md runs.

Each fenced ``python`` block is written to a file in a fresh temporary
directory and run there in its own interpreter, with a timeout, so relative
data directories land in the temporary directory and nothing an example
leaves behind (threads, open environments) reaches the next one.

A block preceded, on the line right before its fence, by the HTML comment
``<!-- no-test -->`` is not run (signature listings and fragments). One
preceded by ``<!-- requires: MODULE -->`` runs only where MODULE is installed
(examples of optional extras such as ``ray``); elsewhere it is skipped.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
SOURCES = [ROOT / "README.md", *DOCS]
SKIP_MARK = "<!-- no-test -->"
REQUIRES = re.compile(r"^<!-- requires: (?P<module>[\w.]+) -->$")
TIMEOUT_S = 60
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)[ \t]*(?P<info>[^\n`]*)$")
LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")


class Block:
    """One fenced code block of a Markdown file."""

    def __init__(
        self, path: Path, line: int, info: str, code: str, skipped: bool, requires: str = ""
    ) -> None:
        self.path = path
        self.line = line
        self.info = info
        self.code = code
        self.skipped = skipped
        self.requires = requires

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """Returns the fenced code blocks of a Markdown file, in order."""
    lines = path.read_text().splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        fence, indent, start = m.group("fence"), len(m.group("indent")), i
        body: list[str] = []
        i += 1
        while i < len(lines) and not (
            lines[i].strip().startswith(fence) and lines[i].strip().strip(fence[0]) == ""
        ):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        i += 1  # the closing fence
        skipped = start > 0 and lines[start - 1].strip() == SKIP_MARK
        req = REQUIRES.match(lines[start - 1].strip()) if start > 0 else None
        info = m.group("info").strip().split()
        out.append(
            Block(
                path,
                start + 1,
                info[0] if info else "",
                "\n".join(body) + "\n",
                skipped,
                req.group("module") if req else "",
            )
        )
    return out


ALL = [b for p in SOURCES if p.exists() for b in blocks(p)]
PYTHON = [b for b in ALL if b.info in ("python", "py")]


def test_the_docs_exist() -> None:
    names = {p.name for p in DOCS}
    expected = {
        "index.md",
        "quickstart.md",
        "concepts.md",
        "contract.md",
        "limits.md",
        "testing.md",
        "design.md",
        "benchmarks.md",
    }
    assert expected <= names, sorted(expected - names)
    assert (ROOT / "README.md").exists()


def test_extraction_honours_the_no_test_mark(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "Text.\n\n```python\nprint(1)\n```\n\n"
        "<!-- no-test -->\n```python\ndef f(x: int) -> int\n```\n\n"
        "- item\n\n  ```python\n  x = 1\n  ```\n\n```sh\nmake test\n```\n"
    )
    found = blocks(page)
    assert [(b.info, b.skipped, b.code) for b in found] == [
        ("python", False, "print(1)\n"),
        ("python", True, "def f(x: int) -> int\n"),
        ("python", False, "x = 1\n"),
        ("sh", False, "make test\n"),
    ]


def test_most_examples_are_run() -> None:
    runnable = [b for b in PYTHON if not b.skipped]
    assert len(runnable) >= 20, [b.id for b in runnable]
    assert len(runnable) > 2 * (len(PYTHON) - len(runnable))


def anchors(path: Path) -> set[str]:
    """Returns the heading anchors of a Markdown file, as mkdocs makes them."""
    out = set()
    in_code = False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", title)).strip("-"))
    return out


def test_relative_links_resolve() -> None:
    broken = []
    for path in SOURCES:
        for m in LINK.finditer(path.read_text()):
            target = m.group("target")
            if re.match(r"^[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            dest = path.parent / file if file else path
            if not dest.exists() or (anchor and anchor not in anchors(dest)):
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, broken


def run_block(block: Block, where: Path) -> None:
    """Runs ``block`` in its own interpreter with ``where`` as its working directory."""
    script = where / "example.py"
    script.write_text(block.code)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    try:
        proc = subprocess.run(
            [sys.executable, str(script)],
            cwd=where,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(
            f"{block.id}: did not finish within {TIMEOUT_S} s\n"
            f"--- stdout\n{e.stdout}\n--- stderr\n{e.stderr}"
        )
    assert proc.returncode == 0, (
        f"{block.id} failed (exit {proc.returncode})\n--- stdout\n{proc.stdout[-3000:]}"
        f"\n--- stderr\n{proc.stderr[-3000:]}"
    )


@pytest.mark.parametrize("block", [b for b in PYTHON if not b.skipped], ids=lambda b: b.id)
def test_example_runs(block: Block, tmp_path: Path) -> None:
    if block.requires:
        pytest.importorskip(block.requires)
    run_block(block, tmp_path)


def test_the_quickstart_runs_twice_in_a_row_on_one_directory(tmp_path: Path) -> None:
    # A reader runs the snippets one after the other in one directory, then again:
    # they share ./actorflow-data, and none may trip over what an earlier run left.
    snippets = [b for b in PYTHON if b.path.name == "quickstart.md" and not b.skipped]
    assert len(snippets) >= 5
    for _ in range(2):
        for block in snippets:
            run_block(block, tmp_path)
    assert (tmp_path / "actorflow-data").is_dir()
