from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "shared_memory")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    shared_memory: SharedMemoryRef
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., shared_memory: _Optional[_Union[SharedMemoryRef, _Mapping]] = ...) -> None: ...

class SharedMemoryRef(_message.Message):
    __slots__ = ("region", "offset", "byte_size")
    REGION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    region: str
    offset: int
    byte_size: int
    def __init__(self, region: _Optional[str] = ..., offset: _Optional[int] = ..., byte_size: _Optional[int] = ...) -> None: ...

class RegisterSharedMemoryRequest(_message.Message):
    __slots__ = ("name", "key", "byte_size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    key: str
    byte_size: int
    def __init__(self, name: _Optional[str] = ..., key: _Optional[str] = ..., byte_size: _Optional[int] = ...) -> None: ...

class SharedMemoryStatus(_message.Message):
    __slots__ = ("name", "byte_size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    byte_size: int
    def __init__(self, name: _Optional[str] = ..., byte_size: _Optional[int] = ...) -> None: ...

class UnregisterSharedMemoryRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class UnregisterSharedMemoryResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ColorImage(_message.Message):
    __slots__ = ("encoding", "data")
    class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ENCODING_UNSPECIFIED: _ClassVar[ColorImage.Encoding]
        PNG: _ClassVar[ColorImage.Encoding]
        JPEG: _ClassVar[ColorImage.Encoding]
        RAW_RGB8: _ClassVar[ColorImage.Encoding]
    ENCODING_UNSPECIFIED: ColorImage.Encoding
    PNG: ColorImage.Encoding
    JPEG: ColorImage.Encoding
    RAW_RGB8: ColorImage.Encoding
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    encoding: ColorImage.Encoding
    data: bytes
    def __init__(self, encoding: _Optional[_Union[ColorImage.Encoding, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class DepthImage(_message.Message):
    __slots__ = ("encoding", "data", "depth_scale")
    class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ENCODING_UNSPECIFIED: _ClassVar[DepthImage.Encoding]
        PNG16: _ClassVar[DepthImage.Encoding]
        RAW_UINT16: _ClassVar[DepthImage.Encoding]
        RAW_FLOAT32: _ClassVar[DepthImage.Encoding]
    ENCODING_UNSPECIFIED: DepthImage.Encoding
    PNG16: DepthImage.Encoding
    RAW_UINT16: DepthImage.Encoding
    RAW_FLOAT32: DepthImage.Encoding
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DEPTH_SCALE_FIELD_NUMBER: _ClassVar[int]
    encoding: DepthImage.Encoding
    data: bytes
    depth_scale: float
    def __init__(self, encoding: _Optional[_Union[DepthImage.Encoding, str]] = ..., data: _Optional[bytes] = ..., depth_scale: _Optional[float] = ...) -> None: ...

class Intrinsics(_message.Message):
    __slots__ = ("fx", "fy", "cx", "cy", "width", "height")
    FX_FIELD_NUMBER: _ClassVar[int]
    FY_FIELD_NUMBER: _ClassVar[int]
    CX_FIELD_NUMBER: _ClassVar[int]
    CY_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int
    def __init__(self, fx: _Optional[float] = ..., fy: _Optional[float] = ..., cx: _Optional[float] = ..., cy: _Optional[float] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class EncodeOptions(_message.Message):
    __slots__ = ("max_points", "output_dtype", "return_world_points", "occlusion_tau")
    class OutputDType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        FLOAT32: _ClassVar[EncodeOptions.OutputDType]
        FLOAT16: _ClassVar[EncodeOptions.OutputDType]
        INT8: _ClassVar[EncodeOptions.OutputDType]
        BFLOAT16: _ClassVar[EncodeOptions.OutputDType]
    FLOAT32: EncodeOptions.OutputDType
    FLOAT16: EncodeOptions.OutputDType
    INT8: EncodeOptions.OutputDType
    BFLOAT16: EncodeOptions.OutputDType
    MAX_POINTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    RETURN_WORLD_POINTS_FIELD_NUMBER: _ClassVar[int]
    OCCLUSION_TAU_FIELD_NUMBER: _ClassVar[int]
    max_points: int
    output_dtype: EncodeOptions.OutputDType
    return_world_points: bool
    occlusion_tau: float
    def __init__(self, max_points: _Optional[int] = ..., output_dtype: _Optional[_Union[EncodeOptions.OutputDType, str]] = ..., return_world_points: _Optional[bool] = ..., occlusion_tau: _Optional[float] = ...) -> None: ...

class EncodeFrameRequest(_message.Message):
    __slots__ = ("frame_id", "color", "depth", "points", "intrinsics", "cam_to_world", "options", "output_shared_memory")
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    COLOR_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    INTRINSICS_FIELD_NUMBER: _ClassVar[int]
    CAM_TO_WORLD_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    frame_id: str
    color: ColorImage
    depth: DepthImage
    points: Tensor
    intrinsics: Intrinsics
    cam_to_world: _containers.RepeatedScalarFieldContainer[float]
    options: EncodeOptions
    output_shared_memory: SharedMemoryRef
    def __init__(self, frame_id: _Optional[str] = ..., color: _Optional[_Union[ColorImage, _Mapping]] = ..., depth: _Optional[_Union[DepthImage, _Mapping]] = ..., points: _Optional[_Union[Tensor, _Mapping]] = ..., intrinsics: _Optional[_Union[Intrinsics, _Mapping]] = ..., cam_to_world: _Optional[_Iterable[float]] = ..., options: _Optional[_Union[EncodeOptions, _Mapping]] = ..., output_shared_memory: _Optional[_Union[SharedMemoryRef, _Mapping]] = ...) -> None: ...

class FrameStats(_message.Message):
    __slots__ = ("num_points", "valid_ratio", "gate_mean", "stage_ms", "queue_ms", "decode_ms", "batch_size")
    class StageMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NUM_POINTS_FIELD_NUMBER: _ClassVar[int]
    VALID_RATIO_FIELD_NUMBER: _ClassVar[int]
    GATE_MEAN_FIELD_NUMBER: _ClassVar[int]
    STAGE_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    num_points: int
    valid_ratio: float
    gate_mean: float
    stage_ms: _containers.ScalarMap[str, float]
    queue_ms: float
    decode_ms: float
    batch_size: int
    def __init__(self, num_points: _Optional[int] = ..., valid_ratio: _Optional[float] = ..., gate_mean: _Optional[float] = ..., stage_ms: _Optional[_Mapping[str, float]] = ..., queue_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ..., batch_size: _Optional[int] = ...) -> None: ...

class EncodeFrameResponse(_message.Message):
    __slots__ = ("frame_id", "features", "alpha", "valid", "point_indices", "points_world", "stats", "model_id", "features_scale")
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    VALID_FIELD_NUMBER: _ClassVar[int]
    POINT_INDICES_FIELD_NUMBER: _ClassVar[int]
    POINTS_WORLD_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    FEATURES_SCALE_FIELD_NUMBER: _ClassVar[int]
    frame_id: str
    features: Tensor
    alpha: Tensor
    valid: Tensor
    point_indices: Tensor
    points_world: Tensor
    stats: FrameStats
    model_id: str
    features_scale: Tensor
    def __init__(self, frame_id: _Optional[str] = ..., features: _Optional[_Union[Tensor, _Mapping]] = ..., alpha: _Optional[_Union[Tensor, _Mapping]] = ..., valid: _Optional[_Union[Tensor, _Mapping]] = ..., point_indices: _Optional[_Union[Tensor, _Mapping]] = ..., points_world: _Optional[_Union[Tensor, _Mapping]] = ..., stats: _Optional[_Union[FrameStats, _Mapping]] = ..., model_id: _Optional[str] = ..., features_scale: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_batch_size", "max_queue", "max_points", "default_max_points", "max_message_bytes", "max_image_side", "min_image_side")
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    MAX_POINTS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MAX_POINTS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_SIDE_FIELD_NUMBER: _ClassVar[int]
    MIN_IMAGE_SIDE_FIELD_NUMBER: _ClassVar[int]
    max_batch_size: int
    max_queue: int
    max_points: int
    default_max_points: int
    max_message_bytes: int
    max_image_side: int
    min_image_side: int
    def __init__(self, max_batch_size: _Optional[int] = ..., max_queue: _Optional[int] = ..., max_points: _Optional[int] = ..., default_max_points: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_image_side: _Optional[int] = ..., min_image_side: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("architecture", "checkpoint_sha256", "model_id", "device", "demo_weights", "feature_dim", "amp", "limits", "server_version", "config_json", "shared_memory")
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_SHA256_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DEMO_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DIM_FIELD_NUMBER: _ClassVar[int]
    AMP_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    architecture: str
    checkpoint_sha256: str
    model_id: str
    device: str
    demo_weights: bool
    feature_dim: int
    amp: bool
    limits: Limits
    server_version: str
    config_json: str
    shared_memory: bool
    def __init__(self, architecture: _Optional[str] = ..., checkpoint_sha256: _Optional[str] = ..., model_id: _Optional[str] = ..., device: _Optional[str] = ..., demo_weights: _Optional[bool] = ..., feature_dim: _Optional[int] = ..., amp: _Optional[bool] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., server_version: _Optional[str] = ..., config_json: _Optional[str] = ..., shared_memory: _Optional[bool] = ...) -> None: ...
