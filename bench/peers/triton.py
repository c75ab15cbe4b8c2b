"""NVIDIA Triton Inference Server serving the encoder, and a ``tritonclient.grpc`` client for it.

The server is the ``tritonserver`` that PyPI's ``nvidia-pytriton`` wheel carries (with its
Python backend and one backend stub per Python version), started on its own: a model
repository holding bench/peers/triton_model.py and its ``config.pbtxt``, Triton's gRPC front
end on a free port. The stub embeds this interpreter's Python, so the venv running the
benchmark must be one it was built for (3.13 here, see scripts/setup_peers.sh).

The client speaks Triton's own gRPC protocol (``tritonclient.grpc``), one channel per
client; with ``shared_memory=True`` (same host) inputs and outputs travel through Triton's
system shared memory: one input and one output region per client, registered with the server.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc
import numpy as np

from bench.peers.triton_tensors import (
    MODEL_NAME,
    OUTPUTS,
    answer_from_outputs,
    model_config,
    output_bytes,
)

HERE = Path(__file__).resolve().parent
# Python backend shared memory per model instance: room for a batch's outputs from the start.
BACKEND_SHM_BYTES = 256 * 1024 * 1024


class TritonCallError(grpc.RpcError):
    """A failed Triton call, counted by the load generator like a failed RPC."""

    def __init__(self, status: str | None, message: str):
        super().__init__(f"{status}: {message[:200]}")
        name = (status or "").rsplit(".", 1)[-1]
        self._code = (
            grpc.StatusCode[name] if name in grpc.StatusCode.__members__ else grpc.StatusCode.INTERNAL
        )

    def code(self) -> grpc.StatusCode:
        return self._code


def _pytriton_dist() -> tuple[Path, Path]:
    """(the wheel's tritonserver folder, its bundled shared libraries)."""
    # Found, not imported: only the wheel's files are used (its Python API wants more).
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("Triton is not installed in this venv: run scripts/setup_peers.sh")
    module = Path(next(iter(spec.submodule_search_locations))).resolve()
    return module / "tritonserver", module.parent / "nvidia_pytriton.libs"


class TritonServer:
    """``tritonserver`` in a child process, serving the encoder until :meth:`stop`."""

    def __init__(
        self,
        ports: tuple[int, int, int],
        device: str,
        max_batch_size: int,
        max_batch_delay_ms: float,
        checkpoint: str | None = None,
        instances: int = 1,
        import_paths: list[str] | None = None,
    ):
        dist, libs = _pytriton_dist()
        self.workdir = Path(tempfile.mkdtemp(prefix="bench-triton-"))
        backend = self.workdir / "backends" / "python"
        backend.mkdir(parents=True)
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            shutil.copy(dist / "backends" / "python" / name, backend / name)
        stub = dist / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}"
        shutil.copy(stub / "triton_python_backend_stub", backend / "triton_python_backend_stub")
        model = self.workdir / "models" / MODEL_NAME
        (model / "1").mkdir(parents=True)
        # The stub's embedded Python ignores PYTHONPATH: the model puts the checkout and
        # PYTHONPATH's folders on sys.path itself.
        paths = [*(import_paths or []), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
        preamble = f"import sys\n\nsys.path[:0] = {[p for p in paths if p]!r}\n"
        (model / "1" / "model.py").write_text(preamble + (HERE / "triton_model.py").read_text())
        self.config = model_config(max_batch_size, max_batch_delay_ms, device, instances, checkpoint)
        (model / "config.pbtxt").write_text(self.config)

        self.grpc_port, http_port, metrics_port = ports
        self.log_path = self.workdir / "tritonserver.log"
        command = [
            str(dist / "bin" / "tritonserver"),
            f"--model-repository={self.workdir / 'models'}",
            f"--backend-directory={self.workdir / 'backends'}",
            f"--grpc-port={self.grpc_port}", f"--http-port={http_port}", f"--metrics-port={metrics_port}",
            "--grpc-address=127.0.0.1", "--http-address=127.0.0.1",
            f"--backend-config=python,shm-default-byte-size={BACKEND_SHM_BYTES}",
            "--backend-config=python,shm-growth-byte-size=67108864",
            "--exit-on-error=true", "--log-verbose=0",
        ]  # fmt: skip
        env = dict(os.environ)
        # The stub finds its libpython and the venv's packages from the venv's python on PATH.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        lib_dirs = [str(libs), str(Path(sys.base_prefix) / "lib"), env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in lib_dirs if p)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command, cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        self.address = f"127.0.0.1:{self.grpc_port}"

    def wait_ready(self, timeout: float = 600) -> None:
        import tritonclient.grpc as grpcclient

        deadline = time.monotonic() + timeout
        with grpcclient.InferenceServerClient(self.address) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"tritonserver exited:\n{self.errors()}")
                try:
                    if client.is_model_ready(MODEL_NAME):
                        return
                except Exception:  # not listening yet
                    pass
                time.sleep(0.5)
        raise TimeoutError(f"Triton's model not ready:\n{self.errors()}")

    def errors(self) -> str:
        """The log's error lines (its start-up tables would hide them) and its last lines."""
        lines = self.log_path.read_text(errors="replace").splitlines()
        picked = [line for line in lines if line.startswith("E") or "error" in line.lower()]
        return "\n".join([*picked[-20:], *lines[-5:]])[-6000:]

    def versions(self) -> dict:
        import tritonclient.grpc as grpcclient

        with grpcclient.InferenceServerClient(self.address) as client:
            return {"tritonserver": client.get_server_metadata().version}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
        shutil.rmtree(self.workdir, ignore_errors=True)


