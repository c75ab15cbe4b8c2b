from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BatchPolicy(_message.Message):
    __slots__ = ["measured", "sweep", "sweep_seconds", "tolerance", "unet_frames"]
    MEASURED_FIELD_NUMBER: _ClassVar[int]
    SWEEP_FIELD_NUMBER: _ClassVar[int]
    SWEEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    UNET_FRAMES_FIELD_NUMBER: _ClassVar[int]
    measured: bool
    sweep: _containers.RepeatedCompositeFieldContainer[BatchTiming]
    sweep_seconds: float
    tolerance: float
    unet_frames: int
    def __init__(self, measured: bool = ..., sweep: _Optional[_Iterable[_Union[BatchTiming, _Mapping]]] = ..., tolerance: _Optional[float] = ..., sweep_seconds: _Optional[float] = ..., unet_frames: _Optional[int] = ...) -> None: ...

class BatchTiming(_message.Message):
    __slots__ = ["batch_size", "calls", "seconds_per_frame", "unet_frames"]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_PER_FRAME_FIELD_NUMBER: _ClassVar[int]
    UNET_FRAMES_FIELD_NUMBER: _ClassVar[int]
    batch_size: int
    calls: int
    seconds_per_frame: float
    unet_frames: int
    def __init__(self, batch_size: _Optional[int] = ..., seconds_per_frame: _Optional[float] = ..., calls: _Optional[int] = ..., unet_frames: _Optional[int] = ...) -> None: ...

