"""Every code block of README.md and tutorials/README.md runs as written (so they cannot drift).

A file's blocks run top to bottom in one namespace, as a newcomer pasting them into one fresh
notebook would run them, in a temporary working directory; ``bash`` blocks run in a shell
there. An HTML comment right above a fence says what a block needs::

    <!-- readme-test: devinterp=2 -->      only with devinterp 2.x installed (the other major skips it)
    <!-- readme-test: needs=wordnet -->    needs WordNet 3.0 files (Debian's wordnet-base); needs=MODULE:
                                           an optional extra's module (e.g. torchvision)
    <!-- readme-test: skip=REASON -->      not run (needs ImageNet, installs, hours of CPU); a python
                                           block's imports still run, a bash block's
                                           ``python -m module --flags`` are checked against --help

A block of the other devinterp major is skipped, and so later blocks must not depend on it.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import pytest

from conftest import devinterp_major

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ("README.md", "tutorials/README.md")
_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
_DIRECTIVE = re.compile(r"<!--\s*readme-test:\s*(.*?)\s*-->\s*$")


@dataclass
class Block:
    document: str
    line: int
    language: str
    code: str
    options: Dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.document}:{self.line}"


def blocks_of(document: str) -> List[Block]:
    """The fenced code blocks of ``document`` with the directive right above each (if any)."""
    text = (ROOT / document).read_text()
    found = []
    for match in _FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        options = {}
        directive = _DIRECTIVE.search(before)
        if directive:
            for part in directive.group(1).split(";"):
                key, _, value = part.strip().partition("=")
                options[key.strip()] = value.strip()
        found.append(Block(document, line, match.group(1) or "text", match.group(2), options))
    return found


def test_directives_are_known_and_every_block_is_python_or_bash():
    for document in DOCUMENTS:
        for block in blocks_of(document):
            assert set(block.options) <= {"devinterp", "needs", "skip"}, (block.name, block.options)
            if block.language not in ("python", "bash"):
                assert block.language == "text" and "skip" not in block.options, (
                    f"{block.name}: fence it as python or bash (or leave a layout/text block unlabelled)")


def _why_not_run(block: Block) -> str:
    if "skip" in block.options:
        return block.options["skip"] or "marked skip"
    major = block.options.get("devinterp")
    if major and devinterp_major() != int(major):
        return f"needs devinterp {major}.x"
    for need in filter(None, block.options.get("needs", "").split(",")):
        if need == "wordnet":
            if not Path("/usr/share/wordnet").is_dir():
                if os.environ.get("LOSSKERNEL_REQUIRE_WORDNET"):
                    pytest.fail(f"{block.name} needs WordNet and LOSSKERNEL_REQUIRE_WORDNET is set")
                return "needs WordNet (apt-get install wordnet-base)"
        elif importlib.util.find_spec(need) is None:  # an optional extra, e.g. torchvision
            return f"needs {need}"
    return ""


def _check_skipped(block: Block, env: dict, cwd: Path) -> None:
    """A block that is not run still may not drift: its imports run, its CLI flags exist."""
    if block.language == "python":
        tree = ast.parse(block.code, filename=block.name)
        imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
        exec(compile(ast.Module(body=imports, type_ignores=[]), block.name, "exec"), {})
    elif block.language == "bash":
        for command in re.findall(r"python -m ([\w.]+)((?:\\\n|[^\n;&|])*)", block.code):
            module, rest = command[0], command[1].replace("\\\n", " ")
            words = shlex.split(rest)
            sub = [words[0]] if words and not words[0].startswith("-") and "/" not in words[0] else []
            help_text = subprocess.run([sys.executable, "-m", module, *sub, "--help"], env=env, cwd=cwd,
                                       capture_output=True, text=True, timeout=300)
            assert help_text.returncode == 0, (block.name, module, help_text.stderr[-2000:])
            for flag in {w.split("=")[0] for w in words if w.startswith("--")}:
                assert flag in help_text.stdout, f"{block.name}: `python -m {module}` has no option {flag}"


@pytest.mark.parametrize("document", DOCUMENTS)
def test_code_blocks_run_as_written(document, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               MPLBACKEND="Agg", LOSSKERNEL_PROGRESS="0")
    monkeypatch.setenv("LOSSKERNEL_PROGRESS", "0")
    namespace = {"__name__": "__readme__"}
    ran = 0
    for block in blocks_of(document):
        if block.language not in ("python", "bash"):
            continue
        reason = _why_not_run(block)
        if reason:
            unskipped = Block(**{**block.__dict__, "options": {k: v for k, v in block.options.items() if k != "skip"}})
            if "skip" in block.options and not _why_not_run(unskipped):  # its imports and flags still checked
                _check_skipped(block, env, tmp_path)
            continue
        if block.language == "python":
            try:
                exec(compile(block.code, block.name, "exec"), namespace)
            except Exception as error:  # name the block, keep the traceback
                raise AssertionError(f"{block.name} failed: {type(error).__name__}: {error}") from error
        else:
            done = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, f"{block.name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        ran += 1
    assert ran or document != "README.md", "no README block ran"
