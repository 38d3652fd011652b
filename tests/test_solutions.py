"""The worked solutions (`notebooks/solutions/`) against the chapters' exercises.

Structure only: `make test` executes every solutions notebook with nbmake (their `assert`s check
the answers). Here: every chapter with exercises has a solutions notebook of the same name, with
one section per exercise, in order, each with a folded hint and at least one check; the
notebooks link to their chapter, are stored without outputs, and are in the table of contents.
"""

import re
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SOLUTIONS = sorted((ROOT / "notebooks" / "solutions").glob("*.ipynb"))

sys.path.insert(0, str(ROOT / "tools"))  # the tools are scripts, not a package
import strip_outputs  # noqa: E402

_HEADING = re.compile(r"^(#{1,6}) (.+)$", flags=re.MULTILINE)
_ITEM = re.compile(r"^(\d+)\. ", flags=re.MULTILINE)
_EXERCISE = re.compile(r"^## Exercise (\d+): \S", flags=re.MULTILINE)
_HINT = re.compile(r"^```\{dropdown\} Hint$", flags=re.MULTILINE)
_CHECK = re.compile(r"^\s*(assert |torch\.testing\.assert_close\()", flags=re.MULTILINE)


def _markdown(path: Path) -> str:
    notebook = nbformat.read(path, as_version=4)
    return "\n\n".join(c.source for c in notebook.cells if c.cell_type == "markdown")


def _title(path: Path) -> str:
    return _HEADING.search(_markdown(path)).group(2)


def exercise_numbers(chapter: Path) -> list[int]:
    """The numbers of the items of the chapter's "Exercises" section (its list, in order)."""
    text = _markdown(chapter)
    start = re.search(r"^#{2,3} Exercises\s*$", text, flags=re.MULTILINE)
    if start is None:
        return []
    rest = text[start.end() :]
    end = _HEADING.search(rest)
    section = rest[: end.start()] if end else rest
    return [int(n) for n in _ITEM.findall(section)]


def sections(solutions: Path) -> dict[int, list]:
    """The cells of each "## Exercise N: ..." section, by N."""
    notebook = nbformat.read(solutions, as_version=4)
    found, current = {}, None
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            match = _EXERCISE.search(cell.source)
            if match:
                current = int(match.group(1))
                found[current] = []
        if current is not None:
            found[current].append(cell)
    return found


WITH_EXERCISES = [c for c in CHAPTERS if exercise_numbers(c)]


def test_the_exercise_lists_are_numbered_from_one():
    for chapter in WITH_EXERCISES:
        numbers = exercise_numbers(chapter)
        assert numbers == list(range(1, len(numbers) + 1)), chapter.name


def test_every_chapter_with_exercises_has_a_solutions_notebook_and_no_other():
    assert [p.name for p in SOLUTIONS] == [c.name for c in WITH_EXERCISES]


@pytest.mark.parametrize("chapter", WITH_EXERCISES, ids=lambda p: p.name)
def test_one_solution_section_per_exercise(chapter):
    solutions = ROOT / "notebooks" / "solutions" / chapter.name
    found = sections(solutions)
    assert list(found) == exercise_numbers(chapter), "one '## Exercise N: ...' per exercise"
    for number, cells in found.items():
        markdown = "\n".join(c.source for c in cells if c.cell_type == "markdown")
        code = "\n".join(c.source for c in cells if c.cell_type == "code")
        assert _HINT.search(markdown), f"exercise {number}: no ```{{dropdown}} Hint"
        assert code.strip(), f"exercise {number}: no code"
        assert _CHECK.search(code), f"exercise {number}: nothing checks the answer"


@pytest.mark.parametrize("chapter", WITH_EXERCISES, ids=lambda p: p.name)
def test_solutions_are_titled_after_and_link_to_their_chapter(chapter):
    solutions = ROOT / "notebooks" / "solutions" / chapter.name
    assert _title(solutions) == f"Solutions: {_title(chapter)}"
    assert f"{{doc}}`../{chapter.stem}`" in _markdown(solutions)


@pytest.mark.parametrize("chapter", WITH_EXERCISES, ids=lambda p: p.name)
def test_each_chapter_links_to_its_solutions(chapter):
    assert f"solutions/{chapter.stem}" in _markdown(chapter), "link the solutions under Exercises"


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name)
def test_solutions_are_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    for i, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"cell {i + 1}: strip it"
    assert not strip_outputs.strip(str(path), check=True), "run tools/strip_outputs.py on it"


def test_solutions_are_in_the_table_of_contents_in_chapter_order():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [c["file"] for part in toc["parts"] for c in part["chapters"]]
    listed = [f for f in files if f.startswith("notebooks/solutions/")]
    assert listed == [f"notebooks/solutions/{p.stem}" for p in SOLUTIONS]
