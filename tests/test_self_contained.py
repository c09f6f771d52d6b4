"""The repository stands alone: nothing cites the design notes and user guide that live outside it, and every
``docs/*.md`` citation (file and ``#anchor``) resolves to a page and a heading of ours.

Files are the repository's own: ``git ls-files`` (tracked plus untracked-but-not-ignored, so a new page counts before
it is committed), or a directory walk where git or the ``.git`` folder is absent (an unpacked archive). Anchors are
GitHub's heading slugs. The only outside path allowed is ``../shared/reference-data``, which tests read as optional
input (they skip without it).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections import Counter
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Built from parts so that this file does not cite them itself (it is scanned like every other file).
OUTSIDE_DOCS = tuple(name + ".md" for name in ("TRAINING_" + "GUIDE", "DE" + "SIGN", "REFERENCE_" + "SEMANTICS"))
OUTSIDE_NAME = re.compile("|".join(re.escape(name) for name in OUTSIDE_DOCS))
# The shared folder beside the repository (by its relative path, or its absolute one on the team's machines),
# except its reference-data subfolder.
OUTSIDE_PATH = re.compile(r"(?:\.\./|/work/)shared(?:/(?!reference-data\b)|\b(?!/))")
# A citation of one of our pages: docs/<page>.md, optionally with #anchor (not part of a longer path or URL).
DOCS_CITATION = re.compile(r"(?<![\w./-])docs/([\w.-]+\.md)(?:#([\w-]+))?")
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
WALK_SKIP = {".git", ".venv", "venv", "outputs", "__pycache__", ".pytest_cache", "node_modules", "build", "dist"}


def repo_files(root: Path) -> list[Path]:
    """The repository's files: git's view (tracked + untracked not ignored) when available, else a walk."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                                capture_output=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        listed = b""
    if listed:
        return sorted({root / name for name in listed.decode().split("\0") if name and (root / name).is_file()})
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in WALK_SKIP and not d.endswith(".egg-info"))
        found.extend(Path(folder) / name for name in names)
    return sorted(found)


def text_lines(path: Path) -> list[str]:
    """The file's lines, or [] for a binary file (images, checkpoints)."""
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return []
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        return []


def github_slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (letters, digits, '_', '-' and spaces kept),
    spaces to hyphens. Duplicates get -1, -2, ... (see :func:`heading_anchors`)."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def heading_anchors(lines: list[str]) -> set[str]:
    """Every anchor a Markdown page defines (headings outside fenced code blocks), duplicates numbered."""
    anchors, seen, fenced = set(), Counter(), False
    for line in lines:
        if FENCE.match(line):
            fenced = not fenced
            continue
        match = None if fenced else HEADING.match(line)
        if match:
            slug = github_slug(match.group(1))
            anchors.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")
            seen[slug] += 1
    return anchors


def outside_references(root: Path) -> list[str]:
    """'file:line: text' for every mention of the outside notes or of an outside shared/ path."""
    found = []
    for path in repo_files(root):
        for number, line in enumerate(text_lines(path), 1):
            if OUTSIDE_NAME.search(line) or OUTSIDE_PATH.search(line):
                found.append(f"{path.relative_to(root)}:{number}: {line.strip()[:160]}")
    return found


def broken_doc_links(root: Path) -> list[str]:
    """'file:line: target (why)' for every docs/ citation, and every relative link inside docs/*.md, whose page or
    heading does not exist."""
    anchors: dict[Path, set[str] | None] = {}

    def check(page: Path, anchor: str | None) -> str | None:
        if page not in anchors:
            anchors[page] = heading_anchors(text_lines(page)) if page.is_file() else None
        if anchors[page] is None:
            return "no such page"
        if anchor and anchor not in anchors[page]:
            return f"no heading with anchor #{anchor}"
        return None

    broken = []
    for path in repo_files(root):
        relative = path.relative_to(root)
        in_docs = relative.parts[0] == "docs" and path.suffix == ".md"
        for number, line in enumerate(text_lines(path), 1):
            targets = [(root / "docs" / name, anchor, f"docs/{name}" + (f"#{anchor}" if anchor else ""))
                       for name, anchor in DOCS_CITATION.findall(line)]
            if in_docs:
                for link in MARKDOWN_LINK.findall(line):
                    if re.match(r"[a-z]+:", link) or link.startswith("/"):
                        continue  # a URL or an absolute path: not one of our pages
                    file_part, _, anchor = link.partition("#")
                    if file_part and not file_part.endswith(".md"):
                        continue  # a link to code or an asset, not a page
                    page = (path.parent / file_part).resolve() if file_part else path
                    targets.append((page, anchor or None, link))
            for page, anchor, shown in targets:
                why = check(page, anchor or None)
                if why:
                    broken.append(f"{relative}:{number}: {shown} ({why})")
    return broken


