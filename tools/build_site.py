"""Build the site from notebooks that are already executed, without running them again.

`make test` executes every chapter once, with nbmake, on a scratch copy (``build/site/notebooks``,
written back with their outputs by ``--overwrite``). This tool puts the rest of the book beside
them (pages, bibliography, table of contents, the local Sphinx extension, and `_config.yml` with
execution switched off) and runs Jupyter Book strictly: any warning fails the build. Executing the
chapters a second time inside Jupyter Book would double the slowest part of the test run.

Readers keep using ``make book``, which executes and caches the chapters itself.

Usage: ``python tools/build_site.py [SITE]`` (default ``build/site``); the HTML lands in
``SITE/_build/html``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def toc_pages() -> list[str]:
    """Every page of `_toc.yml` (root first), without its suffix."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    return [toc["root"]] + [c["file"] for part in toc["parts"] for c in part["chapters"]]


def _executed(notebook: Path) -> bool:
    """True when some code cell of the notebook has outputs (or it has no code)."""
    cells = json.loads(notebook.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    return not code or any(c["outputs"] for c in code)


def prepare(site: Path) -> None:
    """Copy every page but the executed notebooks into `site`, and a no-execution config."""
    for page in toc_pages():
        if page.startswith("notebooks/"):
            notebook = site / f"{page}.ipynb"
            if not notebook.exists() or not _executed(notebook):
                raise SystemExit(f"{notebook} is missing or was never executed: `make notebooks`")
            continue
        source = next(p for s in (".md", ".ipynb") if (p := ROOT / f"{page}{s}").exists())
        (site / page).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, site / source.relative_to(ROOT))
    for name in ["_toc.yml", "references.bib", "tools/sphinx_book.py"]:
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, site / name)
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    config["execute"]["execute_notebooks"] = "off"
    (site / "_config.yml").write_text(yaml.safe_dump(config, sort_keys=False))


def build(site: Path) -> int:
    """Run Jupyter Book on `site`, strictly; its exit status."""
    shutil.rmtree(site / "_build", ignore_errors=True)
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    command = [str(jupyter_book), "build", "--warningiserror", "--keep-going", str(site)]
    return subprocess.run(command).returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site", nargs="?", type=Path, default=ROOT / "build" / "site")
    site = parser.parse_args().site.resolve()
    prepare(site)
    return build(site)


if __name__ == "__main__":
    raise SystemExit(main())
