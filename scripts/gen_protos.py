"""Generates the Python gRPC stubs from protos/ into tunewire/v1/.

The one way stubs are made: setup.py runs it at build and install time, and
tests/test_protos.py runs it into a temporary directory to prove the installed
stubs are not stale. Generated files are never edited by hand.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "protos"
PACKAGE = pathlib.Path("tunewire") / "v1"


def proto_files() -> list[pathlib.Path]:
    return sorted((PROTO_ROOT / PACKAGE).glob("*.proto"))


def generate(out_root: pathlib.Path) -> list[pathlib.Path]:
    """Writes <out_root>/tunewire/v1/*_pb2*.py(i) and returns the files written."""
    import grpc_tools
    from grpc_tools import protoc

    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    out_dir = out_root / PACKAGE
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(str(p) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    init = out_dir / "__init__.py"
    init.write_text('"""Generated from protos/tunewire/v1 by scripts/gen_protos.py; do not edit."""\n')
    return sorted(p for p in out_dir.iterdir() if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=pathlib.Path, default=REPO, help="root to write tunewire/v1 under")
    args = parser.parse_args()
    for path in generate(args.out):
        print(path.relative_to(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
