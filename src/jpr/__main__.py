"""``python -m jpr`` is the ``jpr`` command."""

import sys

from jpr.cli import main

sys.exit(main())
