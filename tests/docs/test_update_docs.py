"""`pytest --update-docs` rewrites expected outputs in place (docs_tools/sybil_docs.py)."""

from __future__ import annotations

import pytest
from docs_tools import REPO_ROOT, sybil_docs
from docs_tools.markdown import parse_page
from docs_tools.provenance import unproven
from docs_tools.sybil_docs import apply_updates, run_document
from sybil.example import SybilFailure

PAGE = """
# A page

The digest starts with `{prose}`, see below.

```python
>>> import hashlib
>>> hashlib.sha256(b"jpr").hexdigest()
'{old}'
>>> 6 * 7
41
>>> print("one\\n\\ntwo")
```

```console
$ python snippets/show.py
digest {short}
took <TIME>
[exit 1]
```
"""

SNIPPET = """
import hashlib, sys
print("digest", hashlib.sha256(b"jpr").hexdigest()[:12])
print("took 0.25s")
sys.exit(1)
"""


def _page(write, real: str, wrong: str):
    return write(
        "page.md", PAGE.format(old=wrong, prose=wrong[:12], short=wrong[:12])
    ), PAGE.format(old=real, prose=real[:12], short=real[:12])


def test_update_docs_rewrites_outputs_and_quoted_hashes(docs_state, write):
    import hashlib

    (docs_state.snippets_dir / "show.py").write_text(SNIPPET)
    real = hashlib.sha256(b"jpr").hexdigest()
    wrong = "0123456789abcdef" * 4
    path, fixed = _page(write, real, wrong)

    with pytest.raises(SybilFailure):
        run_document(path)

    docs_state.update = True
    run_document(path)  # records the new outputs instead of failing
    report = apply_updates()
    assert report and "rewrote 2 block(s)" in report[0]
    text = path.read_text()
    expected = (
        fixed.lstrip("\n")
        .replace("41\n", "42\n")
        .replace(
            '>>> print("one\\n\\ntwo")\n', '>>> print("one\\n\\ntwo")\none\n<BLANKLINE>\ntwo\n'
        )
    )
    assert text == expected  # outputs, the console line and the prose prefix
    assert "took <TIME>" in text  # a matching placeholder line is kept

    docs_state.update = False
    run_document(path)  # now it passes as written
    assert not unproven(parse_page(path))


def test_update_docs_does_not_rewrite_errors(docs_state, write):
    docs_state.update = True
    path = write("err.md", "```python\n>>> 1 / 0\n0\n```\n")
    with pytest.raises(SybilFailure, match="ZeroDivisionError"):
        run_document(path)
    assert apply_updates() == []


def test_update_docs_on_a_copy_of_a_real_page(docs_state, tmp_path):
    """Damage every printed output of a copy of docs/basics.md; --update-docs restores it."""
    original = (REPO_ROOT / "docs" / "basics.md").read_text()
    page = parse_page(REPO_ROOT / "docs" / "basics.md")
    damaged = original
    for a, b in reversed(page.output_spans()):
        damaged = damaged[:a] + damaged[a:b].replace("0", "9") + damaged[b:]
    assert damaged != original
    copy = tmp_path / "basics.md"
    copy.write_text(damaged)
    docs_state.snippets_dir = REPO_ROOT / "snippets"
    docs_state.update = True
    run_document(copy)
    apply_updates()
    assert copy.read_text() == original


def test_update_docs_option_is_registered(request):
    # conftest.py registers it; off unless asked for.
    assert request.config.getoption("--update-docs") is sybil_docs.STATE.update
