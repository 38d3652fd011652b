"""Clear outputs and normalise metadata of notebooks, in place (hand-written tool).

Committed notebooks carry no outputs or execution counts: the book executes them when it is
built, and diffs stay readable. Every notebook also gets the same kernel (`python3`, the
environment it is run from) and loses editor-specific metadata.
Usage: ``python tools/strip_outputs.py notebooks/*.ipynb``.
"""

import sys

import nbformat

KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}


def strip(path: str) -> bool:
    """Strip one notebook; True when it changed."""
    notebook = nbformat.read(path, as_version=4)
    before = nbformat.writes(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        cell.metadata.pop("execution", None)
    notebook.metadata = {"kernelspec": KERNELSPEC, "language_info": {"name": "python"}}
    if nbformat.writes(notebook) == before:
        return False
    nbformat.write(notebook, path)
    return True


if __name__ == "__main__":
    for name in sys.argv[1:]:
        if strip(name):
            print(f"normalised {name}")
