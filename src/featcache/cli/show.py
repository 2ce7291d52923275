"""Machine-readable output of the verbs (``--json``)."""

from __future__ import annotations

import json
from typing import Any


def print_json(obj: Any) -> None:
    """Machine-readable output of every ``--json``."""
    print(json.dumps(obj, indent=2, default=str))
