"""Log a hash per leaf at every step; find the first step and leaf where two runs part.

    python snippets/recipes/divergence_finder.py [LOG_DIR]

`log_step` appends one JSON line per step to a log file (cheap: one pass over
the bytes). `first_divergence` reads two logs and names the first step and
the first leaf whose hashes differ. Here run B has a bug from step 6 on: it
draws the noise of `dense.b` from the wrong key.
"""

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np


def log_step(log, step: int, tree) -> None:
    """Append {"step": step, "leaves": {path: hash}} to an open log file."""
    leaves = {jax.tree_util.keystr(p): hashlib.sha256(np.asarray(x).tobytes()).hexdigest()[:16]
              for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    log.write(json.dumps({"step": step, "leaves": leaves}) + "\n")


def first_divergence(log_a: Path, log_b: Path):
    """(step, leaf path) of the first difference, or None if the logs agree."""
    with open(log_a) as fa, open(log_b) as fb:
        for line_a, line_b in zip(fa, fb, strict=False):  # the common prefix
            a, b = json.loads(line_a), json.loads(line_b)
            if a["step"] != b["step"]:
                raise ValueError(f"the logs are not aligned: step {a['step']} vs {b['step']}")
            for path in sorted(a["leaves"].keys() | b["leaves"].keys()):
                if a["leaves"].get(path) != b["leaves"].get(path):
                    return a["step"], path
    return None


def train(log_path: Path, steps: int = 10, bug_from: int | None = None) -> None:
    key = jax.random.key(0)
    params = {"dense": {"w": np.zeros((3, 3), np.float32), "b": np.zeros(3, np.float32)}}
    with open(log_path, "w") as log:
        for step in range(steps):
            k_w, k_b = jax.random.split(jax.random.fold_in(key, step))
            if bug_from is not None and step >= bug_from:
                k_b = jax.random.fold_in(k_b, 1)  # the bug: a different key for `b`
            params = {"dense": {"w": params["dense"]["w"] + jax.random.normal(k_w, (3, 3)),
                                "b": params["dense"]["b"] + jax.random.normal(k_b, (3,))}}
            log_step(log, step, params)  # the state after this step


def main(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    a, b, c = (directory / f"{name}.jsonl" for name in ("a", "b", "c"))
    train(a)
    train(b, bug_from=6)
    train(c)
    print(f"run A vs run A again: {first_divergence(a, c)}")
    step, leaf = first_divergence(a, b)
    print(f"run A vs run B: first divergent step {step}, leaf {leaf}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:  # deleted afterwards
            main(Path(tmp))
