"""Where the checkout is: the one ``REPO_ROOT`` the pipelines resolve configs, job specs, benchmark specs
and the default MLflow store against."""
from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
