"""Every relative link of the repository's Markdown points at a file the repository tracks.

A clone holds exactly the tracked files, so a link to an untracked, ignored or outside file is
broken for every reader of the clone.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[2]

# [text](target) and [text](target "title"); images too. Reference definitions: [name]: target
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def tracked_files() -> set[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    return {name for name in out.split("\0") if name}


def relative_links(text: str) -> list[str]:
    """The link targets of a Markdown text that are neither URLs nor in-page anchors."""
    text = CODE_SPAN.sub("", FENCE.sub("", text))
    targets = INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text)
    return [t for t in targets if not urlsplit(t).scheme and not t.startswith(("#", "//"))]


def broken_links(doc: str, text: str, files: set[str]) -> list[str]:
    """Targets of ``doc`` (a tracked path) that leave the repository or are not tracked files."""
    broken = []
    for target in relative_links(text):
        path = unquote(urlsplit(target).path)
        resolved = (ROOT / doc).parent.joinpath(path).resolve()
        if not resolved.is_relative_to(ROOT):
            broken.append(target)
            continue
        relative = resolved.relative_to(ROOT).as_posix()
        is_tracked_dir = any(name.startswith(relative + "/") for name in files)
        if relative not in files and not is_tracked_dir:
            broken.append(target)
    return broken


def test_relative_links_point_at_tracked_files() -> None:
    files = tracked_files()
    docs = sorted(name for name in files if name.endswith(".md"))
    assert "README.md" in docs and "docs/API.md" in docs
    broken = {doc: found for doc in docs if (found := broken_links(doc, (ROOT / doc).read_text(), files))}
    assert broken == {}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("see [API.md](../shared/API.md)", ["../shared/API.md"]),
        ("see [gone](docs/missing.md#part)", ["docs/missing.md#part"]),
        ("an ignored file [settings](local.settings.json)", ["local.settings.json"]),
        ("![plot](bench/results/nothing.png)", ["bench/results/nothing.png"]),
        ("[ref]: ../outside.md", ["../outside.md"]),
        ("fine: [API](docs/API.md), [site](https://example.com), [top](#layout), [dir](recsys/)", []),
        ("code is not a link: `[x](nowhere.md)`\n```\n[y](nowhere.md)\n```", []),
    ],
)
def test_the_check_finds_broken_links(text: str, expected: list[str]) -> None:
    assert broken_links("README.md", text, tracked_files()) == expected
