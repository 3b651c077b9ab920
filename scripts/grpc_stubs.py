"""Python stubs for TorchServe's gRPC APIs, generated from proto/*.proto by grpcio-tools' protoc.

    python -m scripts.grpc_stubs [OUT_DIR]     (the Makefile's build target runs it)

The generated modules (inference_pb2, inference_pb2_grpc, management_pb2, ...) go to build/grpc
and are never committed; they are regenerated only when a .proto is newer than them.
"""
import importlib
import os
import shutil
import sys
import tempfile
from types import SimpleNamespace
from typing import List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTO_DIR = os.path.join(ROOT, "proto")
OUT_DIR = os.path.join(ROOT, "build", "grpc")
PROTOS = ("inference.proto", "management.proto")
# What protoc writes for each proto: messages, services, type hints.
SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")


class StubGenerationError(RuntimeError):
    pass


def outputs(out_dir: str, protos=PROTOS) -> List[str]:
    return [os.path.join(out_dir, os.path.splitext(p)[0] + s) for p in protos for s in SUFFIXES]


def up_to_date(out_dir: str, proto_dir: str = PROTO_DIR, protos=PROTOS) -> bool:
    """True when every output exists and is newer than every proto."""
    try:
        oldest_output = min(os.stat(p).st_mtime_ns for p in outputs(out_dir, protos))
    except FileNotFoundError:
        return False
    newest_proto = max(os.stat(os.path.join(proto_dir, p)).st_mtime_ns for p in protos)
    return oldest_output > newest_proto


def protoc_arguments(proto_dir: str, out_dir: str, protos=PROTOS) -> List[str]:
    from grpc_tools import protoc

    # protoc.main() does not add the well-known types (google/protobuf/*.proto) that
    # `python -m grpc_tools.protoc` adds itself.
    well_known = protoc._get_resource_file_name("grpc_tools", "_proto")
    return ["grpc_tools.protoc", f"-I{proto_dir}", f"-I{well_known}", f"--python_out={out_dir}",
            f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}",
            *(os.path.join(proto_dir, p) for p in protos)]


def generate(out_dir: str = OUT_DIR, proto_dir: str = PROTO_DIR, protos=PROTOS,
             force: bool = False) -> str:
    """Generate the stubs into ``out_dir`` unless they are newer than the protos; returns it."""
    out_dir = os.path.abspath(out_dir)
    if not force and up_to_date(out_dir, proto_dir, protos):
        return out_dir
    from grpc_tools import protoc

    os.makedirs(out_dir, exist_ok=True)
    # Generated beside the destination and moved in file by file, so that a process importing
    # the stubs meanwhile never reads a half-written module.
    staging = tempfile.mkdtemp(prefix=".staging-", dir=out_dir)
    try:
        status = protoc.main(protoc_arguments(proto_dir, staging, protos))
        if status != 0:
            raise StubGenerationError(f"protoc failed (exit {status}) on {', '.join(protos)} "
                                      f"in {proto_dir}; its messages are above")
        for produced in outputs(staging, protos):
            os.replace(produced, os.path.join(out_dir, os.path.basename(produced)))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def load(out_dir: str = OUT_DIR) -> SimpleNamespace:
    """The generated modules, generating them first when missing or stale."""
    if not up_to_date(out_dir):
        print(f"generating gRPC stubs from {PROTO_DIR} into {out_dir}", file=sys.stderr)
        generate(out_dir)
    out_dir = os.path.abspath(out_dir)
    # The generated *_pb2_grpc modules import their *_pb2 modules by top-level name.
    if out_dir not in sys.path:
        sys.path.insert(0, out_dir)
    names = [os.path.splitext(p)[0] + s for p in PROTOS for s in ("_pb2", "_pb2_grpc")]
    return SimpleNamespace(**{name: importlib.import_module(name) for name in names})


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out_dir = generate(*argv[:1])
    print(f"gRPC stubs in {os.path.relpath(out_dir, ROOT)}: "
          f"{', '.join(os.path.basename(p) for p in outputs(out_dir))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
