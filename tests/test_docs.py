"""The documentation holds together: the README stays a front door (short, the two set-up commands first) and every
relative link or image in README.md, CONTRIBUTING.md and docs/*.md points at a file that exists and, with a
`#anchor`, at a heading in it (GitHub's heading anchors)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 220
SETUP_COMMANDS = (
    "bash setup.sh && .venv/bin/python app.py",
    "bash setup.sh --dev && .venv/bin/python -m pytest -q",
)

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
HTML_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)


def outside_blocks(text: str) -> str:
    """The text without code blocks and HTML comments: headings count only outside them."""
    return FENCE.sub("", HTML_COMMENT.sub("", text))


def prose(text: str) -> str:
    """The text without code blocks, HTML comments and inline code: links count only outside them."""
    return INLINE_CODE.sub("", outside_blocks(text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup and punctuation dropped, lower case, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its words
    text = re.sub(r"[`*_~]|<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor of `path`'s headings; a repeated heading gets -1, -2, ... as on GitHub."""
    found: set[str] = set()
    counts: dict[str, int] = {}
    for heading in HEADING.findall(outside_blocks(path.read_text(encoding="utf-8"))):
        base = slug(heading)
        n = counts.get(base, 0)
        counts[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def relative_links(path: Path) -> list[str]:
    targets = LINK.findall(prose(path.read_text(encoding="utf-8")))
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.IGNORECASE)]  # http:, https:, mailto: ...


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def broken_links(path: Path) -> list[str]:
    """The relative links of `path` that do not resolve, each with the reason."""
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / file_part).resolve() if file_part else path.resolve()
        if not destination.exists():
            broken.append(f"{target}: no file {shown(destination)}")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(f"{target}: no heading #{anchor} in {shown(destination)}")
    return broken


def test_readme_is_a_front_door():
    text = README.read_text(encoding="utf-8")
    lines = text.count("\n") + (not text.endswith("\n"))
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; at most {README_MAX_LINES}: move details to docs/"
    first_block = FENCE.search(text)
    assert first_block, "README.md has no code block"
    for command in SETUP_COMMANDS:
        assert command in first_block.group(0), f"README.md's first code block lacks `{command}`"


def test_the_docs_exist():
    names = {path.name for path in DOCS}
    for name in (
        "CONTRIBUTING.md",
        "design.md",
        "policies.md",
        "benchmarks.md",
        "speed.md",
        "reliability.md",
        "configuration.md",
        "terminal.md",
        "browser.md",
    ):
        assert name in names, f"missing {name}"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
    assert relative_links(path) or path.name == "CONTRIBUTING.md", f"{path.name} links nowhere: is the parser broken?"
    assert broken_links(path) == []


def test_the_link_checker_finds_broken_links(tmp_path):
    """The checker itself: a missing file, a missing heading and a missing image are each reported; code is ignored."""
    (tmp_path / "other.md").write_text("# A Title: with `code`, punctuation!\n\n## Same\n\n## Same\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#a-title-with-code-punctuation) [ok](other.md#same-1) [ok](#here) [web](https://example.com)\n"
        "[gone](missing.md) [bad anchor](other.md#nowhere) ![img](images/none.png)\n"
        "`[in code](nothing.md)`\n\n```\n[in a block](nothing.md)\n```\n\n## Here\n"
    )
    assert broken_links(tmp_path / "other.md") == []
    assert [reason.split(":")[0] for reason in broken_links(page)] == [
        "missing.md",
        "other.md#nowhere",
        "images/none.png",
    ]
