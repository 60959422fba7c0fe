"""The committed gRPC code is exactly what `python -m elias_retrieval.proto_gen` makes from the .proto."""

from __future__ import annotations

from pathlib import Path

from elias_retrieval import proto_gen


def test_committed_generated_code_is_up_to_date(tmp_path: Path):
    written = proto_gen.generate(tmp_path)
    assert written
    for path in written:
        rel = path.relative_to(tmp_path)
        committed = proto_gen.PACKAGE_DIR / rel
        assert committed.is_file(), f"{committed} is missing: run `python -m elias_retrieval.proto_gen`"
        assert committed.read_bytes() == path.read_bytes(), (
            f"{committed} is stale: run `python -m elias_retrieval.proto_gen` (make proto)")


def test_generated_grpc_module_imports_package_relative():
    text = (proto_gen.PACKAGE_DIR / "elias" / "v1" / "searcher_pb2_grpc.py").read_text()
    assert "from . import searcher_pb2" in text and "from elias.v1" not in text
