"""The book's own plumbing: notebooks, the exporter, the package's shape, table of contents,
environments."""

import ast
import json
import re
import sys
from pathlib import Path

import nbformat
import pytest
import yaml
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
ALL_NOTEBOOKS = sorted(  # chapters and solutions
    p for p in (ROOT / "notebooks").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts
)
PACKAGE = ROOT / "gpt2_book"
# The command line (`__main__.py` parses, `cli.py` runs) and the package's front door are
# hand-written and may import any chapter; every other module is generated.
HAND_WRITTEN = {"__init__.py", "__main__.py", "cli.py"}
MAX_MODULE_LINES = 350


sys.path.insert(0, str(ROOT / "tools"))  # the tools are scripts, not a package
import check_site  # noqa: E402
import colab_cell  # noqa: E402
import export  # noqa: E402
import sphinx_book  # noqa: E402
import strip_outputs  # noqa: E402

# Notebooks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ALL_NOTEBOOKS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_committed_notebooks_carry_no_outputs(path):
    notebook = json.loads(path.read_text())
    for i, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"cell {i + 1} has outputs: run `make strip`"
            assert cell["execution_count"] is None, f"cell {i + 1} has an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_chapters_are_normalised(path):
    # Kernel, cell ids, the Colab cell, hidden machinery: all that `make strip` does.
    assert not strip_outputs.strip(str(path), check=True), "not normalised: run `make strip`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_build_machinery_is_hidden_on_the_site(path):
    notebook = nbformat.read(path, as_version=4)
    for i, cell in enumerate(notebook.cells):
        if strip_outputs.is_machinery(cell):
            tags = cell.metadata.get("tags", [])
            assert "remove-cell" in tags, f"cell {i + 1} is machinery: run `make strip`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_chapter_opens_with_the_colab_cell_for_the_configured_repository(path):
    notebook = nbformat.read(path, as_version=4)
    first = next(c for c in notebook.cells if c.cell_type == "code")
    assert first.source == colab_cell.colab_source(*colab_cell.repository()), "run `make strip`"


def test_every_notebook_is_in_the_table_of_contents_in_order():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [c["file"] for part in toc["parts"] for c in part["chapters"]]
    chapters = [f for f in files if f.startswith("notebooks/") and "/solutions/" not in f]
    assert chapters == [f"notebooks/{p.stem}" for p in NOTEBOOKS]  # sorted: number order
    for name in files + [toc["root"]]:
        assert any((ROOT / name).with_suffix(s).exists() for s in (".md", ".ipynb")), name


# The exporter -------------------------------------------------------------------------------


def _write(folder: Path, name: str, *cells: str, title: str = "# A chapter") -> Path:
    """A notebook `folder/notebooks/name.ipynb`: a markdown title, then these code cells."""
    path = folder / "notebooks" / f"{name}.ipynb"
    path.parent.mkdir(parents=True, exist_ok=True)
    notebook = new_notebook(cells=[new_markdown_cell(title)] + [new_code_cell(c) for c in cells])
    nbformat.write(notebook, path)
    return path


@pytest.mark.slow  # ruff in subprocesses; `make export-check` runs it too
def test_package_matches_a_fresh_export():
    assert export.export_all(check=True) == 0, "run `make export`"


@pytest.mark.parametrize("directive", ["#| exprot", "#| exports", "#|export_", "# | hide"])
def test_exporter_refuses_an_unknown_directive(tmp_path, directive):
    path = _write(tmp_path, "01_x", "#| default_exp x", f"{directive}\ndef f():\n    pass")
    with pytest.raises(export.ExportError, match=r"01_x\.ipynb, cell 3 .*unknown directive"):
        export.read_chapter(path)


@pytest.mark.parametrize(
    "cells",
    [
        ["#| export\nx = 1"],  # no module to export to
        ["#| default_exp x", "#| export a b\nx = 1"],  # two modules
        ["#| default_exp x", "#| export Bad-Name\nx = 1"],
        ["#| default_exp x", "#| default_exp y"],
        ["#| default_exp x", "y = 2\n#| export\nx = 1"],  # a directive that would be ignored
    ],
)
def test_exporter_refuses_a_malformed_directive(tmp_path, cells):
    with pytest.raises(export.ExportError, match=r"01_x\.ipynb, cell \d"):
        export.read_chapter(_write(tmp_path, "01_x", *cells))


def test_export_module_routes_cells_to_their_module(tmp_path):
    path = _write(
        tmp_path,
        "08_x",
        "#| default_exp main",
        "#| export\nimport math\n\n\ndef area(r: float) -> float:\n    return math.pi * r * r",
        "#| export other\ndef _helper():\n    return 1\n\n\ndef tool():\n    return _helper()",
        "print('not exported')",
        "#| export\nLIMIT = 3",
    )
    chapter = export.read_chapter(path)
    assert list(chapter.modules) == ["main", "other"]
    main = export.render(chapter, "main", tmp_path)
    other = export.render(chapter, "other", tmp_path)
    assert main.startswith("# AUTOGENERATED from notebooks/08_x.ipynb by tools/export.py.\n")
    assert '__all__ = ["area", "LIMIT"]' in main and "def tool" not in main
    assert '__all__ = ["tool"]' in other and "area" not in other and "not exported" not in other
    compile(main, "main.py", "exec")
    compile(other, "other.py", "exec")


