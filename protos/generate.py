"""Regenerate the committed gRPC modules from protos/*.proto: `python -m protos.generate`.

protoc runs with the repository root as its include path on `protos/<name>.proto`, so the generated
`_pb2_grpc.py` imports `from protos import <name>_pb2` (a package import) and the modules land next to
the .proto. `generate(out_dir)` writes them elsewhere (the staleness test compares the two).
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parents[1]
PROTOS = ("protos/moe_serve.proto",)  # relative to REPO_ROOT
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generated_paths(proto: str) -> list[str]:
    """Generated file paths of one .proto, relative to the output root."""
    stem = proto.removesuffix(".proto")
    return [stem + suffix for suffix in SUFFIXES]


def generate(out_dir: Path = REPO_ROOT) -> list[Path]:
    """Run protoc on every .proto into out_dir (mirroring protos/); returns the files written."""
    out_dir = Path(out_dir)
    (out_dir / "protos").mkdir(parents=True, exist_ok=True)
    written = []
    for proto in PROTOS:
        args = ["grpc_tools.protoc", f"-I{REPO_ROOT}", f"--python_out={out_dir}",
                f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", str(REPO_ROOT / proto)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
        written += [out_dir / p for p in generated_paths(proto)]
    return written


def main() -> int:
    for path in generate():
        print(path.relative_to(REPO_ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
