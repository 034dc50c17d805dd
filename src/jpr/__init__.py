"""jpr: the JAX PRNG Reproducibility Playbook library."""

__version__ = "0.1.0"
