from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KVLayoutSpec(_message.Message):
    __slots__ = ("model_fingerprint", "num_layers", "num_kv_heads", "head_dim", "rope_theta", "rope_scaling")
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    ROPE_THETA_FIELD_NUMBER: _ClassVar[int]
    ROPE_SCALING_FIELD_NUMBER: _ClassVar[int]
    model_fingerprint: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rope_scaling: _containers.RepeatedCompositeFieldContainer[RopeScalingEntry]
    def __init__(self, model_fingerprint: _Optional[str] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., rope_theta: _Optional[float] = ..., rope_scaling: _Optional[_Iterable[_Union[RopeScalingEntry, _Mapping]]] = ...) -> None: ...

class RopeScalingEntry(_message.Message):
    __slots__ = ("key", "value")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    key: str
    value: str
    def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class HandshakeRequest(_message.Message):
    __slots__ = ("v", "hash", "layout")
    V_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    v: int
    hash: str
    layout: KVLayoutSpec
    def __init__(self, v: _Optional[int] = ..., hash: _Optional[str] = ..., layout: _Optional[_Union[KVLayoutSpec, _Mapping]] = ...) -> None: ...

class HandshakeReply(_message.Message):
    __slots__ = ("v", "ok", "hash", "layout", "dtypes", "dport")
    V_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    DTYPES_FIELD_NUMBER: _ClassVar[int]
    DPORT_FIELD_NUMBER: _ClassVar[int]
    v: int
    ok: bool
    hash: str
    layout: KVLayoutSpec
    dtypes: _containers.RepeatedScalarFieldContainer[str]
    dport: int
    def __init__(self, v: _Optional[int] = ..., ok: _Optional[bool] = ..., hash: _Optional[str] = ..., layout: _Optional[_Union[KVLayoutSpec, _Mapping]] = ..., dtypes: _Optional[_Iterable[str]] = ..., dport: _Optional[int] = ...) -> None: ...

class KVFrame(_message.Message):
    __slots__ = ("frame",)
    FRAME_FIELD_NUMBER: _ClassVar[int]
    frame: bytes
    def __init__(self, frame: _Optional[bytes] = ...) -> None: ...

class PushAck(_message.Message):
    __slots__ = ("rid", "ntok", "chunks", "bytes", "dt", "ms")
    RID_FIELD_NUMBER: _ClassVar[int]
    NTOK_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    DT_FIELD_NUMBER: _ClassVar[int]
    MS_FIELD_NUMBER: _ClassVar[int]
    rid: str
    ntok: int
    chunks: int
    bytes: int
    dt: str
    ms: float
    def __init__(self, rid: _Optional[str] = ..., ntok: _Optional[int] = ..., chunks: _Optional[int] = ..., bytes: _Optional[int] = ..., dt: _Optional[str] = ..., ms: _Optional[float] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("rid",)
    RID_FIELD_NUMBER: _ClassVar[int]
    rid: str
    def __init__(self, rid: _Optional[str] = ...) -> None: ...

class CancelReply(_message.Message):
    __slots__ = ("ok", "found")
    OK_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    found: bool
    def __init__(self, ok: _Optional[bool] = ..., found: _Optional[bool] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("v", "ok", "active", "reserved", "dport")
    V_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    DPORT_FIELD_NUMBER: _ClassVar[int]
    v: int
    ok: bool
    active: int
    reserved: int
    dport: int
    def __init__(self, v: _Optional[int] = ..., ok: _Optional[bool] = ..., active: _Optional[int] = ..., reserved: _Optional[int] = ..., dport: _Optional[int] = ...) -> None: ...
