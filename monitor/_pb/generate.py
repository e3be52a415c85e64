"""Regenerate the protobuf code under monitor/_pb from proto/ (`make proto`)."""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROTO_DIR = os.path.join(ROOT, "proto")
PROTOS = ["trainguard/v1/telemetry.proto"]


def generate(out_dir: str) -> None:
    """Run protoc (from grpcio-tools) for every .proto into out_dir."""
    from grpc_tools import protoc

    os.makedirs(out_dir, exist_ok=True)
    args = ["protoc", f"-I{PROTO_DIR}", f"--python_out={out_dir}", f"--pyi_out={out_dir}"] + PROTOS
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    for dirpath, _dirs, _files in os.walk(out_dir):
        init = os.path.join(dirpath, "__init__.py")
        if not os.path.exists(init):
            open(init, "w").close()


if __name__ == "__main__":
    generate(os.path.join(ROOT, "monitor", "_pb"))
    print("regenerated monitor/_pb from proto/", file=sys.stderr)
