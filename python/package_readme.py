"""The README as the package index shows it (setup.py's long description)."""

import re
from pathlib import Path


def readme() -> str:
    """README.md for the package index, where the repository's relative paths do not resolve: a link to one of its
    files becomes the path in the source distribution (docs/ ships there; see MANIFEST.in), an image is dropped."""
    text = Path(__file__).resolve().parents[1].joinpath("README.md").read_text(encoding="utf-8")
    text = re.sub(r"!\[[^\]]*\]\((?!https?:)[^)]*\)\n?", "", text)

    def local(link: re.Match) -> str:
        words, path = link.group(1), link.group(2)
        return f"{words} (in the source distribution)" if words.strip("`") == path else f"{words} (`{path}`)"

    return re.sub(r"\[([^\]]+)\]\((?!https?:|#)([^)#]+)(#[^)]*)?\)", local, text)

