"""The docs are tested: their code runs, their links and file paths exist.

Conventions for fenced code blocks in README.md, docs/*.md and every level's README:

* ```` ```python ```` — run as a script in a fresh interpreter (in a temporary folder, with
  ``EDA_DATA_DIR`` there); it must exit 0 within the timeout.
* ```` ```python fragment ```` — part of a larger picture: only compiled (syntax checked).
* ```` ```bash run ```` — a shell session marked runnable: run with ``bash -euo pipefail`` from
  the repository root, bounded; must exit 0. Other ``bash``/``sh``/``console`` blocks are
  instructions (starting servers, long-running workers) and are not run, but every repository
  path they mention must exist.

Every relative Markdown link must point at a file or folder that exists, and every path written
in backticks that looks like a repository file (``level_1_basic/demo_basic.py``) must exist.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted(
    {
        ROOT / "README.md",
        *ROOT.glob("docs/*.md"),
        *ROOT.glob("level_*/**/README*.md"),
        *ROOT.glob("examples/*.md"),
    }
)
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```\s*$", re.S | re.M)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
PATH_IN_TICKS = re.compile(
    r"`((?:[\w.-]+/)+[\w.-]+\.(?:py|md|yml|yaml|sh|txt|toml|cfg|example)|[\w-]+/Dockerfile)`"
)
REPO_TOP = {
    p.name
    for p in ROOT.iterdir()
    if not p.name.startswith(".") or p.name in (".ci", ".env.example")
}


@dataclass
class Block:
    doc: Path
    line: int
    info: str
    code: str

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def blocks() -> list[Block]:
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append(Block(doc, line, match.group(1).strip(), match.group(2)))
    return found


ALL_BLOCKS = blocks()
PYTHON = [b for b in ALL_BLOCKS if b.info.split()[:1] == ["python"]]
SHELL_RUN = [b for b in ALL_BLOCKS if b.info.split() == ["bash", "run"]]


def test_there_are_docs_to_test() -> None:
    assert ROOT / "README.md" in DOCS
    assert PYTHON, "no python blocks found: is the fence pattern right?"


@pytest.mark.parametrize("block", PYTHON, ids=lambda b: b.id)
def test_python_blocks_run(block: Block, tmp_path: Path) -> None:
    if "fragment" in block.info.split():
        compile(block.code, block.id, "exec")
        return
    script = tmp_path / "snippet.py"
    script.write_text(block.code)
    env = dict(os.environ, EDA_DATA_DIR=str(tmp_path / "data"))
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"{block.id} failed:\n{proc.stdout}\n{proc.stderr}"


@pytest.mark.parametrize("block", SHELL_RUN, ids=lambda b: b.id)
def test_runnable_shell_blocks_run(block: Block, tmp_path: Path) -> None:
    env = dict(os.environ, EDA_DATA_DIR=str(tmp_path / "data"))
    bindir = str(Path(sys.executable).parent)  # `python` is this venv's interpreter
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block.code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"{block.id} failed:\n{proc.stdout}\n{proc.stderr}"


def _outside_code(text: str) -> str:
    return FENCE.sub("", text)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_exist(doc: Path) -> None:
    missing = []
    for target in LINK.findall(_outside_code(doc.read_text())):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # external URL or an anchor in the same page
        path = target.split("#", 1)[0]
        if path and not (doc.parent / path).exists():
            missing.append(target)
    assert not missing, f"{doc.relative_to(ROOT)} links to missing files: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_paths_written_in_the_docs_exist(doc: Path) -> None:
    missing = []
    for path in set(PATH_IN_TICKS.findall(doc.read_text())):
        if path.split("/", 1)[0] not in REPO_TOP:
            continue  # not a repository path (e.g. /etc/..., site-packages/...)
        if not (ROOT / path).exists() and not (doc.parent / path).exists():
            missing.append(path)
    assert not missing, f"{doc.relative_to(ROOT)} mentions missing files: {sorted(missing)}"
