"""Clear outputs and normalise notebooks, in place, for committing.

Committed notebooks carry no outputs or execution counts: the book executes them when it is built,
and diffs stay readable. The stripping itself is nbstripout's (PyPI), with its default set of
editor metadata to drop and its stable cell ids ("0", "1", ...), so a notebook converted back from
a jupytext script does not change every id.

What no library does, and is therefore written here:

- Every notebook gets the same notebook metadata: the `python3` kernel (the environment it is run
  from) and a bare `language_info`. nbstripout can only delete metadata keys, not set them, and
  the test suite requires this kernelspec.
- Every chapter's first code cell is the Colab set-up cell, written from `_config.yml` by
  ``tools/colab_cell.py`` (which says why it exists).
- Cells that are build machinery, not lessons, get the `remove-cell` tag so the site hides them:
  the cell holding ``#| default_exp NAME`` and the Colab set-up cell.

Usage: ``python tools/strip_outputs.py notebooks/*.ipynb`` (``make strip``); ``--check`` only
reports the notebooks that would change and exits 1 if there are any.
"""

from __future__ import annotations

import argparse
import re

import nbformat
from colab_cell import MARKER as COLAB_MARKER
from colab_cell import colab_source, ensure_colab_cell, repository
from nbstripout import strip_output

KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
# nbstripout's own defaults (its command line adds these; its Python API does not).
EXTRA_KEYS = [
    "metadata.signature",
    "metadata.widgets",
    "cell.metadata.collapsed",
    "cell.metadata.ExecuteTime",
    "cell.metadata.execution",
    "cell.metadata.heading_collapsed",
    "cell.metadata.hidden",
    "cell.metadata.scrolled",
]
HIDE_TAG = "remove-cell"
_MACHINERY = re.compile(r"^#\s*\|\s*default_exp\b", flags=re.MULTILINE)


def is_machinery(cell) -> bool:
    """True for a code cell that is build machinery: the site hides it."""
    return cell.cell_type == "code" and (
        bool(_MACHINERY.search(cell.source)) or cell.source.startswith(COLAB_MARKER)
    )


def normalise(notebook, colab: str) -> None:
    """Strip outputs, counts and editor metadata; set the kernel; put `colab` (the set-up
    cell's source) first among the code cells; tag machinery cells."""
    ensure_colab_cell(notebook, colab)
    strip_output(
        notebook, keep_output=False, keep_count=False, keep_id=False, extra_keys=EXTRA_KEYS
    )
    notebook.metadata = {"kernelspec": KERNELSPEC, "language_info": {"name": "python"}}
    for cell in notebook.cells:
        if is_machinery(cell):
            tags = cell.metadata.setdefault("tags", [])
            if HIDE_TAG not in tags:
                tags.append(HIDE_TAG)


def strip(path: str, *, check: bool = False) -> bool:
    """Normalise one notebook (with `check`, only compare); True when it changed (or would)."""
    with open(path, encoding="utf-8") as file:
        before = file.read()
    notebook = nbformat.reads(before, as_version=4)
    normalise(notebook, colab_source(*repository()))
    after = nbformat.writes(notebook) + "\n"  # as nbformat.write ends a file
    if after == before:
        return False
    if not check:
        with open(path, "w", encoding="utf-8") as file:
            file.write(after)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--check", action="store_true", help="only report, exit 1 on changes")
    args = parser.parse_args()
    changed = [p for p in args.paths if strip(p, check=args.check)]
    for path in changed:
        print(f"{'would normalise' if args.check else 'normalised'} {path}")
    return int(args.check and bool(changed))


if __name__ == "__main__":
    raise SystemExit(main())
