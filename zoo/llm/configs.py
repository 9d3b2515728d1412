"""JSON configs that offline searches write and ``sparse_prefill(..., config_path=...)`` reads.

Each config is a JSON object with a ``kind`` that names what wrote it (MInference's pattern
search, XAttention's threshold profiling); the readers check the kind before the contents.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["read_json_config", "write_json_config"]


def write_json_config(config: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=1))
    return path


def read_json_config(path: str | Path, kind: str, what: str) -> dict[str, Any]:
    """The JSON object at ``path`` if its ``kind`` is ``kind``; clear errors naming ``config_path`` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config_path: no such file {path}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"config_path: {path} is not JSON ({err})") from None
    if not isinstance(config, dict) or config.get("kind") != kind:
        raise ValueError(f"config_path: expected {what} ({kind!r}), got {path}")
    return config
