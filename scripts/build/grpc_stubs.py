"""Python stubs for TorchServe's gRPC APIs, generated from proto/*.proto by grpcio-tools' protoc.

    python -m scripts.build.grpc_stubs [OUT_DIR]     (the Makefile's build target runs it)

The generated modules (inference_pb2, inference_pb2_grpc, management_pb2, ...) go to build/grpc
and are never committed; they are regenerated only when a .proto is newer than them.
"""
import importlib.util
import os
import shutil
import sys
import tempfile
from types import ModuleType, SimpleNamespace
from typing import List

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # scripts/<role>/ -> the project
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
    return import_stubs(out_dir)


def import_stubs(out_dir: str, protos=PROTOS) -> SimpleNamespace:
    """The generated modules of ``out_dir``, imported from their files under the top-level names
    protoc gave them (inference_pb2, inference_pb2_grpc, ...): each *_pb2_grpc module imports its
    *_pb2 module by that name, which it finds among the loaded modules, so out_dir need not be on
    the import path. A module already loaded under its name is reused, as an import would."""
    out_dir = os.path.abspath(out_dir)
    names = [os.path.splitext(p)[0] + s for p in protos for s in ("_pb2", "_pb2_grpc")]
    return SimpleNamespace(**{name: _import_file(name, os.path.join(out_dir, name + ".py"))
                              for name in names})


def _import_file(name: str, path: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or not os.path.isfile(path):
        raise StubGenerationError(f"{path} is missing: run `python -m scripts.build.grpc_stubs`")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out_dir = generate(*argv[:1])
    print(f"gRPC stubs in {os.path.relpath(out_dir, ROOT)}: "
          f"{', '.join(os.path.basename(p) for p in outputs(out_dir))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
