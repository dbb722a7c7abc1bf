"""The documents a reader meets: the README's numbers, every relative link, and words that belong
to how the suite was built rather than to the suite."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest

from e4srec.headline import BEGIN, END, headline_markdown, readme_block

ROOT = Path(__file__).resolve().parents[1]
TABLES = ROOT / "results" / "paper" / "tables"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# Words that name how or when the work was done, not what the suite is or measured.
FORBIDDEN = re.compile(r"\b(sessions?|leases?|leased|device[- ]minutes?|sittings?|"
                       r"(fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth|thirteenth|fourteenth)"
                       r"[ _-](session|lease|gpu|sitting))\b|\b\w+_(fifth|sixth|seventh|eighth|ninth|tenth|"
                       r"eleventh|twelfth|thirteenth)\b", re.IGNORECASE)
# Machine output kept verbatim as a record (logs of real runs) may contain such words.
RAW_OUTPUT = (".log", ".parquet", ".safetensors", ".pdf", ".png", ".tsv")


def tracked_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / name for name in listed.decode().split("\0") if name]


def test_readme_is_one_screen_of_text():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 150


def test_readme_headline_table_is_generated_from_the_committed_tables():
    expected = headline_markdown(TABLES / "table3.csv", TABLES / "significance.csv")
    assert readme_block(ROOT / "README.md") == expected, (
        "README.md's headline table differs from the committed tables: run "
        "`e4srec headline results/paper --readme README.md`")


def test_headline_rewrite_is_idempotent_and_needs_its_markers(tmp_path):
    from e4srec.files import InputError
    from e4srec.headline import write_readme

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{BEGIN}\nold\n{END}\noutro\n")
    assert write_readme(readme, ROOT / "results" / "paper") is True
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{END}\noutro\n") and "old" not in text
    assert write_readme(readme, ROOT / "results" / "paper") is False
    readme.write_text("no markers\n")
    with pytest.raises(InputError, match="needs one line"):
        write_readme(readme, ROOT / "results" / "paper")


def markdown_files() -> list[Path]:
    return [path for path in tracked_files() if path.suffix == ".md" and path.exists()]


@pytest.mark.parametrize("path", markdown_files(), ids=lambda path: str(path.relative_to(ROOT)))
def test_relative_links_resolve(path):
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)  # code blocks are not links
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL or an anchor on the same page
        file_part = unquote(target.split("#", 1)[0])
        if not (path.parent / file_part).exists():
            broken.append(target)
    assert not broken, f"{path.relative_to(ROOT)}: links to missing files: {broken}"


def test_tracked_files_speak_of_the_project_alone():
    offending = []
    for path in tracked_files():
        relative = str(path.relative_to(ROOT))
        if FORBIDDEN.search(relative):
            offending.append(f"{relative}: in the path")
        if path.suffix in RAW_OUTPUT or not path.is_file() or path == Path(__file__).resolve():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if FORBIDDEN.search(line):
                offending.append(f"{relative}:{number}: {line.strip()[:100]}")
    assert not offending, "words about how the work was done, not about the suite:\n" + "\n".join(offending[:40])
