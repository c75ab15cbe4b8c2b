"""numpy frames -> ``EncodeFrameRequest`` messages (numpy, Pillow and protobuf only)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np
from bifusion_wire import encoder_pb2 as pb
from bifusion_wire.tensor import OUTPUT_DTYPES, to_tensor
from PIL import Image, UnidentifiedImageError

from .frames_folder import FolderFrame

# PNG level 1: most of the size win of PNG at a fraction of level 6's time.
PNG_COMPRESS_LEVEL = 1
JPEG_QUALITY = 95
COLOR_FORMATS = ("png", "jpeg", "raw")
DEPTH_FORMATS = ("png", "raw")
# A tuple, not `bytes | bytearray | memoryview`: isinstance takes unions only from Python 3.10.
BYTES_LIKE = (bytes, bytearray, memoryview)


def build_request(
    color: np.ndarray | bytes,
    depth: np.ndarray | bytes | None,
    intrinsics: Mapping[str, float] | Sequence[float],
    cam_to_world: np.ndarray | Sequence[float] | None = None,
    depth_scale: float = 1000.0,
    points: np.ndarray | None = None,
    frame_id: str = "",
    max_points: int | None = None,
    float16: bool = False,
    world_points: bool = False,
    output_dtype: str | None = None,
    occlusion_tau: float | None = None,
    color_format: str = "png",
    depth_format: str = "png",
) -> pb.EncodeFrameRequest:
    """One request.

    ``color`` is H×W×3 uint8 (sent as ``color_format``: png, jpeg or raw) or PNG/JPEG bytes as
    read from a file. ``depth`` is H×W uint16 (metres = value / ``depth_scale``; sent as
    ``depth_format``: png or raw), H×W float32 metres (always raw), 16-bit PNG bytes, or None
    when ``points`` (N×3 or N×6 float32, camera frame) are sent. ``intrinsics`` is a mapping
    with fx, fy, cx, cy or a sequence in that order. ``cam_to_world`` is 4×4 (or 16 numbers,
    row-major); None means identity. ``output_dtype`` is how features travel: float32,
    float16, int8 (per-point scale) or bfloat16; ``float16=True`` is the older spelling of
    ``output_dtype="float16"``.
    """
    if max_points is not None and max_points < 0:
        raise ValueError(f"max_points must be 0 (the model's default) or more, got {max_points}")
    request = pb.EncodeFrameRequest(frame_id=frame_id)
    width, height = _encode_color(request.color, color, color_format)
    if depth is not None:
        _check_depth_size(depth, width, height)
    fx, fy, cx, cy = _intrinsics(intrinsics)
    request.intrinsics.CopyFrom(pb.Intrinsics(fx=fx, fy=fy, cx=cx, cy=cy, width=width, height=height))
    if depth is not None:
        _encode_depth(request.depth, depth, depth_scale, depth_format)
    if points is not None:
        to_tensor(np.asarray(points, dtype=np.float32), request.points)
    if cam_to_world is not None:
        request.cam_to_world[:] = np.asarray(cam_to_world, dtype=np.float64).reshape(-1).tolist()
    options = request.options
    options.max_points = max_points or 0
    options.output_dtype = _output_dtype(output_dtype or ("float16" if float16 else "float32"))
    options.return_world_points = world_points
    if occlusion_tau is not None:
        options.occlusion_tau = occlusion_tau
    return request


def request_from_folder_frame(frame: FolderFrame, **options) -> pb.EncodeFrameRequest:
    """A frame of ``load_frames_folder`` as a request; ``options`` go to :func:`build_request`."""
    return build_request(
        frame.color,
        frame.depth,
        frame.intrinsics,
        cam_to_world=frame.cam_to_world,
        depth_scale=frame.depth_scale,
        frame_id=frame.frame_id,
        **options,
    )


def _output_dtype(name: str) -> int:
    by_name = {v: k for k, v in OUTPUT_DTYPES.items()}
    if name not in by_name:
        raise ValueError(f"output_dtype must be one of {', '.join(by_name)}, got {name!r}")
    return by_name[name]


def _intrinsics(intrinsics: Mapping[str, float] | Sequence[float]) -> tuple[float, float, float, float]:
    if isinstance(intrinsics, Mapping):
        return tuple(float(intrinsics[k]) for k in ("fx", "fy", "cx", "cy"))
    values = tuple(float(v) for v in intrinsics)
    if len(values) != 4:
        raise ValueError(f"intrinsics must be fx, fy, cx, cy; got {len(values)} numbers")
    return values


def _encode_color(out: pb.ColorImage, color: np.ndarray | bytes, fmt: str) -> tuple[int, int]:
    """Fill ``out``; returns the image's (width, height)."""
    if isinstance(color, BYTES_LIKE):
        image = _open_image(color, "colour")  # header only: format and size
        encodings = {"PNG": pb.ColorImage.PNG, "JPEG": pb.ColorImage.JPEG}
        if image.format not in encodings:
            raise ValueError(f"colour bytes must be PNG or JPEG, got {image.format}")
        out.encoding = encodings[image.format]
        out.data = bytes(color)
        return image.size
    color = np.asarray(color)
    if color.ndim != 3 or color.shape[2] != 3 or color.dtype != np.uint8:
        raise ValueError(f"colour must be H×W×3 uint8, got {color.shape} {color.dtype}")
    height, width = color.shape[:2]
    if fmt == "raw":
        out.encoding = pb.ColorImage.RAW_RGB8
        out.data = np.ascontiguousarray(color).tobytes()
    elif fmt == "png":
        out.encoding = pb.ColorImage.PNG
        out.data = _save(Image.fromarray(color), "PNG", compress_level=PNG_COMPRESS_LEVEL)
    elif fmt == "jpeg":
        out.encoding = pb.ColorImage.JPEG
        out.data = _save(Image.fromarray(color), "JPEG", quality=JPEG_QUALITY)
    else:
        raise ValueError(f"color_format must be one of {COLOR_FORMATS}, got {fmt!r}")
    return width, height


