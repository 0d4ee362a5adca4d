"""Generate the Python gRPC stubs from proto/: ``python -m cirrus.protogen [--out DIR]``.

The .proto files live in ``proto/cirrus/v1/`` and are compiled with ``-I proto``,
so the stubs land in ``<out>/cirrus/v1/`` and import as ``from cirrus.v1 import
vm_pb2``. ``<out>`` is the repository root unless ``--out`` says otherwise.
"""
import argparse
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "proto"


def proto_files(root=PROTO_ROOT):
    """The .proto files under ``root``, relative to it, in a stable order."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.proto"))


def generate(out=REPO_ROOT, root=PROTO_ROOT):
    """Compile every .proto under ``root`` into ``out``; returns the files compiled."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = proto_files(root)
    # google/protobuf/*.proto (struct, timestamp) ship inside grpc_tools
    well_known = resources.files("grpc_tools") / "_proto"
    args = ["grpc_tools.protoc", f"-I{root}", f"-I{well_known}",
            f"--python_out={out}", f"--grpc_python_out={out}", *files]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {', '.join(files)}")
    return files


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m cirrus.protogen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO_ROOT),
                        help="root to write cirrus/v1/*_pb2*.py under (default: the repository)")
    args = parser.parse_args(argv)
    try:
        files = generate(args.out)
    except RuntimeError as exc:
        print(f"protogen: {exc}", file=sys.stderr)
        return 1
    print(f"generated stubs for {len(files)} proto files in {Path(args.out) / 'cirrus' / 'v1'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
