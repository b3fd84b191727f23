"""The repository carries its own docs: every reference resolves inside it (issue #17 item 5).

(a) every path docs/ARCHITECTURE.md names exists; (b) no tracked text file points outside the repository, and
every ``docs/<NAME>.md §N`` it cites names a file and a section that exist; (c) the Markdown links of every
tracked .md file (README.md, docs/, …) resolve to files inside the repository.
"""

import os
import re
import subprocess

import pytest

ROOT = os.path.realpath(os.path.join(os.path.dirname(__file__), ".."))
DOC_NAMES = ("ARCHITECTURE", "KERNELS", "PEFT_CONTRACT")
# Built from parts so that this file does not match its own patterns.
OUTSIDE = ("../" + "shared", "shared" + "/docs")
BINARY_SUFFIXES = (".png", ".csv", ".jpg", ".pdf", ".so", ".whl")


def _read(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


def _tracked_text_files():
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    files = [f for f in out.splitlines() if not f.endswith(BINARY_SUFFIXES) and os.path.isfile(os.path.join(ROOT, f))]
    assert files, "git ls-files listed no files"
    return files


# ---------------------------------------------------------------------------- (a) ARCHITECTURE.md paths
_TOP_DIRS = r"(?:\.ci|csrc|docs|tests|benchmarks|peft_kernels|examples)"
_ROOTED_PATH = re.compile(_TOP_DIRS + r"/[\w./-]*")
_BARE_FILE = re.compile(r"(?<![\w/.<-])[\w-]+(?:\.[\w-]+)*\.(?:py|md|toml|cu|cuh|h|cpp|sh|json)\b")


def architecture_paths(text):
    """(path as written, path relative to the repository root) for every file or folder the text names.

    Rooted paths (``peft_kernels/…``, ``tests/…``) resolve from the root. A bare file name resolves against
    the folder named earlier on its line (``backends/triton/   … (lora.py, prefix.py)``), else against the
    root, ``peft_kernels/`` or ``docs/``, whichever holds it (the prose names API modules by their file name).
    """
    found = []
    for line in text.splitlines():
        base = None
        consumed = []
        for match in _ROOTED_PATH.finditer(line):
            path = match.group(0).rstrip(".")
            if "<" in line[match.start() : match.end() + 1]:
                continue  # a pattern such as tuners/<method>/, not a path
            found.append((path, path))
            consumed.append(match.span())
            if path.endswith("/") and base is None:
                base = path
        for match in _BARE_FILE.finditer(line):
            if any(start <= match.start() < end for start, end in consumed):
                continue
            name = match.group(0)
            if base:
                candidate = os.path.join(base, name)
            else:
                options = [name, os.path.join("peft_kernels", name), os.path.join("docs", name)]
                candidate = next((o for o in options if os.path.exists(os.path.join(ROOT, o))), name)
            found.append((name, candidate))
    return found


def test_architecture_names_only_files_that_exist():
    paths = architecture_paths(_read("docs/ARCHITECTURE.md"))
    assert len(paths) > 50, "the file list of docs/ARCHITECTURE.md §1 was not parsed"
    missing = sorted(
        {f"{written} (as {rel})" for written, rel in paths if not os.path.exists(os.path.join(ROOT, rel))}
    )
    assert not missing, "docs/ARCHITECTURE.md names paths that do not exist:\n" + "\n".join(missing)


def test_the_path_check_can_fail():
    text = "peft_kernels/no_such_module.py    x\npeft_kernels/backends/triton/   (lora.py, no_such.py)\n"
    rels = [rel for _, rel in architecture_paths(text)]
    assert "peft_kernels/no_such_module.py" in rels and "peft_kernels/backends/triton/no_such.py" in rels
    assert not os.path.exists(os.path.join(ROOT, "peft_kernels/backends/triton/no_such.py"))


# ---------------------------------------------------------------------------- (b) references
_BARE_CITATION = re.compile(r"(?<![\w/])(?:" + "|".join(DOC_NAMES) + r")(?:\.md|(?:'s)?\s*§)")
_CITATION = re.compile(r"docs/(\w+)\.md(?:'s)?((?:(?:\s*,\s*|\s+and\s+|\s+)§\d+(?:\.\d+)?(?:[–-]\d+)?)*)")
_SECTION = re.compile(r"§(\d+)(?:\.(\d+))?(?:[–-](\d+))?")


def _sections(doc_text):
    """{"3": text of ``## 3.``, …} and the set of "N.M" subsections (``### N.M`` or item ``M.`` in ``## N.``)."""
    parts = re.split(r"^## (\d+)\.", doc_text, flags=re.M)
    top = {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}
    sub = set()
    for number, body in top.items():
        sub |= {f"{number}.{m}" for m in re.findall(rf"^### {number}\.(\d+)\b", body, flags=re.M)}
        sub |= {f"{number}.{m}" for m in re.findall(r"^(\d+)\. ", body, flags=re.M)}
    return top, sub


def citation_problems(text):
    """What is wrong with the doc references of one file's text."""
    problems = [f"points outside the repository ({marker!r})" for marker in OUTSIDE if marker in text]
    for match in _BARE_CITATION.finditer(text):
        before = text[max(0, match.start() - 5) : match.start()]
        # docs/X.md, or a Markdown link between the docs themselves ("](KERNELS.md)", checked by (c))
        if before != "docs/" and not before.endswith("]("):
            problems.append(f"cites {match.group(0)!r} without its path docs/<NAME>.md")
    for match in _CITATION.finditer(text):
        name = match.group(1)
        path = os.path.join(ROOT, "docs", name + ".md")
        if not os.path.isfile(path):
            problems.append(f"cites docs/{name}.md, which does not exist")
            continue
        top, sub = _sections(open(path, encoding="utf-8").read())
        for section in _SECTION.finditer(match.group(2)):
            first, minor, last = section.groups()
            wanted = [f"{first}.{minor}"] if minor else [str(n) for n in range(int(first), int(last or first) + 1)]
            for number in wanted:
                if number not in (sub if "." in number else top):
                    problems.append(f"cites docs/{name}.md §{number}, which has no such section")
    return problems


def test_no_reference_leaves_the_repository():
    problems = []
    for rel in _tracked_text_files():
        if rel == "tests/test_docs.py":
            continue  # its examples of broken references are deliberate
        try:
            text = _read(rel)
        except UnicodeDecodeError:
            continue
        problems += [f"{rel}: {p}" for p in citation_problems(text)]
    assert not problems, "\n".join(problems)


def test_the_reference_check_can_fail():
    assert citation_problems("see KERNELS.md §9")
    assert citation_problems("(PEFT_CONTRACT §5.3)")
    assert citation_problems("docs/KERNELS.md §99")
    assert citation_problems("docs/KERNELS.md §10.99")
    assert citation_problems("docs/NO_SUCH_DOC.md §1")
    assert citation_problems("[x](" + OUTSIDE[0] + "/docs/KERNELS.md)")
    assert not citation_problems("docs/KERNELS.md §4 and §10.6; docs/PEFT_CONTRACT.md §2-3, §8.4; KERNELS = {}")
    assert not citation_problems("[the contract](PEFT_CONTRACT.md)")


# ---------------------------------------------------------------------------- (c) Markdown links
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def link_problems(rel):
    problems = []
    folder = os.path.dirname(os.path.join(ROOT, rel))
    for target in _LINK.findall(_read(rel)):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # web and mail links, anchors in the same file
        path = os.path.realpath(os.path.join(folder, target.split("#")[0]))
        if not (path == ROOT or path.startswith(ROOT + os.sep)):
            problems.append(f"{rel}: link {target!r} leaves the repository")
        elif not os.path.exists(path):
            problems.append(f"{rel}: link {target!r} does not resolve")
    return problems


def test_markdown_links_resolve_inside_the_repository():
    files = [rel for rel in _tracked_text_files() if rel.endswith(".md")]
    assert "README.md" in files and "docs/ARCHITECTURE.md" in files
    assert _LINK.findall(_read("README.md")), "README.md has Markdown links; none were parsed"
    problems = [p for rel in files for p in link_problems(rel)]
    assert not problems, "\n".join(problems)
