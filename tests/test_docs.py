"""The README starts short, the documentation's links resolve, and every option is
documented. Text only: no import of the package, no network, well under a second."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 250

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# [text](target) or [text](target "title"); images too (the ! is not needed to match)
LINK = re.compile(r"\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# an option's flags where it is defined: Option("--x", ...), addoption("--x", ...),
# add_argument("--x", "--y", ...)
DEFINITION = re.compile(r"\b(?:Option|addoption|add_argument)\(\s*((?:[\"']--[\w-]+[\"']\s*,\s*)+)")
FLAG = re.compile(r"--[\w-]+")


def doc_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    lines, fenced = [], None
    for number, line in enumerate(text.splitlines(), 1):
        fence = FENCE.match(line)
        if fence:
            if fenced is None:
                fenced = fence.group(1)
            elif fence.group(1) == fenced:
                fenced = None
            continue
        if fenced is None:
            lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text (markup dropped), lower-cased,
    every character but letters, digits, '_', '-' and ' ' removed, spaces to '-'."""
    text = CODE_SPAN.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links: their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = re.sub(r"(\*+|(?<!\w)_+|_+(?!\w))", "", text)  # emphasis marks
    text = text.strip().lower()
    kept = "".join(c for c in text if c in "-_ " or unicodedata.category(c)[0] in "LNM")
    return kept.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def relative_links(path: Path) -> list[tuple[int, str]]:
    links = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        line = CODE_SPAN.sub("", line)  # `[a](b)` in code is not a link
        for match in LINK.finditer(line):
            target = match.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("//"):
                continue  # http:, https:, mailto:, ...
            links.append((number, target))
    return links


def test_readme_starts_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines; at most {README_MAX_LINES}: move detail into docs/")


def test_slug_follows_github():
    assert slug("Hybrids: `A+B`") == "hybrids-ab"
    assert slug("Options of `pytest-specdec train`") == "options-of-pytest-specdec-train"
    assert slug("The peers: an independent reference") == "the-peers-an-independent-reference"
    assert slug("What a run shows") == "what-a-run-shows"
    assert slug("Paired timing, and the report's *Timing and costs*") == \
        "paired-timing-and-the-reports-timing-and-costs"
    assert slug("`--specdec-k` and max_depth") == "--specdec-k-and-max_depth"


def test_docs_exist_and_are_linked_from_the_readme():
    pages = sorted(DOCS.glob("*.md"))
    assert pages, "docs/ holds no pages"
    linked = {(README.parent / target.split("#", 1)[0]).resolve()
              for _, target in relative_links(README) if not target.startswith("#")}
    unlinked = [p.name for p in pages if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link to: {unlinked}"


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path):
    broken = []
    for number, target in relative_links(path):
        file_part, _, fragment = target.partition("#")
        destination = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT)}:{number}: {target}"
        if not destination.exists():
            broken.append(f"{where} (no such file)")
            continue
        if fragment and destination.suffix == ".md" and fragment not in anchors(destination):
            broken.append(f"{where} (no heading with anchor #{fragment})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def defined_options() -> dict[str, list[str]]:
    """Every command-line flag defined in the package (pytest options and the CLI's)
    and in the cost benchmark's conftest, with the files that define it."""
    sources = sorted((ROOT / "pytest_specdec").rglob("*.py")) + [ROOT / "benchmarks" / "conftest.py"]
    found: dict[str, list[str]] = {}
    for source in sources:
        if not source.is_file():
            continue
        text = source.read_text(encoding="utf-8")
        for match in DEFINITION.finditer(text):
            for flag in FLAG.findall(match.group(1)):
                found.setdefault(flag, []).append(str(source.relative_to(ROOT)))
    return found


def test_every_option_is_documented():
    options = defined_options()
    specdec = [flag for flag in options if flag.startswith("--specdec-")]
    assert len(specdec) >= 20, f"found only {specdec}: where are the --specdec-* options defined?"
    text = "\n".join(path.read_text(encoding="utf-8") for path in doc_files())
    missing = [f"{flag} ({', '.join(sorted(set(files)))})" for flag, files in sorted(options.items())
               if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text)]
    assert not missing, "options documented nowhere in README.md or docs/:\n" + "\n".join(missing)
