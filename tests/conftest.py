"""The test layers' shared imports: tests/lib (the lab and the helpers) and the repo root (ncctl,
proto) go on sys.path for tests/unit and tests/e2e alike. Fixtures live with their layer."""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS / "lib"))
sys.path.insert(0, str(TESTS.parent))
