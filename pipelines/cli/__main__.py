"""``python -m pipelines.cli COMMAND ...``: the ``lsnet`` command (how Ray jobs and tests start it)."""
import sys

from pipelines.cli import main

sys.exit(main())
