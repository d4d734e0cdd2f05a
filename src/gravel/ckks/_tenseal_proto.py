"""TenSEAL's context message (`tenseal/proto/tensealcontext.proto`), built with protobuf's runtime.

TenSEAL serializes a context as this protobuf message, and always writes its relinearisation and
Galois keys in SEAL's expanded form, and all power-of-two Galois keys or none. Gravel writes the
same message itself, with the keys in SEAL's seeded form (half the bytes) and only the rotations a
computation needs, and TenSEAL's own loader reads it back: `ts.Context.load` expands the seeds.
The message types are declared here from the .proto (field numbers and types copied from it), so
no generated code and no protoc are needed.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

__all__ = ["ContextProto"]

_F = descriptor_pb2.FieldDescriptorProto


def _build() -> Any:
    file = descriptor_pb2.FileDescriptorProto(
        name="gravel_tensealcontext.proto", package="gravel_tenseal", syntax="proto3"
    )

    def message(name: str, fields: list[tuple[str, int, int, str | None]]) -> None:
        msg = file.message_type.add(name=name)
        for fname, number, ftype, type_name in fields:
            field = msg.field.add(name=fname, number=number, type=ftype, label=_F.LABEL_OPTIONAL)
            if type_name:
                field.type_name = type_name

    message("TenSEALPrivateProto", [
        ("secret_key", 1, _F.TYPE_BYTES, None),
        ("relin_keys_generated", 2, _F.TYPE_BOOL, None),
        ("galois_keys_generated", 3, _F.TYPE_BOOL, None),
    ])
    message("TenSEALPublicProto", [
        ("public_key", 1, _F.TYPE_BYTES, None),
        ("auto_flags", 2, _F.TYPE_UINT32, None),
        ("scale", 3, _F.TYPE_DOUBLE, None),
        ("relin_keys", 4, _F.TYPE_BYTES, None),
        ("galois_keys", 5, _F.TYPE_BYTES, None),
    ])
    message("TenSEALContextProto", [
        ("encryption_parameters", 1, _F.TYPE_BYTES, None),
        ("public_context", 2, _F.TYPE_MESSAGE, ".gravel_tenseal.TenSEALPublicProto"),
        ("private_context", 3, _F.TYPE_MESSAGE, ".gravel_tenseal.TenSEALPrivateProto"),
        ("encryption_type", 4, _F.TYPE_UINT32, None),
    ])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("gravel_tenseal.TenSEALContextProto")
    )


ContextProto = _build()
