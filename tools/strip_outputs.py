"""Clear outputs and execution counts from notebooks, in place (hand-written tool).

Committed notebooks carry no outputs: the book executes them when it is built, and diffs stay
readable. Usage: ``python tools/strip_outputs.py notebooks/*.ipynb``.
"""

import sys

import nbformat


def strip(path: str) -> bool:
    """Strip one notebook; True when it changed."""
    notebook = nbformat.read(path, as_version=4)
    changed = False
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        if cell.outputs or cell.execution_count is not None:
            cell.outputs, cell.execution_count = [], None
            changed = True
    if changed:
        nbformat.write(notebook, path)
    return changed


if __name__ == "__main__":
    for name in sys.argv[1:]:
        if strip(name):
            print(f"stripped {name}")
