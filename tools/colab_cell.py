"""The Colab set-up cell that opens every chapter, written from `_config.yml` (hand-written tool).

A chapter opened in Google Colab (the site's launch button) has no `gpt2_book` package: Colab
clones nothing, it only opens the notebook. So each chapter's first code cell installs the package
from the book's repository when it runs in Colab, and does nothing anywhere else. The repository
address is set in one place, `_config.yml`'s `repository:` section (`url`, `branch`), which the
site's launch buttons read too; this tool writes the cell from it. `tools/strip_outputs.py`
(`make strip`) calls it for every notebook and tags the cell `remove-cell`, so readers of the
site never see it, and the tests fail if a notebook's cell disagrees with `_config.yml`.

Usage: ``python tools/colab_cell.py`` prints the cell.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from nbformat.v4 import new_code_cell

ROOT = Path(__file__).resolve().parent.parent
MARKER = "# Colab set-up"
EXTRAS = "hf"  # transformers: the chapters that load OpenAI's weights need it


def repository(config: Path = ROOT / "_config.yml") -> tuple[str, str]:
    """The repository URL and branch from `_config.yml`."""
    section = yaml.safe_load(config.read_text())["repository"]
    return section["url"].rstrip("/"), section.get("branch", "main")


def colab_source(url: str, branch: str) -> str:
    """The cell's code: a pip install from `url@branch`, only inside Colab."""
    package = f"gpt2-book[{EXTRAS}] @ git+{url}@{branch}"
    return (
        f"{MARKER}: in Google Colab, install this book's package from its repository.\n"
        "# Elsewhere this cell does nothing (and the book's website hides it).\n"
        "import sys\n"
        "\n"
        'if "google.colab" in sys.modules:\n'
        "    import subprocess\n"
        "\n"
        f'    package = "{package}"\n'
        '    subprocess.run([sys.executable, "-m", "pip", "install", "-q", package], check=True)'
    )


def ensure_colab_cell(notebook, source: str) -> None:
    """Make `source` the notebook's first code cell, replacing an older version of it."""
    cells = notebook.cells
    old = [i for i, c in enumerate(cells) if c.cell_type == "code" and c.source.startswith(MARKER)]
    if old == [_first_code(cells)] and cells[old[0]].source == source:
        return
    for i in reversed(old):
        del cells[i]
    cells.insert(_first_code(cells), new_code_cell(source))


def _first_code(cells) -> int:
    """Where the first code cell is (after the title and opening prose)."""
    return next((i for i, c in enumerate(cells) if c.cell_type == "code"), len(cells))


if __name__ == "__main__":
    print(colab_source(*repository()))
