"""Build or serve dlfs's API reference with pdoc, in seconds on every Python.

    python docs/api.py                 # serve it on localhost and open a browser
    python docs/api.py -o build/api    # write the HTML to build/api/ (what CI does)

Other pdoc options pass through (``python docs/api.py --help``).  The pages
leave out pdoc's "View Source" panels (dlfs.py itself is the source, one file):
with them every class repeats its methods' code and the page grows from 0.6 MB
to 4.6 MB; ``--show-source`` brings them back.

Plain ``pdoc dlfs.py`` works too, but before Python 3.13 slowly (about a minute
of CPU): there ``inspect.getsource(cls)`` parses the whole module again for
every class (3.13 reads ``cls.__firstlineno__`` instead), and pdoc asks for the
source of each of dlfs's ~65 classes twice, about 130 parses of an 8,000-line
file.  This script keeps the parse of each source text for the length of the
build, so dlfs.py is parsed once.
"""

from __future__ import annotations

import ast
import functools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _remember_parses() -> None:
    """``ast.parse`` of a source text seen before returns the same tree (inspect
    and pdoc only read the trees)."""
    parse = ast.parse

    @functools.cache
    def cached(source: str, filename: str, mode: str) -> ast.AST:
        return parse(source, filename, mode)

    def remembering(source, filename="<unknown>", mode="exec", **options):  # type: ignore[no-untyped-def]
        if options or not isinstance(source, str):
            return parse(source, filename, mode, **options)
        return cached(source, str(filename), mode)

    ast.parse = remembering  # type: ignore[assignment]


def main(argv: list[str] | None = None) -> None:
    if sys.version_info < (3, 13):
        _remember_parses()
    sys.path.insert(0, str(ROOT))  # this checkout's dlfs.py
    import pdoc.__main__

    args = sys.argv[1:] if argv is None else argv
    pdoc.__main__.cli(["--no-show-source", *args, str(ROOT / "dlfs.py")])


if __name__ == "__main__":
    main()
