"""The code stays ruff-clean (rules in pyproject.toml)."""

import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
PATHS = ["services", "clients", "tests", "scripts", "bench"]


def test_ruff_check_and_format():
    paths = [p for p in PATHS if (REPO / p).exists()]
    check = subprocess.run([sys.executable, "-m", "ruff", "check", *paths], cwd=REPO, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    fmt = subprocess.run([sys.executable, "-m", "ruff", "format", "--check", *paths], cwd=REPO, capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stdout
