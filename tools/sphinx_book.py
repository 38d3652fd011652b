"""A small Sphinx extension for the book's site (loaded through `_config.yml`'s local_extensions).

Hand-written, because no package does these two things:

- A bibliography style, ``authoryear``: every work gets one label, "Vaswani et al., 2017", used
  both in the text (with ``bibtex_reference_style = "label"``) and in the list, with "2024a",
  "2024b" where one author has two works in a year. Names written in LaTeX (``Doll{\\'a}r``) are
  decoded to Unicode, and a work with a URL and an arXiv eprint prints one link, not two.
  pybtex ships only numeric and "alpha" ("GDG+17") labels.
- Each inline script once per page. Sphinx 7.4 emits an inline script that an extension adds
  after the builder started (sphinx-thebe's and sphinx-togglebutton's settings) twice, once
  registered with the file name None and once with '', which it then fails to recognise as the
  same; the browser then logs "Identifier 'THEBE_JS_URL' has already been declared".
- Formatter pragmas (``# fmt: skip``, ``# fmt: off``, ``# fmt: on``) are removed from the code
  cells shown on the site. They tell ruff to leave a hand-aligned line alone, which matters to
  authors, not readers.
"""

from __future__ import annotations

import codecs
import re
from collections import Counter

import latexcodec  # noqa: F401  (registers the "ulatex" codec)
from docutils import nodes
from pybtex.plugin import register_plugin
from pybtex.style.formatting.unsrt import Style as UnsrtStyle
from pybtex.style.labels import BaseLabelStyle
from pybtex.style.template import field, href, join, optional, sentence

_PRAGMA = re.compile(r"[ \t]*# fmt: (?:skip|off|on)[ \t]*$", flags=re.MULTILINE)


def _plain(latex: str) -> str:
    """A BibTeX name as plain text: ``Doll{\\'a}r`` -> ``Dollár``, ``{bloc97}`` -> ``bloc97``."""
    return codecs.decode(latex, "ulatex").replace("{", "").replace("}", "")


def _authors(entry) -> str:
    people = entry.persons.get("author") or entry.persons.get("editor") or []
    names = [_plain(" ".join(p.prelast_names + p.last_names)) for p in people]
    if not names:
        return _plain(entry.fields.get("title", entry.key))
    if len(names) == 1:
        return names[0]
    if len(names) == 2 and str(people[1]) != "others":
        return f"{names[0]} and {names[1]}"
    return f"{names[0]} et al."


class AuthorYearLabels(BaseLabelStyle):
    """Labels "Author, year", "A and B, year", "A et al., year"; "a"/"b" where they collide."""

    def format_labels(self, sorted_entries):
        entries = list(sorted_entries)
        bases = [f"{_authors(e)}, {e.fields.get('year', 'n.d.')}" for e in entries]
        counts, seen = Counter(bases), Counter()
        for base in bases:
            if counts[base] == 1:
                yield base
            else:
                yield base + "abcdefghijklmnopqrstuvwxyz"[seen[base]]
                seen[base] += 1


class AuthorYearStyle(UnsrtStyle):
    """pybtex's unsrt layout, sorted by author and year, with author-year labels."""

    default_sorting_style = "author_year_title"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.label_style = AuthorYearLabels()
        self.format_labels = self.label_style.format_labels  # the base class bound the old one

    def format_web_refs(self, e):
        # One link per work: the URL when there is one, else the arXiv eprint, else the DOI.
        if "url" in e.fields:
            url = field("url", raw=True)
            return sentence[href(url)[url]]
        if "eprint" in e.fields:
            return sentence[optional[self.format_eprint(e)]]
        return sentence[optional[self.format_doi(e)]]

    def format_eprint(self, e):
        url = join["https://arxiv.org/abs/", field("eprint", raw=True)]
        return href(url)[join["arXiv:", field("eprint", raw=True)]]


def _strip_pragmas(app, doctree) -> None:
    for block in doctree.findall(nodes.literal_block):
        text = block.astext()
        if "# fmt:" not in text:
            continue
        kept = _PRAGMA.sub("", text).split("\n")
        # A line that held only "# fmt: off" / "# fmt: on" is now empty: drop it.
        original = text.split("\n")
        cleaned = "\n".join(
            k for k, o in zip(kept, original, strict=True) if k.strip() or not o.strip()
        )
        block.children = []
        block.append(nodes.Text(cleaned))
        block.rawsource = cleaned


def _one_of_each_script(app, pagename, templatename, context, doctree) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, unique = set(), []
    for script in scripts:
        key = (script.filename or "", script.priority, tuple(sorted(script.attributes.items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    scripts[:] = unique  # the builder restores its own list after each page


def setup(app):
    register_plugin("pybtex.style.formatting", "authoryear", AuthorYearStyle)
    app.connect("doctree-read", _strip_pragmas)
    app.connect("html-page-context", _one_of_each_script)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
