"""The README as the package index shows it (python/package_readme.py): no link or image that only resolves in the
repository."""

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))
from package_readme import readme  # noqa: E402


def test_index_readme_has_no_relative_links():
    text = readme()
    assert "docs/semantics.md" in text and "# flowcut-kernels" in text
    assert not re.findall(r"\]\((?!https?:|#)[^)]*\)", text)
