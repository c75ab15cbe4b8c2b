"""Wire request -> encoder ``Frame`` and ``EncodeOptions``; every failure names its proto field.

Raw arrays are numpy views on the request's bytes (no copy); PNG/JPEG go through Pillow,
whose header is checked against the declared size before any pixel is decoded, so a
small compressed image cannot expand into a huge one.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from google.protobuf.message import DecodeError
from PIL import Image, UnidentifiedImageError

from bifusion import EncodeOptions, Frame, Intrinsics, Limits
from bifusion_wire import encoder_pb2 as pb
from bifusion_wire.tensor import OUTPUT_DTYPES, FieldError, check_byte_count, from_tensor

from .budget import Cost

MAX_FRAME_ID_CHARS = 256
COLOR_FORMATS = {pb.ColorImage.PNG: "PNG", pb.ColorImage.JPEG: "JPEG"}
COLOR_MODES = ("RGB", "RGBA", "L", "P", "LA")  # converted to RGB
DEPTH_PNG_MODES = ("I;16", "I;16L", "I;16B", "I")
IMAGE_SIGNATURES = {"PNG": b"\x89PNG\r\n\x1a\n", "JPEG": b"\xff\xd8\xff"}


@dataclass
class DecodedRequest:
    frame: Frame
    options: EncodeOptions
    output_dtype: str  # the features' Tensor dtype on the way out: float32, float16, int8, bfloat16
    # The request's output_shared_memory, when it asks for its outputs there.
    output_shared_memory: pb.SharedMemoryRef | None = None


def parse_request(data: bytes) -> pb.EncodeFrameRequest:
    try:
        return pb.EncodeFrameRequest.FromString(data)
    except DecodeError as exc:
        raise FieldError("request", f"not a valid bifusion.v1.EncodeFrameRequest: {exc}") from exc


def largest_field(request: pb.EncodeFrameRequest) -> tuple[str, int]:
    """The bulkiest field of a request, for telling a client what made it too big."""
    sizes = {
        "color.data": len(request.color.data),
        "depth.data": len(request.depth.data),
        "points.data": len(request.points.data),
    }
    name = max(sizes, key=sizes.get)
    return name, sizes[name]


def request_cost(request: pb.EncodeFrameRequest, limits: Limits, default_max_points: int) -> Cost:
    """What decoding and encoding the request will take, from its header alone."""
    width, height = _image_size(request, limits)
    if request.HasField("points"):
        shape = request.points.shape
        return Cost(width * height, max(shape[0], 0) if shape else 0, "points.shape")
    points = min(request.options.max_points or default_max_points, width * height)
    return Cost(width * height, points, "options.max_points")


def decode_request(request: pb.EncodeFrameRequest, limits: Limits) -> DecodedRequest:
    if len(request.frame_id) > MAX_FRAME_ID_CHARS:
        raise FieldError("frame_id", f"longer than {MAX_FRAME_ID_CHARS} characters")
    width, height = _image_size(request, limits)
    frame = Frame(
        color=_decode_color(request, width, height),
        intrinsics=Intrinsics(
            fx=request.intrinsics.fx,
            fy=request.intrinsics.fy,
            cx=request.intrinsics.cx,
            cy=request.intrinsics.cy,
        ),
        frame_id=request.frame_id,
        cam_to_world=_pose(request.cam_to_world),
    )
    if request.HasField("depth"):
        frame.depth, frame.depth_scale = _decode_depth(request.depth, width, height)
    if request.HasField("points"):
        frame.points = from_tensor(request.points, "points", dtypes=("float32",))
    options, output_dtype = _options(request.options)
    shared = request.output_shared_memory if request.HasField("output_shared_memory") else None
    return DecodedRequest(
        frame=frame, options=options, output_dtype=output_dtype, output_shared_memory=shared
    )


def _image_size(request: pb.EncodeFrameRequest, limits: Limits) -> tuple[int, int]:
    if not request.HasField("intrinsics"):
        raise FieldError("intrinsics", "required (fx, fy, cx, cy, width, height)")
    size = {"width": request.intrinsics.width, "height": request.intrinsics.height}
    for name, value in size.items():
        if value == 0:
            raise FieldError(f"intrinsics.{name}", "required: the image size in pixels")
        if not limits.min_image_side <= value <= limits.max_image_side:
            raise FieldError(
                f"intrinsics.{name}",
                f"{value} is outside {limits.min_image_side}..{limits.max_image_side} pixels",
            )
    return size["width"], size["height"]


def _decode_color(request: pb.EncodeFrameRequest, width: int, height: int) -> np.ndarray:
    color = request.color
    if not request.HasField("color") or not color.data:
        raise FieldError("color.data", "required: the colour image")
    if color.encoding == pb.ColorImage.RAW_RGB8:
        check_byte_count("color.data", width * height * 3, len(color.data))
        return np.frombuffer(color.data, np.uint8).reshape(height, width, 3)
    if color.encoding not in COLOR_FORMATS:
        raise FieldError("color.encoding", f"must be PNG, JPEG or RAW_RGB8, got {color.encoding}")
    image = _open_image("color", color.data, COLOR_FORMATS[color.encoding], width, height)
    if image.mode not in COLOR_MODES:
        raise FieldError("color", f"{image.format} mode {image.mode} is not an 8-bit colour image")
    return _pixels("color", image, "RGB")


def _decode_depth(depth: pb.DepthImage, width: int, height: int) -> tuple[np.ndarray, float]:
    if not depth.data:
        raise FieldError("depth.data", "empty (leave depth unset when sending points only)")
    if depth.encoding == pb.DepthImage.RAW_FLOAT32:
        check_byte_count("depth.data", width * height * 4, len(depth.data))
        return np.frombuffer(depth.data, "<f4").reshape(height, width), 1.0
    if depth.encoding not in (pb.DepthImage.PNG16, pb.DepthImage.RAW_UINT16):
        raise FieldError("depth.encoding", f"must be PNG16, RAW_UINT16 or RAW_FLOAT32, got {depth.encoding}")
    scale = depth.depth_scale
    if not math.isfinite(scale) or scale <= 0:
        raise FieldError(
            "depth.depth_scale",
            f"must be a positive number for 16-bit depth (metres = value / depth_scale), got {scale}",
        )
    if depth.encoding == pb.DepthImage.RAW_UINT16:
        check_byte_count("depth.data", width * height * 2, len(depth.data))
        return np.frombuffer(depth.data, "<u2").reshape(height, width), scale
    image = _open_image("depth", depth.data, "PNG", width, height)
    if image.mode not in DEPTH_PNG_MODES:
        raise FieldError("depth", f"PNG must be 16-bit greyscale, got mode {image.mode}")
    pixels = _pixels("depth", image, None)
    if pixels.dtype != np.uint16:
        if pixels.min() < 0 or pixels.max() > 65535:
            raise FieldError("depth", "PNG values do not fit 16 bits")
        pixels = pixels.astype(np.uint16)
    return pixels, scale


def _open_image(field: str, data: bytes, expected: str, width: int, height: int) -> Image.Image:
    """Read only the header: format and size are checked before decoding pixels."""
    try:
        # Only the parser of the format the request names sees its bytes.
        image = Image.open(io.BytesIO(data), formats=[expected])
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        actual = _sniff_format(data)
        if actual not in (None, expected):
            raise FieldError(f"{field}.encoding", f"says {expected} but the data is {actual}") from exc
        raise FieldError(field, f"corrupt {expected}: not a readable image ({exc})") from exc
    if image.size != (width, height):
        # The colour image defines the frame, so a mismatch there is blamed on the declared
        # size; depth must be registered to colour, so a mismatch there is the depth's.
        wrong = "width" if image.size[0] != width else "height"
        raise FieldError(
            f"intrinsics.{wrong}" if field == "color" else field,
            f"the {field} image is {image.size[0]}×{image.size[1]} but intrinsics say {width}×{height}",
        )
    return image


def _sniff_format(data: bytes) -> str | None:
    """The proto's image format that ``data`` starts like, if any (for a clearer error)."""
    return next((name for name, magic in IMAGE_SIGNATURES.items() if data.startswith(magic)), None)


