"""A checkpoint folder on a disk that fills up: 600 KiB of tmpfs (Linux, as root).

The run stops at the first checkpoint that does not fit: one line, exit
status 2, every checkpoint before it intact. With room made (here: every
checkpoint but the newest moved elsewhere) the same command, now with
``--keep 2``, resumes from the newest and runs to the end in the same 600 KiB.
How many checkpoints fit varies a little (Orbax compresses the arrays, and how
it splits them into files depends on timing). State hashes are left
out of the transcript, and so is the final loss: they depend on the machine.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile

JOB = ["run", "--steps", "100", "--seed", "3", "--save-every", "10",
       "--checkpoint-dir", "small/ck", "--restore-from", "latest"]


def in_a_process(args: list[str], cwd: str) -> tuple[int, str]:
    """``jpr ARGS`` as a command: (exit status, stdout and stderr)."""
    r = subprocess.run([sys.executable, "-m", "jpr", *args], cwd=cwd,
                       capture_output=True, text=True)
    return r.returncode, r.stdout + r.stderr


def transcript(cwd: str, run=in_a_process) -> str:
    """Fill a 600 KiB tmpfs mounted at ``cwd/small`` with checkpoints; what a terminal shows."""
    lines = []

    def jpr(*args: str) -> None:
        lines.append("$ jpr " + " ".join(args))
        code, output = run(list(args), cwd)
        for line in output.splitlines():
            line = re.sub(r" \(state_hash [0-9a-f]{16}( verified)?\)", "", line)
            line = re.sub(r", state_hash [0-9a-f]{16}\)", ")", line)
            if not re.match(r"(state_)?hash +[0-9a-f]{64}$|final step ", line):
                lines.append(line.rstrip())
        if code:
            lines.append(f"[exit {code}]")

    jpr(*JOB)
    jpr("verify", "small/ck")
    # Room made: every checkpoint but the newest moved off the small disk.
    ck = os.path.join(cwd, "small", "ck")
    steps = sorted(int(n) for n in os.listdir(ck) if n.isdigit())
    os.mkdir(os.path.join(cwd, "elsewhere"))
    for step in steps[:-1]:
        shutil.move(os.path.join(ck, str(step)), os.path.join(cwd, "elsewhere"))
    jpr(*JOB, "--keep", "2")
    jpr("verify", "small/ck")
    return "\n".join(lines) + "\n"


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        small = os.path.join(d, "small")
        os.mkdir(small)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", small], check=True)
        try:
            print(transcript(d), end="")
        finally:
            subprocess.run(["umount", small], check=True)


if __name__ == "__main__":
    main()
