"""``jpr launch``: environment, prefixed streaming, failure propagation, exit codes.

These processes are plain Python (no JAX), so the tests are fast; the launcher
with real ``jax.distributed`` processes is tested in ``test_distributed.py``.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

import pytest

from jpr.cli import main
from jpr.errors import JprError
from jpr.launch import launch, resolve_command


def py(code: str) -> list[str]:
    return ["python", "-c", code]


def run(code: str, n: int = 2, **kw) -> tuple[int, list[str], list[str]]:
    out, err = io.StringIO(), io.StringIO()
    status = launch(py(code), n, stdout=out, stderr=err, **kw)
    return status, out.getvalue().splitlines(), err.getvalue().splitlines()


def test_each_process_gets_the_job_and_its_index():
    code = (
        "import os; e = os.environ; "
        "print(e['JPR_PROCESS_ID'], e['JPR_NUM_PROCESSES'], e['JAX_COORDINATOR_ADDRESS'])"
    )
    status, out, err = run(code, n=3)
    assert (status, err) == (0, [])
    rows = sorted(line.split() for line in out)
    assert [r[:3] for r in rows] == [["[0]", "0", "3"], ["[1]", "1", "3"], ["[2]", "2", "3"]]
    addresses = {r[3] for r in rows}
    assert len(addresses) == 1 and addresses.pop().startswith("127.0.0.1:")


def test_lines_are_streamed_with_a_prefix_on_the_right_stream():
    code = (
        "import os, sys; i = os.environ['JPR_PROCESS_ID']; "
        "print('out', i); print('err', i, file=sys.stderr); print('partial', end='')"
    )
    status, out, err = run(code)
    assert status == 0
    assert sorted(out) == ["[0] out 0", "[0] partial", "[1] out 1", "[1] partial"]
    assert sorted(err) == ["[0] err 0", "[1] err 1"]


def test_lines_arrive_while_the_process_still_runs():
    # Process 0 prints, then waits for a file that the test writes only after
    # seeing the line: a launcher that buffered until exit would time out.
    class Watch(io.StringIO):
        seen = False

        def write(self, s):
            if "ready" in s:
                Watch.seen = True
                with open(flag, "w") as f:
                    f.write("go")
            return super().write(s)

    flag = os.path.abspath(f"launch-flag-{os.getpid()}")
    code = (
        "import os, time; print('ready', flush=True)\n"
        f"while not os.path.exists({flag!r}): time.sleep(0.01)"
    )
    try:
        status = launch(py(code), 1, stdout=Watch(), stderr=io.StringIO(), timeout=20)
    finally:
        if os.path.exists(flag):
            os.remove(flag)
    assert (status, Watch.seen) == (0, True)


def test_one_failure_stops_the_others_without_hanging():
    # Process 1 fails at once; process 0 would sleep for a minute (a peer
    # blocked in a collective looks the same from outside).
    code = (
        "import os, sys, time\nif os.environ['JPR_PROCESS_ID'] == '1': sys.exit(3)\ntime.sleep(60)"
    )
    t = time.monotonic()
    status, _, err = run(code, grace=0.2)
    assert time.monotonic() - t < 20
    assert status == 3
    assert err == ["jpr launch: error: process 1 exited with status 3; stopped process 0"]


def test_exit_status_is_the_worst_of_the_processes_that_failed():
    code = "import os, sys; sys.exit({'0': 0, '1': 5, '2': 3}[os.environ['JPR_PROCESS_ID']])"
    status, _, err = run(code, n=3, grace=10)
    assert status == 5
    assert err == [
        "jpr launch: error: process 1 exited with status 5; process 2 exited with status 3"
    ]


def test_same_failure_everywhere_is_reported_once():
    status, _, err = run("import sys; sys.exit(2)", grace=10)
    assert (status, err) == (2, ["jpr launch: error: processes 0 and 1 exited with status 2"])


def test_a_signal_counts_as_128_plus_its_number():
    code = (
        "import os, signal\nif os.environ['JPR_PROCESS_ID'] == '0': "
        "os.kill(os.getpid(), signal.SIGKILL)"
    )
    status, _, err = run(code, grace=10)
    assert status == 128 + signal.SIGKILL
    assert err == ["jpr launch: error: process 0 was killed by SIGKILL"]


def test_timeout_stops_everything_with_124():
    status, _, err = run("import time; time.sleep(60)", timeout=0.5)
    assert status == 124
    assert err == ["jpr launch: error: timed out after 0.5s; stopped processes 0 and 1"]


def test_sigterm_to_the_launcher_leaves_no_process_behind(tmp_path):
    code = (
        "import os, time; i = os.environ['JPR_PROCESS_ID']; "
        "open(f'pid{i}.tmp', 'w').write(str(os.getpid())); "
        "os.rename(f'pid{i}.tmp', f'pid{i}'); time.sleep(60)"
    )
    p = subprocess.Popen(
        [sys.executable, "-m", "jpr", "launch", "-n", "2", "--", *py(code)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not all((tmp_path / f"pid{i}").exists() for i in (0, 1)):
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.02)
    pids = [int((tmp_path / f"pid{i}").read_text()) for i in (0, 1)]
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=20) == 128 + signal.SIGTERM
    deadline = time.monotonic() + 10
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if _alive(pid)]
        time.sleep(0.05)
    assert alive == []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for practical purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def test_jpr_and_python_mean_this_jpr_and_this_interpreter():
    assert resolve_command(["jpr", "run"]) == [sys.executable, "-m", "jpr", "run"]
    assert resolve_command(["python3", "x.py"]) == [sys.executable, "x.py"]
    assert resolve_command(["sh", "-c", "true"]) == ["sh", "-c", "true"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-n", "2"], "no command given: jpr launch -n N -- CMD ..."),
        (["-n", "2", "--"], "no command given: jpr launch -n N -- CMD ..."),
        (["-n", "0", "--", "python", "-c", "pass"], "-n must be between 1 and 64, got 0"),
        (
            ["-n", "2", "--port", "0", "--", "python", "-c", "pass"],
            "--port must be in [1, 65535], got 0",
        ),
        (["-n", "2", "--", "no-such-command-xyz"], "command not found: no-such-command-xyz"),
        (["--", "python"], "the following arguments are required: -n/--num-processes"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(["launch", *argv]) == 2
    out, err = capsys.readouterr()
    assert (out, err) == ("", f"jpr launch: error: {message}\n")


def test_launch_from_the_command_line(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "jpr",
            "launch",
            "-n",
            "2",
            "--",
            "python",
            "-c",
            "import os; print('hello from', os.environ['JPR_PROCESS_ID'])",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.splitlines()) == ["[0] hello from 0", "[1] hello from 1"]


def test_launch_refuses_nonsense_in_process():
    with pytest.raises(JprError, match="--timeout must be positive"):
        launch(py("pass"), 1, timeout=0)
    with pytest.raises(JprError, match="--grace must be non-negative"):
        launch(py("pass"), 1, grace=-1)


def test_sigterm_to_the_launcher_is_passed_on_to_every_process(tmp_path):
    # Each process stops the way `jpr run` does on a SIGTERM: it says so and
    # exits 143 by itself; the launcher exits 143 and does not restart.
    code = (
        "import os, signal, sys, time; i = os.environ['JPR_PROCESS_ID']\n"
        "def stop(s, f):\n"
        "    print('stopped', i, flush=True); sys.exit(143)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "open(f'ready{i}', 'w').close(); time.sleep(60)\n"
    )
    p = subprocess.Popen(
        [sys.executable, "-m", "jpr", "launch", "-n", "2", "--restart-on-preempt", "3", "--",
         *py(code)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 30
    while not all((tmp_path / f"ready{i}").exists() for i in (0, 1)):
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 143
    assert sorted(out.splitlines()) == ["[0] stopped 0", "[1] stopped 1"]
    assert err.splitlines() == [
        "jpr launch: error: processes 0 and 1 exited with status 143",
        "jpr launch: stopped by SIGTERM (passed on to every process)",
    ]


def test_no_function_of_the_launcher_is_over_100_lines():
    import ast
    import inspect

    import jpr.launch

    tree = ast.parse(inspect.getsource(jpr.launch))
    long = {n.name: n.end_lineno - n.lineno + 1 for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef) and n.end_lineno - n.lineno + 1 > 100}
    assert long == {}