def _pixels(field: str, image: Image.Image, mode: str | None) -> np.ndarray:
    try:
        image.load()
        if mode is not None and image.mode != mode:
            image = image.convert(mode)
        return np.asarray(image)
    except (OSError, ValueError, SyntaxError) as exc:
        raise FieldError(field, f"corrupt {image.format}: {exc}") from exc


def _pose(values) -> np.ndarray | None:
    if len(values) == 0:
        return None
    if len(values) != 16:
        raise FieldError("cam_to_world", f"must hold 16 numbers (4×4 row-major) or none, got {len(values)}")
    return np.asarray(values, dtype=np.float64).reshape(4, 4)


def _options(options: pb.EncodeOptions) -> tuple[EncodeOptions, str]:
    if options.output_dtype not in OUTPUT_DTYPES:
        names = ", ".join(pb.EncodeOptions.OutputDType.Name(v) for v in OUTPUT_DTYPES)
        raise FieldError("options.output_dtype", f"must be one of {names}, got {options.output_dtype}")
    decoded = EncodeOptions(
        max_points=options.max_points or None,
        return_points_world=options.return_world_points,
        occlusion_tau=options.occlusion_tau if options.HasField("occlusion_tau") else None,
    )
    return decoded, OUTPUT_DTYPES[options.output_dtype]
