"""Machine-readable output of the verbs (``--json``)."""

from __future__ import annotations

import json
from typing import Any

from .._util import finite_json


def print_json(obj: Any) -> None:
    """Machine-readable output of every ``--json`` (a non-finite number is null: valid JSON)."""
    print(json.dumps(finite_json(obj), indent=2, default=str, allow_nan=False))
