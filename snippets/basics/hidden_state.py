"""NumPy's global RNG: a call into code you did not write moves your numbers.

Run it from the repository root::

    python snippets/basics/hidden_state.py

`np.random.seed` seeds one hidden, process-wide generator. Anything that draws
from it (a data loader, an augmentation, a library's initialiser) advances it,
so the numbers *you* draw next depend on what ran before. An explicit
generator (`np.random.default_rng`) or an explicit JAX key has no hidden state.
"""

import jax
import numpy as np


def augment(batch):
    """Stands in for library code: it quietly draws from NumPy's global RNG."""
    return batch + np.random.normal(scale=0.01, size=batch.shape)


def show(label, values):
    print(f"{label:34} {' '.join(f'{v:.6f}' for v in np.asarray(values))}")


def global_seed(call_library):
    np.random.seed(0)
    if call_library:
        augment(np.zeros(4))
    return np.random.rand(3)


def explicit_generator(call_library):
    rng = np.random.default_rng(0)
    if call_library:
        augment(np.zeros(4))  # still draws from the global RNG, not from ours
    return rng.random(3)


def jax_key(call_library):
    key = jax.random.key(0)
    if call_library:
        augment(np.zeros(4))
    return jax.random.uniform(key, (3,))


def main() -> None:
    for name, fn in [
        ("np.random.seed(0)", global_seed),
        ("np.random.default_rng(0)", explicit_generator),
        ("jax.random.key(0)", jax_key),
    ]:
        alone, after = fn(call_library=False), fn(call_library=True)
        show(f"{name}:", alone)
        show("  ... after a library call:", after)
        print(f"  {'same numbers:':32} {bool(np.array_equal(alone, after))}")


if __name__ == "__main__":
    main()