@pytest.mark.parametrize(
    ("title", "first_line"),
    [("Does RoPE help?", '"""Does RoPE help?\n'), ("Wow!", '"""Wow!\n'), ("Data", '"""Data.\n')],
)
def test_module_docstring_is_the_title_with_one_stop(tmp_path, title, first_line):
    path = _write(tmp_path, "01_x", "#| default_exp x", "#| export\nx = 1", title=f"# {title}")
    text = export.render(export.read_chapter(path), "x", tmp_path)
    assert first_line in text


def test_export_refuses_a_module_claimed_by_two_notebooks(tmp_path):
    _write(tmp_path, "01_a", "#| default_exp a", "#| export\nx = 1")
    _write(tmp_path, "02_b", "#| default_exp b", "#| export a\ny = 2")
    (tmp_path / "gpt2_book").mkdir()
    with pytest.raises(export.ExportError, match="01_a.ipynb and 02_b.ipynb both export to 'a'"):
        export.export_all(False, tmp_path / "notebooks", tmp_path / "gpt2_book")


@pytest.mark.slow  # six exports, each formatting with ruff
def test_export_check_finds_stale_and_edited_modules(tmp_path, capsys):
    _write(tmp_path, "01_a", "#| default_exp a", "#| export\nx = 1")
    package = tmp_path / "gpt2_book"
    package.mkdir()
    assert export.export_all(True, tmp_path / "notebooks", package) == 1  # a.py missing
    assert export.export_all(False, tmp_path / "notebooks", package) == 0
    assert export.export_all(True, tmp_path / "notebooks", package) == 0
    (package / "gone.py").write_text(export.MARKER + "notebooks/00_gone.ipynb\n")
    assert export.export_all(True, tmp_path / "notebooks", package) == 1
    assert "gone.py: stale" in capsys.readouterr().out
    (package / "gone.py").unlink()
    (package / "a.py").write_text((package / "a.py").read_text() + "# edited by hand\n")
    assert export.export_all(True, tmp_path / "notebooks", package) == 1


def test_ruff_is_pinned_to_the_installed_version():
    export.check_ruff_version()  # raises when the formatter would differ from the pinned one


# The package's shape ------------------------------------------------------------------------


def _generated() -> list[Path]:
    return [p for p in sorted(PACKAGE.glob("*.py")) if p.name not in HAND_WRITTEN]


def _chapter_number(module: Path) -> int:
    """The number of the notebook a generated module comes from (its header says which)."""
    match = re.match(r"# AUTOGENERATED from notebooks/(\d+)_\S+\.ipynb ", module.read_text())
    assert match, f"{module.name} lost its AUTOGENERATED header: run `make export`"
    return int(match.group(1))


@pytest.mark.parametrize("module", _generated(), ids=lambda p: p.name)
def test_generated_modules_say_so(module):
    text = module.read_text()
    match = re.match(r"# AUTOGENERATED from (\S+) by tools/export\.py\.\n", text)
    assert match, f"{module.name} has no AUTOGENERATED header: every module but {HAND_WRITTEN}"
    assert (ROOT / match.group(1)).exists(), f"{module.name} names a missing {match.group(1)}"
    assert "\n__all__ = [" in text


