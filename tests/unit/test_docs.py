"""What a user reads matches what is there: every command has --help and a README entry, and
every path docs/design.md and the README's Layout name exists."""

import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cli.main import app

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
runner = CliRunner()


def commands(group=None, prefix=()):
    group = group or typer.main.get_command(app)
    for name, cmd in sorted(group.commands.items()):
        if hasattr(cmd, "commands"):
            yield from commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name)


ALL = list(commands())


def test_the_commands_are_found():
    assert ("run",) in ALL and ("query", "beta") in ALL and ("serve",) in ALL and len(ALL) >= 14


@pytest.mark.parametrize("path", ALL, ids=" ".join)
def test_every_command_has_help(path):
    result = runner.invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and len(result.output.strip().splitlines()) > 3


@pytest.mark.parametrize("path", ALL, ids=" ".join)
def test_every_command_has_a_readme_entry(path):
    assert re.search(rf"`specdb {' '.join(path)}[ `]", README), f"README's Commands table lacks `specdb {' '.join(path)}`"


def named_paths(text: str) -> set[str]:
    """Repository paths a document names in backticks (`spectraldb/store/write.py`, `contract/`)."""
    found = set()
    for token in re.findall(r"`([^`\s]+)`", text):
        token = token.rstrip(".,:;")
        if re.fullmatch(r"(contract|spectraldb|workers|cli|tests|benchmarks|examples|docs)/[\w./-]*", token):
            found.add(token)
    return found


@pytest.mark.parametrize("doc", ["docs/design.md", "README.md"])
def test_every_path_a_document_names_exists(doc):
    names = named_paths((ROOT / doc).read_text(encoding="utf-8"))
    assert names, doc
    assert sorted(n for n in names if not (ROOT / n).exists()) == []


def test_the_path_finder_would_see_a_missing_file():
    assert named_paths("see `spectraldb/nothing.py` and `contract/`") == {"spectraldb/nothing.py", "contract/"}
