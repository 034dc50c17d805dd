"""MkDocs hooks (mkdocs.yml ``hooks:``): the notebooks run under jpr's CPU target.

mkdocs-jupyter executes the notebooks in kernels that inherit this process's
environment, so pinning here (see :mod:`jpr.platform`) gives them the same
``XLA_FLAGS`` as ``jpr run`` and the docs tests.
"""

from __future__ import annotations

from typing import Any


def on_config(config: Any) -> Any:
    from jpr.platform import pin_cpu_target

    pin_cpu_target()
    return config
