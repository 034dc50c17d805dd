"""A Griffe extension that reads jpr's docstrings the way Google's guide writes them.

- ``Example:`` (singular) opens an examples section, as in Google's style guide
  and Sphinx Napoleon; Griffe only knows ``Examples:`` and would otherwise
  render the ``>>>`` lines as nested block quotes.
- Sphinx roles (``:func:`leaf_hashes```) become inline code instead of
  showing their role markup.

Loaded by mkdocstrings (``extensions:`` in mkdocs.yml); it only touches the
text that the docs site renders, never the library.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

_EXAMPLE_RE = re.compile(r"^(?P<indent>[ \t]*)Example:[ \t]*$", re.MULTILINE)
_ROLE_RE = re.compile(
    r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj|const):`~?(?P<name>[^`]+)`"
)


def normalise(text: str) -> str:
    """The docstring text with the two rewrites above applied."""
    text = _EXAMPLE_RE.sub(r"\g<indent>Examples:", text)
    return _ROLE_RE.sub(r"`\g<name>`", text)


class GoogleDocstrings(Extension):
    """Normalise every docstring before mkdocstrings parses it."""

    def on_object(self, *, obj: Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = normalise(obj.docstring.value)
