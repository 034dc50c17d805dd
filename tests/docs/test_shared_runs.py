"""docs_tools.shared_runs: a process that several tests start alike runs once per test run."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

from docs_tools import shared_runs

PID = [sys.executable, "-c", "import os, sys; print(os.getpid()); print('err', file=sys.stderr)"]


def test_the_second_ask_reads_the_first_run(tmp_path, monkeypatch):
    monkeypatch.setenv(shared_runs.ENV, str(tmp_path))
    env = shared_runs.terminal_env()
    first = shared_runs.run_once(PID, cwd=tmp_path, env=env)
    again = shared_runs.run_once(PID, cwd=tmp_path, env=env)
    assert first.returncode == again.returncode == 0
    assert first.stdout == again.stdout and first.stdout.endswith("err\n")  # one process
    other = shared_runs.run_once(PID, cwd=tmp_path, env=shared_runs.terminal_env({"X": "1"}))
    assert other.stdout != first.stdout  # another environment is another run


def test_concurrent_asks_start_one_process(tmp_path, monkeypatch):
    monkeypatch.setenv(shared_runs.ENV, str(tmp_path))
    env = shared_runs.terminal_env()
    outputs = []
    threads = [threading.Thread(target=lambda: outputs.append(
        shared_runs.run_once(PID, cwd=tmp_path, env=env).stdout)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(outputs) == 4 and len(set(outputs)) == 1


def test_a_changed_script_is_another_run(tmp_path, monkeypatch):
    monkeypatch.setenv(shared_runs.ENV, str(tmp_path / "store"))
    (tmp_path / "store").mkdir()
    script = tmp_path / "s.py"
    script.write_text("print(1)\n")
    argv = [sys.executable, "s.py"]
    assert shared_runs.run_once(argv, cwd=tmp_path).stdout == "1\n"
    script.write_text("print(2)\n")
    assert shared_runs.run_once(argv, cwd=tmp_path).stdout == "2\n"


def test_without_a_store_every_ask_runs(tmp_path, monkeypatch):
    monkeypatch.delenv(shared_runs.ENV, raising=False)
    first = shared_runs.run_once(PID, cwd=tmp_path)
    assert first.stdout != shared_runs.run_once(PID, cwd=tmp_path).stdout


def test_the_suite_has_a_store_shared_by_its_workers():
    assert Path(os.environ[shared_runs.ENV]).is_dir()
