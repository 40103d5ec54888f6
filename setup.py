"""Generates the gRPC stubs (tunewire/v1) whenever the project is built or
installed; everything else is in pyproject.toml."""

import pathlib
import subprocess
import sys

from setuptools import setup

# Runs before setuptools looks for packages: tunewire.v1 exists only once generated.
subprocess.check_call([sys.executable, str(pathlib.Path(__file__).resolve().parent / "scripts" / "gen_protos.py")])

setup()
