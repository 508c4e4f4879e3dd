"""Regenerate mvcckv's protobuf and gRPC modules from proto/.

The .proto files under proto/ are laid out by proto package
(``proto/mvccpb/kv.proto`` is imported as ``"mvccpb/kv.proto"``), which is
what keeps descriptor names and gRPC method paths identical to etcd's.
protoc therefore emits package-shaped modules (``mvccpb/kv_pb2.py`` doing
``from mvccpb import ...``); this tool flattens them into ``mvcckv/pb/`` and
points their cross-imports at ``mvcckv.pb``, so that

    from mvcckv.pb import rpc_pb2, rpc_pb2_grpc, kv_pb2, auth_pb2, lease_pb2

works from anywhere without touching ``sys.path``.

Usage:
    python tools/gen_proto.py          # rewrite stale files in mvcckv/pb/
    python tools/gen_proto.py --check  # exit 1, listing them, if any is stale

The output depends on the exact grpcio-tools release (it embeds the protoc
version), which is why pyproject.toml pins it.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from importlib import metadata
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "mvcckv" / "pb"
PY_PACKAGE = "mvcckv.pb"

PROTOS = (
    "mvccpb/kv.proto",
    "authpb/auth.proto",
    "etcdserverpb/rpc.proto",
    "leasepb/lease.proto",
)

# protoc output path -> file name in mvcckv/pb/.  Anything protoc emits that is
# not listed (the empty *_pb2_grpc.py of service-less files) is dropped.
OUTPUTS = {
    "mvccpb/kv_pb2.py": "kv_pb2.py",
    "mvccpb/kv_pb2.pyi": "kv_pb2.pyi",
    "authpb/auth_pb2.py": "auth_pb2.py",
    "authpb/auth_pb2.pyi": "auth_pb2.pyi",
    "leasepb/lease_pb2.py": "lease_pb2.py",
    "leasepb/lease_pb2.pyi": "lease_pb2.pyi",
    "etcdserverpb/rpc_pb2.py": "rpc_pb2.py",
    "etcdserverpb/rpc_pb2.pyi": "rpc_pb2.pyi",
    "etcdserverpb/rpc_pb2_grpc.py": "rpc_pb2_grpc.py",
}

_PROTO_PACKAGES = "|".join(sorted({p.split("/")[0] for p in PROTOS}))
# "from mvccpb import kv_pb2 as ..." -> "from mvcckv.pb import kv_pb2 as ..."
_IMPORT_RE = re.compile(rf"^from (?:{_PROTO_PACKAGES}) import (\w+_pb2)\b", re.MULTILINE)
# The module name protobuf stamps on message classes (their __module__, which
# pickle relies on): 'mvccpb.kv_pb2' -> 'mvcckv.pb.kv_pb2'.
_MODULE_RE = re.compile(rf"'(?:{_PROTO_PACKAGES})\.(\w+_pb2)'")
# The gRPC version guard names the file in its error message.
_GRPC_PATH_RE = re.compile(rf"code in (?:{_PROTO_PACKAGES})/(\w+_pb2_grpc\.py)")


def _rewrite(text: str) -> str:
    text = _IMPORT_RE.sub(rf"from {PY_PACKAGE} import \1", text)
    text = _MODULE_RE.sub(rf"'{PY_PACKAGE}.\1'", text)
    return _GRPC_PATH_RE.sub(r"code in mvcckv/pb/\1", text)


def generate() -> dict[str, str]:
    """Run protoc and return {file name in mvcckv/pb/: final contents}."""
    well_known = resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"--proto_path={PROTO_DIR}",
            f"--proto_path={well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *PROTOS,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("gen_proto: protoc failed (see its messages above)")
        out = Path(tmp)
        return {
            name: _rewrite((out / src).read_text(encoding="utf-8"))
            for src, name in OUTPUTS.items()
        }


def _is_generated_name(name: str) -> bool:
    return re.fullmatch(r"\w+_pb2(_grpc)?\.pyi?", name) is not None


def stale_files(generated: dict[str, str]) -> list[str]:
    """Names in mvcckv/pb/ that are missing, differ, or are no longer generated."""
    stale = []
    for name, text in sorted(generated.items()):
        path = OUT_DIR / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            stale.append(name)
    for path in sorted(OUT_DIR.glob("*_pb2*")):
        if _is_generated_name(path.name) and path.name not in generated:
            stale.append(path.name)
    return stale


def write(generated: dict[str, str]) -> list[str]:
    """Bring mvcckv/pb/ up to date; return the names written or removed."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    changed = stale_files(generated)
    for name in changed:
        path = OUT_DIR / name
        if name in generated:
            path.write_text(generated[name], encoding="utf-8")
        else:
            path.unlink()
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="do not write; exit 1 and list the stale files if mvcckv/pb/ is out of date",
    )
    opts = parser.parse_args(argv)

    generated = generate()
    rel = OUT_DIR.relative_to(ROOT)
    if opts.check:
        stale = stale_files(generated)
        if not stale:
            return 0
        tools_version = metadata.version("grpcio-tools")
        print(
            f"gen_proto: stale generated files (grpcio-tools {tools_version}):",
            file=sys.stderr,
        )
        for name in stale:
            print(f"  {rel / name}", file=sys.stderr)
        print("run: python tools/gen_proto.py", file=sys.stderr)
        return 1

    for name in write(generated):
        verb = "updated" if name in generated else "removed"
        print(f"gen_proto: {verb} {rel / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
