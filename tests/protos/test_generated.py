"""The committed gRPC modules are what protoc makes of the committed .proto (regenerate: python -m protos.generate)."""

from __future__ import annotations

from importlib.metadata import version

import pytest

from protos import moe_serve_pb2, moe_serve_pb2_grpc

pytest.importorskip("grpc_tools", reason="grpcio-tools (test extra) compiles the .proto")
from protos.generate import PROTOS, REPO_ROOT, generate, generated_paths  # noqa: E402

HINT = "stale generated module: run `python -m protos.generate` and commit the result"


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    out = tmp_path_factory.mktemp("protos-gen")
    generate(out)
    return out


def _installed_tools_version() -> str:
    return version("grpcio-tools")


@pytest.mark.parametrize("path", [p for proto in PROTOS for p in generated_paths(proto)])
def test_committed_module_is_byte_identical(fresh, path):
    if moe_serve_pb2_grpc.GRPC_GENERATED_VERSION != _installed_tools_version():
        pytest.skip(f"committed modules come from grpcio-tools {moe_serve_pb2_grpc.GRPC_GENERATED_VERSION}, "
                    f"installed is {_installed_tools_version()}: only the descriptor test applies")
    assert (REPO_ROOT / path).read_bytes() == (fresh / path).read_bytes(), f"{path}: {HINT}"


def test_committed_descriptor_matches_proto(fresh, tmp_path):
    """Independent of the protoc version: the schema compiled from the .proto equals the committed one."""
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    out = tmp_path / "set.pb"
    assert protoc.main(["grpc_tools.protoc", f"-I{REPO_ROOT}", f"--descriptor_set_out={out}",
                        str(REPO_ROOT / "protos/moe_serve.proto")]) == 0
    compiled = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    _clear_json_names(compiled.message_type)  # python gencode leaves out the derivable json_name
    committed = descriptor_pb2.FileDescriptorProto.FromString(moe_serve_pb2.DESCRIPTOR.serialized_pb)
    assert committed == compiled, HINT


def _clear_json_names(messages) -> None:
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        _clear_json_names(message.nested_type)


def test_grpc_module_uses_package_import():
    text = (REPO_ROOT / "protos/moe_serve_pb2_grpc.py").read_text()
    assert "from protos import moe_serve_pb2" in text
    assert "\nimport moe_serve_pb2" not in text


def test_service_shape():
    service = moe_serve_pb2.DESCRIPTOR.services_by_name["MoeServe"]
    assert service.full_name == "moeserve.v1.MoeServe"
    generate_rpc = service.methods_by_name["Generate"]
    assert generate_rpc.server_streaming and not generate_rpc.client_streaming
    assert not service.methods_by_name["GetModelInfo"].server_streaming
