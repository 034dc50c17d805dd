"""The ```console block convention (docs_tools/console.py) and its Sybil evaluator."""

from __future__ import annotations

import pytest
from docs_tools import console
from docs_tools.markdown import DocsSyntaxError, parse_page
from docs_tools.sybil_docs import run_document
from sybil.example import SybilFailure


def test_commands_outputs_and_exit_codes():
    commands = console.parse_commands(
        "$ jpr run --seed 0 \\\n"
        "    --out runs/a.json\n"
        "step 10 loss 2.30\n"
        "\n"
        "$ python -m jpr.compare runs/a.json runs/nope.json\n"
        "error: runs/nope.json: no such file\n"
        "[exit 2]\n"
    )
    first, second = commands
    assert first.text == "jpr run --seed 0 --out runs/a.json"
    assert first.expected == ["step 10 loss 2.30"] and first.exit_code == 0
    assert second.expected == ["error: runs/nope.json: no such file"]
    assert second.exit_code == 2
    assert console.render_commands(commands).endswith("[exit 2]\n")


@pytest.mark.parametrize(
    ("command", "runs"),
    [
        ("$ jpr compare a.json b.json", True),
        ("$ python -m jpr.run_repro --steps 5", True),
        ("$ python -m jpr --help", True),
        ("$ python snippets/basics/hidden_state.py", True),
        ("$ XLA_FLAGS=--xla_force_host_platform_device_count=2 jpr run", True),
        ("$ pip install jpr", False),
        ("$ python -m pip install jpr", False),
        ("$ python other/script.py", False),
        ("$ git clone https://example.org/jpr.git", False),
    ],
)
def test_which_commands_are_executed(command, runs):
    (cmd,) = console.parse_commands(command + "\n")
    assert cmd.executable is runs


def test_time_placeholder_and_paths(tmp_path):
    assert console.line_matches("took <TIME>", "took 1.25s")
    assert console.line_matches("took <TIME> (<TIME> per step)", "took 830 ms (8.3ms per step)")
    assert not console.line_matches("took <TIME>", "took 1.25 steps")
    assert not console.line_matches("hash a9a8ca9f", "hash a9a8ca9e")
    out = f"wrote {tmp_path}/runs/a.json\ncwd {tmp_path}\n\n"
    assert console.normalise(out, tmp_path) == ["wrote runs/a.json", "cwd ."]
    # --update-docs keeps lines that still match, placeholders included.
    assert console.new_expected(["took <TIME>", "hash 00"], ["took 2s", "hash 01"]) == [
        "took <TIME>",
        "hash 01",
    ]


def _snippet(docs_state, name, code):
    path = docs_state.snippets_dir / name
    path.write_text(code, encoding="utf-8")


def test_console_block_passes_fails_and_checks_exit_status(docs_state, write):
    _snippet(
        docs_state,
        "hello.py",
        "import os, sys\n"
        "print('cwd is temporary:', not os.path.exists('docs'))\n"
        "print('to stderr', file=sys.stderr)\n"
        "open('runs.txt', 'w').write('x')\n"
        "sys.exit(int(sys.argv[1]))\n",
    )
    good = write(
        "good.md",
        """
        ```console
        $ python snippets/hello.py 0
        cwd is temporary: True
        to stderr
        $ python snippets/hello.py 3
        cwd is temporary: True
        to stderr
        [exit 3]
        ```
        """,
    )
    run_document(good)
    assert not (good.parent / "runs.txt").exists()  # written in the page's folder

    bad_exit = write("bad.md", good.read_text().replace("[exit 3]", "[exit 4]"))
    with pytest.raises(SybilFailure, match="exit status: expected 4, got 3"):
        run_document(bad_exit)
    bad_output = write("bad2.md", good.read_text().replace("to stderr\n[exit", "stderr\n[exit"))
    with pytest.raises(SybilFailure, match=r"\+to stderr"):
        run_document(bad_output)


def test_blocks_that_do_not_run(write):
    page = parse_page(
        write(
            "static.md",
            """
            ```console
            $ pip install jpr
            Successfully installed jpr
            ```

            ```bash
            jpr run --out runs/a.json
            ```
            """,
        )
    )
    assert [b.kind for b in page.blocks] == ["static", "static"]
    with pytest.raises(DocsSyntaxError, match="runs all its commands or none"):
        parse_page(write("mixed.md", "```console\n$ pip install jpr\n$ jpr doctor\n```\n"))


def test_python_blocks_must_not_print_unseen_output(docs_state, write):
    page = write("p.md", "```python\nprint('hidden')\n```\n")
    with pytest.raises(SybilFailure, match="write it as a doctest"):
        run_document(page)


def test_skip_needs_a_reason(docs_state, write):
    with pytest.raises(DocsSyntaxError, match="needs a written reason"):
        parse_page(write("s.md", "<!-- skip: next -->\n```python\n1/0\n```\n"))
    page = write("s2.md", '<!-- skip: next "needs a TPU" -->\n```python\n1/0\n```\n')
    with pytest.raises(pytest.skip.Exception, match="needs a TPU"):
        run_document(page)


def test_page_namespace_is_shared_top_to_bottom(docs_state, write):
    page = write(
        "ns.md",
        """
        ```python
        x = 20
        ```

        Text between blocks.

        === "A tab"

            ```python
            >>> x + 1
            21
            ```
        """,
    )
    run_document(page)
