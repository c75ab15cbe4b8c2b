"""The BiFusion encoder behind Ray Serve, deployed as a careful Ray user would.

One replica per device holding one :class:`bifusion.BiFusionEncoder`; ``@serve.batch``
groups concurrent frames; request decoding and response building run in a small thread
pool and the model on its own thread, so the replica's event loop keeps collecting the
next batch while one runs. Two ingresses into the same batch queue:
- Ray's gRPC proxy with our proto (``EncodeFrame`` takes and returns our messages);
- Ray's HTTP proxy, the serialised ``EncodeFrameRequest`` as a binary POST body and the
  serialised ``EncodeFrameResponse`` as the answer (``application/x-protobuf``).
The wire <-> tensor translation is the project's own (``bifusion_server.decode`` and
``.respond``), so any difference in speed is the serving path's, not the encoder's.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from bifusion import BiFusionEncoder
from bifusion_server.decode import DecodedRequest, decode_request
from bifusion_server.respond import model_id, response_head, response_outputs, serialise_inline
from bifusion_wire import encoder_pb2 as pb

SERVICER = "bifusion_wire.encoder_pb2_grpc.add_BiFusionEncoderServicer_to_server"
PROTOBUF = "application/x-protobuf"


@serve.deployment(num_replicas=1)
class RayEncoder:
    def __init__(self, checkpoint: str | None, device: str, max_batch_size: int, batch_wait_timeout_s: float):
        self.encoder = BiFusionEncoder(checkpoint, device=device)
        self.model_id = model_id(self.encoder.info.checkpoint_sha256)
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="ray-model")
        self._io = ThreadPoolExecutor(2, thread_name_prefix="ray-io")
        self.encode_batch.set_max_batch_size(max_batch_size)
        self.encode_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    # Ingresses ------------------------------------------------------------------------
    async def EncodeFrame(self, request: pb.EncodeFrameRequest) -> pb.EncodeFrameResponse:
        return await self._encode(request, serialise=False)

    async def __call__(self, http: Request) -> Response:
        body = await http.body()
        data = await self._encode(body, serialise=True)
        return Response(content=data, media_type=PROTOBUF)

    def thread_settings(self) -> dict:
        return self.encoder.thread_settings.as_dict()

    # One frame: decode, batch, respond ------------------------------------------------
    async def _encode(self, request: pb.EncodeFrameRequest | bytes, serialise: bool):
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        decoded = await loop.run_in_executor(self._io, self._decode, request)
        decode_ms = (time.perf_counter() - started) * 1000.0
        result, batch_size = await self.encode_batch(decoded)
        return await loop.run_in_executor(
            self._io, self._respond, result, decoded.output_dtype, decode_ms, batch_size, serialise
        )

    def _decode(self, request: pb.EncodeFrameRequest | bytes) -> DecodedRequest:
        if isinstance(request, bytes):
            request = pb.EncodeFrameRequest.FromString(request)
        decoded = decode_request(request, self.encoder.limits)
        self.encoder.validate(decoded.frame, decoded.options)
        return decoded

    def _respond(self, result, output_dtype: str, decode_ms: float, batch_size: int, serialise: bool):
        head = response_head(result, self.model_id, 0.0, decode_ms, batch_size)
        data = serialise_inline(head, response_outputs(result, output_dtype))
        # Ray's gRPC proxy serialises a message itself; HTTP sends the bytes as they are.
        return data if serialise else pb.EncodeFrameResponse.FromString(data)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def encode_batch(self, decoded: list[DecodedRequest]) -> list[tuple]:
        frames = [d.frame for d in decoded]
        options = [d.options for d in decoded]
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self._model_thread, self.encoder.encode, frames, options, False)
        return [(result, len(results)) for result in results]
