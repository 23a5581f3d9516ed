"""The user guide (mkdocs.yml + docs/) builds without a single warning, has a page for every command, and shows
only options the commands accept: every `--flag` of a `cybertron CMD ...` line in the guide's code must appear
in `cybertron CMD --help` (which lists every config key, every shortcut and the launcher flags)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from cybertron.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
FENCE = re.compile(r"^\s*```")
INLINE = re.compile(r"`(cybertron [^`]*)`")
FLAG = re.compile(r"--[A-Za-z][\w.-]*")


def _nav_pages(nav: object) -> list[str]:
    """Every page file named in mkdocs.yml's nav, however deeply nested."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [page for item in nav for page in _nav_pages(item)]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in _nav_pages(value)]
    return []


def _command_lines(text: str) -> list[str]:
    """Shell lines of the page's fenced code blocks (continuations joined) and its inline `cybertron ...` code."""
    lines, in_block, pending = [], False, ""
    for line in text.splitlines():
        if FENCE.match(line):
            in_block, pending = not in_block, ""
            continue
        if not in_block:
            lines += INLINE.findall(line)
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    return lines


def _invocations(line: str) -> list[tuple[str, list[str]]]:
    """(command, its arguments) for the cybertron call on a shell line, if any: `cybertron CMD ...`,
    `torchrun ... -m cybertron CMD ...`; `cybertron --steps 10` is train, as in cli.py."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:  # not shell (Python, TOML, JSON in a block): no cybertron call on it
        return []
    if "cybertron" not in words:
        return []
    rest = words[words.index("cybertron") + 1:]
    if rest[:1] in (["-h"], ["--help"]):
        return []
    if not rest or rest[0].startswith("-"):
        return [("train", rest)]
    return [(rest[0], rest[1:])]


def _doc_invocations() -> list[tuple[str, str, list[str]]]:
    found = []
    for page in sorted(DOCS.rglob("*.md")):
        for line in _command_lines(page.read_text()):
            for command, args in _invocations(line):
                found.append((str(page.relative_to(ROOT)), command, args))
    return found


def _help_flags(command: str, capsys: pytest.CaptureFixture[str]) -> set[str]:
    assert main([command, "--help"]) == 0
    return set(FLAG.findall(capsys.readouterr().out)) | {"--help", "--config"}


def test_docs_build_strict(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                             "-d", str(tmp_path / "site")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "commands" / "train" / "index.html").is_file()


def test_every_command_has_a_page_in_nav() -> None:
    yaml = pytest.importorskip("yaml")
    pages = _nav_pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"])
    missing = [name for name in COMMANDS if f"commands/{name}.md" not in pages]
    assert not missing, f"commands without a page in mkdocs.yml's nav (add docs/commands/NAME.md): {missing}"
    assert all((DOCS / page).is_file() for page in pages)


def test_invocation_parser_reads_the_forms_the_docs_use() -> None:
    text = "```bash\ncybertron train --nproc 4 \\\n    --parallel.tp 2   # a comment --not-a-flag\n```\n" \
           "`cybertron export --merge` and ```torchrun --nproc-per-node 2 -m cybertron serve --tp 2```"
    calls = [_invocations(line) for line in _command_lines(text)]
    assert [c for c in calls if c] == [[("train", ["--nproc", "4", "--parallel.tp", "2"])],
                                       [("export", ["--merge"])]]


def test_docs_use_only_flags_the_commands_accept(capsys: pytest.CaptureFixture[str]) -> None:
    invocations = _doc_invocations()
    assert len(invocations) > 50 and {command for _, command, _ in invocations} >= {"train", "serve", "align"}
    unknown_commands = sorted({(page, command) for page, command, _ in invocations
                               if command not in COMMANDS and not command.startswith("<")})
    assert not unknown_commands, f"`cybertron CMD` with a command cli.py does not have: {unknown_commands}"
    accepted = {name: _help_flags(name, capsys) for name in COMMANDS}
    bad = sorted({(page, command, flag) for page, command, args in invocations if command in COMMANDS
                  for flag in (arg.split("=", 1)[0] for arg in args if arg.startswith("--"))
                  if flag not in accepted[command]})
    assert not bad, f"flags in docs/ that `cybertron CMD --help` does not list: {bad}"