@pytest.mark.parametrize("module", _generated(), ids=lambda p: p.name)
def test_modules_are_short_enough_to_read_in_one_sitting(module):
    lines = len(module.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{module.name}: {lines} lines; split it by concern"


def _imported_modules(path: Path) -> set[str]:
    """The `gpt2_book` modules `path` imports anywhere in its body, functions included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "gpt2_book" if node.level else node.module or ""
            names = [f"{base}.{node.module}"] if node.level and node.module else [base]
            if base == "gpt2_book" and not (node.level and node.module):
                names += [f"gpt2_book.{a.name}" for a in node.names]  # from gpt2_book import x
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "gpt2_book" and len(parts) > 1 and (PACKAGE / f"{parts[1]}.py").exists():
                found.add(parts[1])
    return found - {path.stem}


def _import_graph() -> dict[str, set[str]]:
    return {p.stem: _imported_modules(p) for p in _generated()}


def test_no_import_cycles():
    graph = _import_graph()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = path[path.index(module) :] + [module]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        for imported in sorted(graph.get(module, ())):
            visit(imported, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_modules_import_only_earlier_chapters():
    # The staircase: a chapter runs only code from chapters at or before it.
    chapter = {p.stem: _chapter_number(p) for p in _generated()}
    for module, imported in _import_graph().items():
        for other in sorted(imported):
            assert chapter[other] <= chapter[module], (
                f"{module}.py (chapter {chapter[module]:02d}) imports {other}.py, "
                f"from the later chapter {chapter[other]:02d}"
            )


def test_import_graph_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "x.py"
    source.write_text(
        "from gpt2_book.gpt import GPT\n"
        "def f():\n    from gpt2_book.generate import generate\n    import gpt2_book.data\n"
        "from gpt2_book import rope\nfrom . import mlp\nfrom .block import Block\n"
    )
    assert _imported_modules(source) == {"gpt", "generate", "data", "rope", "mlp", "block"}


# The site -----------------------------------------------------------------------------------


def test_bibliography_labels_are_author_year_and_tell_works_apart():
    from pybtex.database import parse_file

    entries = list(parse_file(ROOT / "references.bib").entries.values())
    style = sphinx_book.AuthorYearStyle()
    ordered = style.sort(entries)
    labels = dict(zip((e.key for e in ordered), style.format_labels(ordered), strict=True))
    assert len(set(labels.values())) == len(labels), "two works share a label"
    assert labels["vaswani2017attention"] == "Vaswani et al., 2017"
    assert labels["kingma2015adam"] == "Kingma and Ba, 2015"
    assert {labels["sanderson2024attention"], labels["sanderson2024mlp"]} == {
        "Sanderson, 2024a",
        "Sanderson, 2024b",
    }
    assert sphinx_book._plain("Doll{\\'a}r") == "Dollár"
    assert labels["bloc97ntk"] == "bloc97, 2023"


def test_every_citation_is_in_references_bib():
    from pybtex.database import parse_file

    known = set(parse_file(ROOT / "references.bib").entries)
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]] + [c["file"] for part in toc["parts"] for c in part["chapters"]]
    pages = [p for f in files if (p := ROOT / f"{f}.md").exists()]
    pages += [*NOTEBOOKS, *(ROOT / "notebooks").glob("*/*.ipynb")]
    for page in pages:
        for roles in re.findall(r"\{cite(?::\w+)?\}`([^`]+)`", page.read_text()):
            missing = {k.strip() for k in roles.split(",")} - known
            assert not missing, f"{page.name} cites {missing}: add them to references.bib"


def test_formatter_pragmas_are_hidden_from_readers():
    from docutils import nodes

    code = "x = [1,  2]  # fmt: skip\n# fmt: off\ny = 3\n# fmt: on\n\nz = 4"
    document = nodes.section()
    document += nodes.literal_block(code, code)
    sphinx_book._strip_pragmas(None, document)
    assert document[0].astext() == "x = [1,  2]\ny = 3\n\nz = 4"


@pytest.mark.slow
@pytest.mark.skipif(check_site.find_chromium() is None, reason="no Chromium installed")
def test_site_check_finds_what_a_reader_would_trip_over(tmp_path):
    page = tmp_path / "notebooks" / "01_x.html"
    page.parent.mkdir()
    page.write_text(
        "<html><body><article><p>$$x = \\frac{1}{2}$$</p>"
        '<div class="cell_output"><div class="output text_markdown">'
        "<p>| a | b |\n|---|---|\n| 1 | 2 |</p></div></div>"
        '<script src="https://cdn.example.org/x.js"></script>'
        "<script>const A = 1;</script><script>const A = 2;</script>"
        "</article></body></html>"
    )
    server, port = check_site._serve(tmp_path)
    browser = check_site.Browser(check_site.find_chromium(), tmp_path / "profile")
    try:
        report, events = browser.visit(f"http://127.0.0.1:{port}/notebooks/01_x.html")
    finally:
        browser.close()
        server.shutdown()
    problems = "\n".join(check_site.problems_of("notebooks/01_x.html", report, events))
    for expected in [
        "external request: https://cdn.example.org/x.js",
        "JavaScript error: SyntaxError: Identifier 'A' has already been declared",
        "raw TeX",
        "unrendered table",
        "a chapter without a single figure",
    ]:
        assert expected in problems


# Environments -------------------------------------------------------------------------------


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_environment_yml_agrees_with_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "conda-forge" in env["channels"]
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    # conda provides the runtime dependencies (PyTorch is called "pytorch" on conda-forge) ...
    names = {"pytorch" if n == "torch" else n for n in _requirement_names(project["dependencies"])}
    assert names <= _requirement_names(conda)
    python = next(d for d in conda if d.startswith("python"))
    assert python.replace(" ", "") == "python" + project["requires-python"]
    # ... and pip installs this package itself, editable (Binder builds from this file), with
    # the extras the chapters need.
    editable = [m for p in pip if (m := re.fullmatch(r"-e \./?\[([a-z,]+)\]", p))]
    assert editable, pip
    assert {"hf", "lab"} <= set(editable[0].group(1).split(","))
    assert set(editable[0].group(1).split(",")) <= set(project["optional-dependencies"])
