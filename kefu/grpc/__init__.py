"""kefu's gRPC front: the chat calls of the REST API and a server stream of one conversation.

Installed with the ``grpc`` extra (``pip install kefu[grpc]``: grpcio and protobuf); without
it kefu runs as before, and a configured ``grpc.port`` stops the start with a message saying
so. The service is ``kefu.v1.Chat`` in ``kefu/grpc/v1/kefu.proto``; the modules generated from
it (``kefu.grpc.v1.kefu_pb2``, ``kefu_pb2_grpc``) are committed and regenerated with
``scripts/gen-grpc``. The server is :class:`kefu.grpc.server.GrpcServer`.

This package imports nothing from grpcio itself, so that ``import kefu.grpc`` works without the
extra; :mod:`kefu.grpc.server` and :mod:`kefu.grpc.v1` need it.
"""

from __future__ import annotations

__all__ = ["INSTALL_HINT"]

#: What to tell an operator whose config asks for gRPC without the extra installed.
INSTALL_HINT = "pip install kefu[grpc]"