class ColorImage(_message.Message):
    __slots__ = ["data", "encoding"]
    class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = []
    DATA_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    ENCODING_UNSPECIFIED: ColorImage.Encoding
    JPEG: ColorImage.Encoding
    PNG: ColorImage.Encoding
    RAW_RGB8: ColorImage.Encoding
    data: bytes
    encoding: ColorImage.Encoding
    def __init__(self, encoding: _Optional[_Union[ColorImage.Encoding, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class DepthImage(_message.Message):
    __slots__ = ["data", "depth_scale", "encoding"]
    class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = []
    DATA_FIELD_NUMBER: _ClassVar[int]
    DEPTH_SCALE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    ENCODING_UNSPECIFIED: DepthImage.Encoding
    PNG16: DepthImage.Encoding
    RAW_FLOAT32: DepthImage.Encoding
    RAW_UINT16: DepthImage.Encoding
    data: bytes
    depth_scale: float
    encoding: DepthImage.Encoding
    def __init__(self, encoding: _Optional[_Union[DepthImage.Encoding, str]] = ..., data: _Optional[bytes] = ..., depth_scale: _Optional[float] = ...) -> None: ...

class EncodeFrameRequest(_message.Message):
    __slots__ = ["cam_to_world", "color", "depth", "frame_id", "intrinsics", "options", "output_shared_memory", "points"]
    CAM_TO_WORLD_FIELD_NUMBER: _ClassVar[int]
    COLOR_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    INTRINSICS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    cam_to_world: _containers.RepeatedScalarFieldContainer[float]
    color: ColorImage
    depth: DepthImage
    frame_id: str
    intrinsics: Intrinsics
    options: EncodeOptions
    output_shared_memory: SharedMemoryRef
    points: Tensor
    def __init__(self, frame_id: _Optional[str] = ..., color: _Optional[_Union[ColorImage, _Mapping]] = ..., depth: _Optional[_Union[DepthImage, _Mapping]] = ..., points: _Optional[_Union[Tensor, _Mapping]] = ..., intrinsics: _Optional[_Union[Intrinsics, _Mapping]] = ..., cam_to_world: _Optional[_Iterable[float]] = ..., options: _Optional[_Union[EncodeOptions, _Mapping]] = ..., output_shared_memory: _Optional[_Union[SharedMemoryRef, _Mapping]] = ...) -> None: ...

class EncodeFrameResponse(_message.Message):
    __slots__ = ["alpha", "features", "features_scale", "frame_id", "model_id", "point_indices", "points_world", "stats", "valid"]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    FEATURES_SCALE_FIELD_NUMBER: _ClassVar[int]
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    POINTS_WORLD_FIELD_NUMBER: _ClassVar[int]
    POINT_INDICES_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    VALID_FIELD_NUMBER: _ClassVar[int]
    alpha: Tensor
    features: Tensor
    features_scale: Tensor
    frame_id: str
    model_id: str
    point_indices: Tensor
    points_world: Tensor
    stats: FrameStats
    valid: Tensor
    def __init__(self, frame_id: _Optional[str] = ..., features: _Optional[_Union[Tensor, _Mapping]] = ..., alpha: _Optional[_Union[Tensor, _Mapping]] = ..., valid: _Optional[_Union[Tensor, _Mapping]] = ..., point_indices: _Optional[_Union[Tensor, _Mapping]] = ..., points_world: _Optional[_Union[Tensor, _Mapping]] = ..., stats: _Optional[_Union[FrameStats, _Mapping]] = ..., model_id: _Optional[str] = ..., features_scale: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class EncodeOptions(_message.Message):
    __slots__ = ["max_points", "occlusion_tau", "output_dtype", "return_world_points"]
    class OutputDType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = []
    BFLOAT16: EncodeOptions.OutputDType
    FLOAT16: EncodeOptions.OutputDType
    FLOAT32: EncodeOptions.OutputDType
    INT8: EncodeOptions.OutputDType
    MAX_POINTS_FIELD_NUMBER: _ClassVar[int]
    OCCLUSION_TAU_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    RETURN_WORLD_POINTS_FIELD_NUMBER: _ClassVar[int]
    max_points: int
    occlusion_tau: float
    output_dtype: EncodeOptions.OutputDType
    return_world_points: bool
    def __init__(self, max_points: _Optional[int] = ..., output_dtype: _Optional[_Union[EncodeOptions.OutputDType, str]] = ..., return_world_points: bool = ..., occlusion_tau: _Optional[float] = ...) -> None: ...

class FrameStats(_message.Message):
    __slots__ = ["batch_size", "decode_ms", "gate_mean", "num_points", "queue_ms", "stage_ms", "valid_ratio"]
    class StageMsEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    GATE_MEAN_FIELD_NUMBER: _ClassVar[int]
    NUM_POINTS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    STAGE_MS_FIELD_NUMBER: _ClassVar[int]
    VALID_RATIO_FIELD_NUMBER: _ClassVar[int]
    batch_size: int
    decode_ms: float
    gate_mean: float
    num_points: int
    queue_ms: float
    stage_ms: _containers.ScalarMap[str, float]
    valid_ratio: float
    def __init__(self, num_points: _Optional[int] = ..., valid_ratio: _Optional[float] = ..., gate_mean: _Optional[float] = ..., stage_ms: _Optional[_Mapping[str, float]] = ..., queue_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ..., batch_size: _Optional[int] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = []
    def __init__(self) -> None: ...

class Intrinsics(_message.Message):
    __slots__ = ["cx", "cy", "fx", "fy", "height", "width"]
    CX_FIELD_NUMBER: _ClassVar[int]
    CY_FIELD_NUMBER: _ClassVar[int]
    FX_FIELD_NUMBER: _ClassVar[int]
    FY_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    cx: float
    cy: float
    fx: float
    fy: float
    height: int
    width: int
    def __init__(self, fx: _Optional[float] = ..., fy: _Optional[float] = ..., cx: _Optional[float] = ..., cy: _Optional[float] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ["default_max_points", "max_batch_size", "max_image_side", "max_message_bytes", "max_points", "max_queue", "min_image_side"]
    DEFAULT_MAX_POINTS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_SIDE_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_POINTS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    MIN_IMAGE_SIDE_FIELD_NUMBER: _ClassVar[int]
    default_max_points: int
    max_batch_size: int
    max_image_side: int
    max_message_bytes: int
    max_points: int
    max_queue: int
    min_image_side: int
    def __init__(self, max_batch_size: _Optional[int] = ..., max_queue: _Optional[int] = ..., max_points: _Optional[int] = ..., default_max_points: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_image_side: _Optional[int] = ..., min_image_side: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ["amp", "architecture", "batch_policy", "checkpoint_sha256", "config_json", "demo_weights", "device", "feature_dim", "limits", "model_id", "server_version", "shared_memory"]
    AMP_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    BATCH_POLICY_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_SHA256_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    DEMO_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DIM_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    amp: bool
    architecture: str
    batch_policy: BatchPolicy
    checkpoint_sha256: str
    config_json: str
    demo_weights: bool
    device: str
    feature_dim: int
    limits: Limits
    model_id: str
    server_version: str
    shared_memory: bool
    def __init__(self, architecture: _Optional[str] = ..., checkpoint_sha256: _Optional[str] = ..., model_id: _Optional[str] = ..., device: _Optional[str] = ..., demo_weights: bool = ..., feature_dim: _Optional[int] = ..., amp: bool = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., server_version: _Optional[str] = ..., config_json: _Optional[str] = ..., shared_memory: bool = ..., batch_policy: _Optional[_Union[BatchPolicy, _Mapping]] = ...) -> None: ...

class RegisterSharedMemoryRequest(_message.Message):
    __slots__ = ["byte_size", "key", "name"]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    byte_size: int
    key: str
    name: str
    def __init__(self, name: _Optional[str] = ..., key: _Optional[str] = ..., byte_size: _Optional[int] = ...) -> None: ...

class SharedMemoryRef(_message.Message):
    __slots__ = ["byte_size", "offset", "region"]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    byte_size: int
    offset: int
    region: str
    def __init__(self, region: _Optional[str] = ..., offset: _Optional[int] = ..., byte_size: _Optional[int] = ...) -> None: ...

class SharedMemoryStatus(_message.Message):
    __slots__ = ["byte_size", "name"]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    byte_size: int
    name: str
    def __init__(self, name: _Optional[str] = ..., byte_size: _Optional[int] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ["data", "dtype", "padding", "shape", "shared_memory"]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    PADDING_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    dtype: str
    padding: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    shared_memory: SharedMemoryRef
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., shared_memory: _Optional[_Union[SharedMemoryRef, _Mapping]] = ..., padding: _Optional[bytes] = ...) -> None: ...

class UnregisterSharedMemoryRequest(_message.Message):
    __slots__ = ["name"]
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class UnregisterSharedMemoryResponse(_message.Message):
    __slots__ = []
    def __init__(self) -> None: ...