# ---- the repository itself --------------------------------------------------------------------------------------


def test_nothing_cites_files_outside_the_repository():
    found = outside_references(REPO_ROOT)
    assert not found, ("these lines cite files outside the repository (write what they need into docs/ and cite "
                       "docs/<page>.md#<anchor> instead):\n" + "\n".join(found))


def test_every_docs_citation_resolves():
    broken = broken_doc_links(REPO_ROOT)
    assert not broken, "docs/ citations whose page or heading does not exist:\n" + "\n".join(broken)


def test_the_docs_pages_exist_and_are_cited():
    pages = {p.name for p in (REPO_ROOT / "docs").glob("*.md")}
    assert {"algorithms.md", "upstream_compatibility.md", "training_guide.md"} <= pages
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    for page in sorted(pages):  # the README's Documentation list links every page
        assert f"(docs/{page})" in readme, f"README.md does not link docs/{page}"


# ---- the checker on hand-made trees (it must be able to fail) ----------------------------------------------------


@pytest.mark.parametrize("heading, slug", [
    ("Advantages", "advantages"),
    ("ODE (Euler)", "ode-euler"),
    ("SFT-aux", "sft-aux"),
    ("Editing (Kontext)", "editing-kontext"),
    ("Eval YAML and UniGenBench CSV", "eval-yaml-and-unigenbench-csv"),
    ("What `x_t` means: a *note*", "what-x_t-means-a-note"),
    ("GRPO-Guard (arXiv 2510.22319)", "grpo-guard-arxiv-251022319"),
])
def test_github_slug(heading, slug):
    assert github_slug(heading) == slug


def test_anchors_skip_code_blocks_and_number_duplicates():
    lines = ["# Page", "## Notes", "```bash", "# not a heading", "```", "## Notes", "text ## not a heading"]
    assert heading_anchors(lines) == {"page", "notes", "notes-1"}


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


def test_checker_names_each_bad_line(tmp_path):
    # tmp_path is no git repository: this also exercises the directory-walk fallback. The planted citations are
    # assembled here so that this file does not contain them.
    design, shared, page = OUTSIDE_DOCS[1], "../" + "shared/", "docs" + "/page.md"
    root = _tree(tmp_path, {
        page: "# Page\n\n## Good part\n\nSee [there](other.md#nowhere) and [here](#good-part).\n",
        "pkg/mod.py": f'"""Math ({page}#good-part).\n\nAs {design} section 4 says."""\n',
        "pkg/data.py": f"ROOT = '{shared}reference-data'  # allowed\nNOTES = '{shared}notes.txt'\n",
        "scripts/run.sh": f"# see {page}#bad-part and {page.replace('page', 'missing')}\n",
        ".venv/lib/x.py": f"# {design} inside the venv is not ours\n",
        "assets/image.png": "\0binary",
    })
    assert outside_references(root) == [f"pkg/data.py:2: NOTES = '{shared}notes.txt'",
                                        f"pkg/mod.py:3: As {design} section 4 says.\"\"\""]
    assert broken_doc_links(root) == [f"{page}:5: other.md#nowhere (no such page)",
                                      f"scripts/run.sh:1: {page}#bad-part (no heading with anchor #bad-part)",
                                      f"scripts/run.sh:1: {page.replace('page', 'missing')} (no such page)"]
