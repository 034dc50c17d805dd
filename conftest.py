"""Sybil wiring: every code block on every docs page is a test.

Pages: ``docs/**/*.md`` (notebooks are executed by mkdocs-jupyter at build
time). Each page is one Sybil document: its blocks run top to bottom in one
shared namespace, with a fresh temporary folder as working directory (so
``runs/`` and ``checkpoints/`` never land in the repository); JAX's PRNG flags
and NumPy's global RNG state are restored after the page.

Conventions (the details live in docs_tools/):

- ```python blocks starting with ``>>>`` are doctests: output is compared
  exactly. Other ```python blocks are executed and must print nothing.
- A ```python block holding only ``--8<-- "snippets/<chapter>/<name>.py"`` is
  included by pymdownx.snippets at build time and not run by Sybil; the
  snippet is run by its own test in ``tests/snippets/test_<chapter>.py``.
- ```console blocks are terminal transcripts: ``$ jpr …``,
  ``$ python -m jpr…`` and ``$ python snippets/….py`` commands are run and
  their output (stdout and stderr merged) compared with the lines below them.
  Only paths (the temporary folder) and ``<TIME>`` placeholders (a duration
  such as ``1.5s`` or ``830ms``) are normalised.
  EXIT STATUS CONVENTION: a command must exit 0, unless the last line of its
  expected output is ``[exit N]`` (e.g. ``[exit 2]``), which means it must
  exit with status N.
- Skipping a block needs a reason, on the line before it:
  ``<!-- skip: next "why it cannot run here" -->`` (a handful at most in the
  whole site; tests/docs/test_snippets_meta.py counts them).
- Hash provenance: every hash-like string on a page (8+ lowercase hex digits
  with at least one digit and one letter), in prose or code, must appear in
  the expected output of an executed block of the same page
  (tests/docs/test_hash_provenance.py). A stale hash fails the build.
- An HTML comment ``<!-- docs-on-failure: … -->`` on a page is appended to the
  failure report of its blocks (the canary page uses it).

``pytest --update-docs`` rewrites expected outputs in place instead of failing
(doctest outputs and console outputs, keeping ``<TIME>`` lines that still
match), and renames hashes quoted elsewhere on the page that came from an old
printed hash. Review the ``git diff``, then run ``pytest`` again. Errors (an
exception, a wrong exit status) are not rewritten. Do not combine it with
``-n`` (pytest-xdist).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The CPU code-generation target, before anything starts JAX (jpr.platform):
# the docs' printed values were recorded under it, and every `jpr` process the
# tests start inherits it through XLA_FLAGS.
from jpr.platform import pin_cpu_target

pin_cpu_target()


# One persistent XLA compilation cache for the test process and every `jpr`
# process that the tests and the docs' console blocks start: each program is
# compiled once per machine instead of once per process. It is the folder
# `jpr run` itself uses (per user, per CPU kind; JPR_COMPILATION_CACHE moves
# or disables it), so a fresh clone on a machine that has run jpr starts warm.
def _cache_dir() -> Path:
    from jpr.run_repro import compilation_cache_dir

    return compilation_cache_dir() or Path(__file__).resolve().parent / ".jax_cache"


if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(_cache_dir())
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
from docs_tools import float_bound, shared_runs, sybil_docs  # noqa: E402  (after the cache settings)

pytest_collect_file = sybil_docs.make_sybil().pytest()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-docs",
        action="store_true",
        default=False,
        help="rewrite the expected outputs of docs code blocks (and the hashes quoted "
        "from them) in place instead of failing; review the git diff afterwards",
    )
    parser.addoption(
        "--all",
        action="store_true",
        default=False,
        help="also run the slow tier (tests marked slow: real multi-process jobs "
        "killed and resumed, cluster software, the built site in Chromium, the benchmarks' "
        "smoke runs, the CPU canary on this host and under qemu)",
    )


def _remove_shared_runs() -> None:
    import shutil

    shutil.rmtree(os.environ.pop(shared_runs.ENV), ignore_errors=True)


#: How many slow-tier tests this session left out (see pytest_collection_modifyitems).
SLOW = {"left_out": 0}


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    # pyproject's addopts run the suite on pytest-xdist workers; --update-docs
    # rewrites files in place, so it runs in this one process instead.
    if config.getoption("--update-docs") and getattr(config.option, "numprocesses", None):
        config.option.numprocesses = 0


def pytest_configure(config: pytest.Config) -> None:
    # One folder per test run for processes that several tests and pages start
    # alike (docs_tools.shared_runs); xdist workers inherit it from here.
    if not hasattr(config, "workerinput") and not os.environ.get(shared_runs.ENV):
        import tempfile

        os.environ[shared_runs.ENV] = tempfile.mkdtemp(prefix="jpr-shared-runs-")
        config.add_cleanup(_remove_shared_runs)
    sybil_docs.STATE.update = config.getoption("--update-docs")
    if sybil_docs.STATE.update and getattr(config.option, "numprocesses", None):
        raise pytest.UsageError("--update-docs cannot be combined with -n (pytest-xdist)")
    if sybil_docs.STATE.update and not os.environ.get(float_bound.MEASURE_ENV):
        refusal = float_bound.update_refusal()
        if refusal:
            raise pytest.UsageError(refusal)


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: hand the counts to the controller
        workeroutput["jpr_consistency"] = dict(sybil_docs.STATE.consistency)
        workeroutput["jpr_slow_left_out"] = SLOW["left_out"]
    if not sybil_docs.STATE.update:
        return
    lines = sybil_docs.apply_updates()
    if not os.environ.get(float_bound.MEASURE_ENV):
        pages = sorted({item.nodeid.split("::", 1)[0] for item in session.items
                        if ".md::" in item.nodeid})
        if pages:
            lines.append(float_bound.measure(pages))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    for line in lines or ["--update-docs: nothing to rewrite"]:
        if reporter is not None:
            reporter.write_line(f"--update-docs: {line}")


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:  # xdist controller: a worker finished
    output = getattr(node, "workeroutput", {})
    sybil_docs.STATE.consistency.update(output.get("jpr_consistency", {}))
    # Every worker collects the whole suite: the same count from each.
    SLOW["left_out"] = max(SLOW["left_out"], output.get("jpr_slow_left_out", 0))


def pytest_terminal_summary(terminalreporter) -> None:
    notice = float_bound.session_notice(sybil_docs.STATE.consistency)
    if notice:
        terminalreporter.write_line(notice)
    if SLOW["left_out"]:
        terminalreporter.write_line(
            f"slow tier: {SLOW['left_out']} tests marked slow were not run (real "
            "multi-process jobs killed and resumed, cluster software, the site in Chromium, "
            "the benchmarks, the CPU canary on emulated CPUs); `pytest -m slow` or "
            "`pytest --all` runs them, and CI does"
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A page's blocks share one namespace: under `pytest -n N --dist loadgroup`
    # they must all run in the same worker, in order.
    for item in items:
        if item.nodeid.startswith("docs/") and ".md::" in item.nodeid:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::", 1)[0]))
    # The slow tier runs with --all, or when a -m expression chooses the tests.
    if config.getoption("--all") or config.getoption("markexpr"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        items[:] = [item for item in items if not item.get_closest_marker("slow")]
        config.hook.pytest_deselected(items=slow)
        SLOW["left_out"] = len(slow)

