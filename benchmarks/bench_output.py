"""Where every benchmark's figures go: printed by the script, and as JSON with `--json PATH`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(path: Path | None, payload: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
