"""Docs that cannot drift: every `python launch.py ...` and `python -m ...` command shown in README.md and docs/
parses with the options the code has today. Argparse only: parsing stops the command before it runs anything."""
import argparse
import re
import runpy
import shlex
import sys

import pytest

from conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A python command up to the end of its shell command: a separator, a comment or a closing quote.
COMMAND = re.compile(r"(?:^|[\s;&|(])((?:[\w./~-]*/)?python(?:3(?:\.\d+)?)? +(?:launch\.py|-m +[\w.]+)[^;&|#'`\n]*)")
NOT_OURS = {"venv", "pip"}  # Python's own modules: nothing of ours to parse


def lines(text: str, first: int) -> list[tuple[int, str]]:
    """(line number, line) of a code block, a line ending in a backslash joined with the next."""
    out: list[tuple[int, str]] = []
    for i, line in enumerate(text.split("\n"), first):
        if out and out[-1][1].endswith("\\"):
            out[-1] = (out[-1][0], out[-1][1][:-1] + " " + line)
        else:
            out.append((i, line))
    return out


def commands() -> list[tuple[str, list[str]]]:
    """(where, argv) for every python command in the docs: in code blocks (fenced or indented), and in inline code
    spans, which may wrap in the prose."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        spans = []
        for block in re.finditer(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M):
            spans += lines(block.group(1), text.count("\n", 0, block.start(1)) + 1)
        prose = re.sub(r"^```.*?^```", lambda m: "\n" * m.group().count("\n"), text, flags=re.S | re.M)
        spans += [(i, line) for i, line in lines(prose, 1) if line.startswith("    ")]
        spans += [(prose.count("\n", 0, m.start()) + 1, m.group(1).replace("\n", " "))
                  for m in re.finditer(r"`([^`]+)`", prose)]
        for line, span in spans:
            for m in COMMAND.finditer(span):
                found.append((f"{doc.relative_to(ROOT)}:{line}", shlex.split(m.group(1))[1:]))
    return found


COMMANDS = commands()


class Parsed(Exception):
    """Raised in place of running: the command line parsed."""


@pytest.fixture
def parse_only(monkeypatch):
    parse_args = argparse.ArgumentParser.parse_args

    def parse(self, args=None, namespace=None):
        raise Parsed(parse_args(self, args, namespace))
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse)
    import aioice.ice  # `python -m web.loadtest serve` confines ICE to loopback before it parses: undone after
    monkeypatch.setattr(aioice.ice, "get_host_addresses", aioice.ice.get_host_addresses)


def test_the_docs_show_commands():
    assert len(COMMANDS) > 30 and all(argv for _, argv in COMMANDS)


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy on an imported module
@pytest.mark.parametrize("argv", [argv for _, argv in COMMANDS], ids=[where for where, _ in COMMANDS])
def test_a_command_in_the_docs_parses(argv, parse_only, monkeypatch, capsys):
    if argv[0] == "-m" and argv[1] in NOT_OURS:
        return
    if argv[:2] == ["-m", "pytest"]:  # the tests it names exist
        for arg in argv[2:]:
            assert arg.startswith("-") or (ROOT / arg.split("::")[0]).exists(), arg
        return
    monkeypatch.setattr(sys, "argv", [str(ROOT / "launch.py") if argv[0] == "launch.py" else argv[1], *argv[1:]]
                        if argv[0] == "launch.py" else [argv[1], *argv[2:]])
    with pytest.raises(Parsed):
        try:
            if argv[0] == "launch.py":
                runpy.run_path(str(ROOT / "launch.py"), run_name="__main__")
            else:
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        except SystemExit as e:
            pytest.fail(f"exit {e.code}: {capsys.readouterr().err.strip()}")