def _check_depth_size(depth: np.ndarray | bytes, width: int, height: int) -> None:
    """Depth must be registered to the colour image, pixel for pixel; say so here rather than
    let the server blame the intrinsics' size."""
    if isinstance(depth, BYTES_LIKE):
        depth_width, depth_height = _open_image(depth, "depth").size
    else:
        if np.ndim(depth) != 2:
            return  # _encode_depth names the wrong shape
        depth_height, depth_width = np.shape(depth)
    if (depth_width, depth_height) != (width, height):
        raise ValueError(
            f"depth is {depth_width}×{depth_height} but colour is {width}×{height}: depth must be "
            "registered to the colour image (same size, pixel for pixel)"
        )


def _open_image(data: bytes, what: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ValueError(f"{what} bytes are not an image Pillow can read (PNG or JPEG expected)") from None


def _encode_depth(out: pb.DepthImage, depth: np.ndarray | bytes, scale: float, fmt: str) -> None:
    if isinstance(depth, BYTES_LIKE):
        out.encoding = pb.DepthImage.PNG16
        out.data = bytes(depth)
        out.depth_scale = scale
        return
    depth = np.asarray(depth)
    if depth.ndim != 2:
        raise ValueError(f"depth must be H×W, got shape {depth.shape}")
    if depth.dtype == np.float32:
        out.encoding = pb.DepthImage.RAW_FLOAT32
        out.data = depth.astype("<f4", copy=False).tobytes()
        return
    if depth.dtype != np.uint16:
        raise ValueError(f"depth must be uint16 (with depth_scale) or float32 metres, got {depth.dtype}")
    out.depth_scale = scale
    if fmt == "raw":
        out.encoding = pb.DepthImage.RAW_UINT16
        out.data = depth.astype("<u2", copy=False).tobytes()
    elif fmt == "png":
        out.encoding = pb.DepthImage.PNG16
        out.data = _save(Image.fromarray(depth), "PNG", compress_level=PNG_COMPRESS_LEVEL)
    else:
        raise ValueError(f"depth_format must be one of {DEPTH_FORMATS}, got {fmt!r}")


def _save(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()
