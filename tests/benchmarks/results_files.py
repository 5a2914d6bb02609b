"""What every benchmark's results file records beside its figures: the commit measured, and the file itself."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def git_commit() -> str | None:
    """HEAD of the checkout the benchmarks live in; None where the tree has no git metadata or no git."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE, check=False)
    except OSError:
        return None
    return done.stdout.strip() or None


def write_json(directory: Path, name: str, result: dict[str, Any]) -> Path:
    """`directory/name` holding `result` as indented JSON (the directory is created if need be)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return path
