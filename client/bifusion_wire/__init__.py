"""The wire contract of the BiFusion encoder service (package ``bifusion.v1``).

``encoder_pb2``/``encoder_pb2_grpc`` (and ``encoder.binpb``, the proto with its comments) are
generated from ``protos/bifusion/v1/encoder.proto`` by ``scripts/generate_wire.py`` (a test checks
they match a fresh generation), with an old protoc so that they run on protobuf >= 3.20.3 and
grpcio >= 1.51.1. ``tensor`` converts numpy arrays to and from ``Tensor`` messages; ``health``
calls grpc.health.v1 without grpcio-health-checking; ``documented`` gives server reflection the
commented descriptors. Needs protobuf, grpcio and numpy only, never torch.
"""

SERVICE_NAME = "bifusion.v1.BiFusionEncoder"
