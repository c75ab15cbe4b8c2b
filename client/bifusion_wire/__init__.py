"""The wire contract of the BiFusion encoder service (package ``bifusion.v1``).

``encoder_pb2``/``encoder_pb2_grpc`` are generated from ``protos/bifusion/v1/encoder.proto`` by
``scripts/generate_wire.py`` (a test checks they match a fresh generation); ``tensor`` converts
numpy arrays to and from ``Tensor`` messages. Needs protobuf, grpcio and numpy only, never torch.
"""

SERVICE_NAME = "bifusion.v1.BiFusionEncoder"
