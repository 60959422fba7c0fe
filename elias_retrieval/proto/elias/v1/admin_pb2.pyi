from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class ReloadIndexRequest(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class ReloadIndexResponse(_message.Message):
    __slots__ = ("index_version", "previous_version", "load_seconds", "path")
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    index_version: str
    previous_version: str
    load_seconds: float
    path: str
    def __init__(self, index_version: _Optional[str] = ..., previous_version: _Optional[str] = ..., load_seconds: _Optional[float] = ..., path: _Optional[str] = ...) -> None: ...
