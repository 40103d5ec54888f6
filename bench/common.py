"""What every benchmark shares: where results go and how they are written."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def write_results(name: str, rows: list[dict], notes: str = "") -> Path:
    """bench/results/<name>.json and .md: the figures and a table of them."""
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M")
    (RESULTS / f"{name}.json").write_text(json.dumps({"machine": machine(), "time": stamp, "rows": rows, "notes": notes}, indent=2))
    keys = list(rows[0])
    lines = [f"{name} — {machine()}, {stamp}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r[k]) for k in keys) + " |" for r in rows]
    if notes:
        lines += ["", notes]
    path = RESULTS / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text())
    return path


def _fmt(value) -> str:
    return f"{value:,.2f}" if isinstance(value, float) else str(value)
