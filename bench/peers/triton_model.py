"""The BiFusion encoder as a Triton Python-backend model (copied to ``<repo>/bifusion/1/model.py``).

Deployed as a careful Triton user would deploy a PyTorch model that cannot be exported
(MinkowskiEngine's sparse convolutions have no TorchScript/ONNX path): one model instance
owning the device, Triton's dynamic batcher forming the batches (``config.pbtxt`` from
``bench.peers.triton_tensors.model_config``), ``execute`` running each batch of requests
as one ``BiFusionEncoder.encode`` call. Tensors in and out follow
``bench/peers/triton_tensors.py``; a frame the encoder refuses gets its own error response,
the rest of its batch still runs.
"""

# No `from __future__` import: bench/peers/triton.py prepends a sys.path line to this file.
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from bench.peers.triton_tensors import INPUTS, frame_from_inputs, outputs_from_result
from bifusion import BiFusionEncoder, InputError  # before torch: bifusion sets OpenMP's wait policy


def _array(tensor) -> np.ndarray:
    # Through DLPack, not tensor.as_numpy(): the backend stub was built against numpy 1, and
    # under numpy 2 as_numpy() returns arrays with the right shape but wrong strides (every
    # row of CAM_TO_WORLD read as the same numbers) without an error.
    return np.from_dlpack(tensor)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        parameters = json.loads(args["model_config"])["parameters"]
        device = parameters["device"]["string_value"]
        if device.startswith("cuda") and args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args['model_instance_device_id']}"
        checkpoint = parameters["checkpoint"]["string_value"] or None
        self.encoder = BiFusionEncoder(checkpoint, device=device)

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        frames, options, rows = [], [], []
        for row, request in enumerate(requests):
            arrays = {name: _array(pb_utils.get_input_tensor_by_name(request, name)) for name in INPUTS}
            frame, opts = frame_from_inputs(arrays)
            try:
                self.encoder.validate(frame, opts)
            except InputError as exc:
                responses[row] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                )
                continue
            frames.append(frame)
            options.append(opts)
            rows.append(row)
        results = self.encoder.encode(frames, options, validate=False) if frames else []
        for row, result in zip(rows, results, strict=True):
            outputs = outputs_from_result(result, len(results))
            # Through DLPack, not pb_utils.Tensor(name, array), which under numpy 2 sends
            # tensors with their shapes and no data (see _array). DLPack wants writeable,
            # contiguous arrays.
            tensors = [
                pb_utils.Tensor.from_dlpack(name, np.require(array, requirements=["C", "W"]))
                for name, array in outputs.items()
            ]
            responses[row] = pb_utils.InferenceResponse(output_tensors=tensors)
        return responses

    def finalize(self) -> None:
        self.encoder = None
