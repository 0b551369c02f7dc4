"""The documentation runs, and keeps up with the public API.

Conventions for ``docs/*.md`` (any file there, whoever wrote it):

* A fenced block opened with exactly ```` ```python ```` is executed. The blocks of one file
  run in order, in one fresh namespace shared by that file only, with the working directory
  set to a temporary directory (write files freely) and ``torch.manual_seed(0)`` done first.
  Each file is its own test case, so a failing page names itself; a traceback points at the
  line of the ``.md`` file.
* A block opened with ```` ```python no-run ```` (any info string after ``python``) is shown
  but not executed: use it for fragments that cannot run on their own (a simulator the
  reader supplies, a GPU, a cluster).
* Blocks in other languages (``bash``, ``toml``, plain ```` ``` ````) are never executed.
* Blocks should assert something real and run in a few seconds on a CPU.

A second test checks that every name in ``enkal.__all__`` appears as code (inside inline
backticks or a fenced block) in the glossary, the derivations or the quickstart, so a new
public name cannot land undocumented; :data:`UNDOCUMENTED_OK` lists the exceptions, each with
its reason.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import enkal

DOCS = Path(__file__).resolve().parent.parent / "docs"
DOC_FILES = sorted(DOCS.glob("*.md"))
API_DOCS = ("glossary.md", "updates.md", "quickstart.md", "schema.md", "scaling.md")

# Public names that need not appear in API_DOCS, with the reason. Keep it short.
UNDOCUMENTED_OK: dict[str, str] = {
    # (empty: every public name is documented; add "name": "why" here only with a reason,
    # e.g. a storage name that docs/schema.md documents instead)
}

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^\n`]*)$")


def _scan(text: str) -> tuple[list[tuple[str, int, str]], list[str]]:
    """Split Markdown into fenced blocks ``(info, first_line, source)`` and prose lines.

    ``first_line`` is the 1-based line of the block's first source line. A block closes at a
    line of the same fence character at least as long as the opening fence (CommonMark).
    """
    blocks, prose = [], []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            prose.append(lines[i])
            i += 1
            continue
        fence, info = m.group("fence"), m.group("info").strip()
        body, j = [], i + 1
        while j < len(lines):
            close = lines[j].strip()
            if len(close) >= len(fence) and set(close) == {fence[0]}:
                break
            body.append(lines[j])
            j += 1
        blocks.append((info, i + 2, "\n".join(body)))
        i = j + 1
    return blocks, prose


def code_blocks(text: str) -> list[tuple[str, int, str]]:
    """``(info, first_line, source)`` of every fenced block."""
    return _scan(text)[0]


def runnable_blocks(text: str) -> list[tuple[int, str]]:
    """The ```` ```python ```` blocks (not ``python no-run``) as ``(first_line, source)``."""
    return [(line, src) for info, line, src in code_blocks(text) if info == "python"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("path", DOC_FILES, ids=[p.name for p in DOC_FILES])
def test_doc_examples_run(path: Path, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs.{path.stem}"}
    with torch.random.fork_rng(devices=[]):  # the global seed is restored afterwards
        torch.manual_seed(0)
        for first_line, source in runnable_blocks(path.read_text(encoding="utf-8")):
            # pad with newlines so tracebacks show the line numbers of the .md file
            code = compile("\n" * (first_line - 1) + source, str(path), "exec")
            exec(code, namespace)  # noqa: S102 - executing our own documentation is the point


def _code_text(text: str) -> str:
    """All fenced blocks and inline code spans of a Markdown text, joined."""
    blocks, prose = _scan(text)
    inline = re.findall(r"(`+)(.+?)\1", "\n".join(prose), flags=re.S)
    return "\n".join([src for _, _, src in blocks] + [span for _, span in inline])


def test_every_public_name_is_documented() -> None:
    code = "\n".join(_code_text((DOCS / name).read_text(encoding="utf-8"))
                     for name in API_DOCS)
    missing = [name for name in enkal.__all__
               if name not in UNDOCUMENTED_OK
               and not re.search(rf"(?<!\w){re.escape(name)}(?!\w)", code)]
    assert not missing, (
        f"public names not mentioned as code in docs/{{{','.join(API_DOCS)}}}: {missing}; "
        "document them (e.g. a glossary row) or add them to UNDOCUMENTED_OK with a reason"
    )
    stale = sorted(set(UNDOCUMENTED_OK) - set(enkal.__all__))
    assert not stale, f"UNDOCUMENTED_OK lists names that are no longer public: {stale}"


def test_code_block_extraction() -> None:
    text = "\n".join([
        "# t", "```python", "a = 1", "```", "```python no-run", "b = 2", "```",
        "````python", "```", "c = 3", "````", "```bash", "ls", "```",
    ])
    assert code_blocks(text) == [("python", 3, "a = 1"), ("python no-run", 6, "b = 2"),
                                 ("python", 9, "```\nc = 3"), ("bash", 13, "ls")]
    assert runnable_blocks(text) == [(3, "a = 1"), (9, "```\nc = 3")]