class TritonEncoderClient:
    """One client of the Triton peer: ``encode_request(EncodeFrameRequest)`` like ours, sent
    as Triton tensors (prepared once per frame by the caller: ``inputs`` by frame id)."""

    def __init__(
        self,
        address: str,
        inputs: dict[str, dict[str, np.ndarray]],
        shared_memory: bool = False,
        max_points: int = 0,
        feature_dim: int = 0,
    ):
        import tritonclient.grpc as grpcclient
        import tritonclient.utils.shared_memory as shm

        self._grpc = grpcclient
        self._shm = shm
        self._client = grpcclient.InferenceServerClient(address)
        self._inputs = inputs
        self._regions: list[tuple[str, object]] = []
        self._input_offsets: dict[str, int] = {}
        self._output_offsets: dict[str, tuple[int, int]] = {}
        if shared_memory:
            some = next(iter(inputs.values()))
            self._in = self._region("in", self._layout(
                {name: a.nbytes for name, a in some.items()}, self._input_offsets
            ))  # fmt: skip
            capacity = output_bytes(max_points, feature_dim)
            offsets: dict[str, int] = {}
            size = self._layout(capacity, offsets)
            self._output_offsets = {name: (offsets[name], capacity[name]) for name in capacity}
            self._out = self._region("out", size)

    @staticmethod
    def _layout(sizes: dict[str, int], offsets: dict[str, int]) -> int:
        """Offsets for tensors of ``sizes`` laid end to end, 64-byte aligned; the total."""
        end = 0
        for name, size in sizes.items():
            offsets[name] = end
            end += -(-size // 64) * 64
        return end

    def _region(self, kind: str, size: int):
        name = f"bench-{kind}-{uuid.uuid4().hex[:12]}"
        handle = self._shm.create_shared_memory_region(name, f"/{name}", size)
        self._regions.append((name, handle))
        self._client.register_system_shared_memory(name, f"/{name}", size)
        return name, handle, size

    def encode_request(self, request, timeout: float | None = None):
        from tritonclient.utils import InferenceServerException, np_to_triton_dtype

        grpcclient = self._grpc
        arrays = self._inputs[request.frame_id]
        inputs = []
        for name, array in arrays.items():
            tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            if self._input_offsets:
                region, handle, _ = self._in
                self._shm.set_shared_memory_region(handle, [array], offset=self._input_offsets[name])
                tensor.set_shared_memory(region, array.nbytes, offset=self._input_offsets[name])
            else:
                tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        outputs = []
        for name in OUTPUTS:
            wanted = grpcclient.InferRequestedOutput(name)
            if self._output_offsets:
                offset, size = self._output_offsets[name]
                wanted.set_shared_memory(self._out[0], size, offset=offset)
            outputs.append(wanted)
        try:
            answer = self._client.infer(MODEL_NAME, inputs, outputs=outputs, client_timeout=timeout)
        except InferenceServerException as exc:
            raise TritonCallError(exc.status(), exc.message()) from None
        if not self._output_offsets:
            got = {name: answer.as_numpy(name) for name in OUTPUTS}
            return answer_from_outputs(request.frame_id, got, sum(a.nbytes for a in got.values()))
        got = {}
        for name, (dtype, _, _) in OUTPUTS.items():
            shape = answer.get_output(name).shape
            got[name] = self._shm.get_contents_as_numpy(
                self._out[1], np.dtype(dtype), list(shape), offset=self._output_offsets[name][0]
            )
        return answer_from_outputs(request.frame_id, got, 0)

    def close(self) -> None:
        for name, handle in self._regions:
            try:
                self._client.unregister_system_shared_memory(name)
            finally:
                self._shm.destroy_shared_memory_region(handle)
        self._regions.clear()
        self._client.close()

    def __enter__(self) -> TritonEncoderClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
