# The text in corpus.txt comes from CPython's standard-library docstrings (PSF License Version 2).
"""Write ``corpus.txt``: the docstrings of a fixed list of standard-library modules, as plain ASCII.

    python bench/data/make_corpus.py            # rewrites bench/data/corpus.txt

Run once; the output is committed so that bench/char_lm.py needs neither network nor this script.
The text depends on the Python version that runs it (docstrings change between releases), which
is why the file, not the script, is the data set: the committed corpus.txt was made with CPython
3.11.7.

For each module, in the order of MODULES: the module's docstring, then, in sorted name order, the
docstring of every class and function defined in that module (not re-exported ones), and for a
class the docstrings of its own methods, also in sorted order. ``inspect.getdoc`` cleans the
indentation (and falls back to a base class's docstring when a class has none); a docstring that
was already written is skipped, so inherited boilerplate such as Exception's appears once.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
import unicodedata

# Pure-Python modules with long docstrings (each gives 5-40 KB); modules implemented in C
# (datetime, decimal) and packages whose __init__ has little text (asyncio) were left out.
MODULES = (
    "argparse", "ast", "calendar", "collections", "configparser", "contextlib", "csv",
    "dataclasses", "difflib", "email.message", "enum", "fractions", "ftplib", "functools", "heapq",
    "http.client", "imaplib", "inspect", "ipaddress", "json", "logging", "mailbox", "os",
    "pathlib", "pickle", "pydoc", "random", "re", "shutil", "smtplib", "socket", "statistics",
    "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "typing",
    "unittest.case", "urllib.parse", "urllib.request", "uuid", "warnings", "zipfile",
)

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus.txt")


def _docs_of(module) -> list[str]:
    """The raw docstrings of ``module``, its classes and functions, and their methods, in order."""
    docs = [inspect.getdoc(module)]
    for _, obj in sorted(vars(module).items()):
        if getattr(obj, "__module__", None) != module.__name__:
            continue  # imported from elsewhere: it belongs to its own module's text
        if inspect.isfunction(obj):
            docs.append(inspect.getdoc(obj))
        elif inspect.isclass(obj):
            docs.append(inspect.getdoc(obj))
            for _, member in sorted(vars(obj).items()):
                if inspect.isfunction(member):
                    docs.append(inspect.getdoc(member))
    return [d for d in docs if d]


def to_ascii(text: str) -> str:
    """NFKD-decompose (so accented letters keep their base letter), then drop what is not ASCII."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return text.replace("\t", "    ").replace("\r", "")


def build() -> str:
    seen: set[str] = set()
    parts: list[str] = []
    for name in MODULES:
        for doc in _docs_of(importlib.import_module(name)):
            doc = to_ascii(doc).strip()
            if doc and doc not in seen:
                seen.add(doc)
                parts.append(doc)
    text = "\n\n".join(parts)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)  # at most one blank line in a row
    return text + "\n"


def main() -> None:
    text = build()
    with open(OUT, "w", encoding="ascii", newline="\n") as f:
        f.write(text)
    print(f"wrote {OUT}: {len(text):,} characters, {len(set(text))} distinct, "
          f"from {len(MODULES)} modules (Python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
