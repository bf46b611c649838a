# ruff: noqa
# mypy: ignore-errors
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CreateRequest(_message.Message):
    __slots__ = ("user_id", "name", "user_hash", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

    USER_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    USER_HASH_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    name: str
    user_hash: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(
        self,
        user_id: _Optional[str] = ...,
        name: _Optional[str] = ...,
        user_hash: _Optional[str] = ...,
        metadata: _Optional[_Mapping[str, str]] = ...,
    ) -> None: ...

class CreateResponse(_message.Message):
    __slots__ = ("session_id", "visitor_id", "token", "ws_url", "status", "created")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    VISITOR_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    WS_URL_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    visitor_id: str
    token: str
    ws_url: str
    status: str
    created: bool
    def __init__(
        self,
        session_id: _Optional[str] = ...,
        visitor_id: _Optional[str] = ...,
        token: _Optional[str] = ...,
        ws_url: _Optional[str] = ...,
        status: _Optional[str] = ...,
        created: _Optional[bool] = ...,
    ) -> None: ...

class SendRequest(_message.Message):
    __slots__ = ("session_id", "text", "client_msg_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_MSG_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    text: str
    client_msg_id: str
    def __init__(
        self,
        session_id: _Optional[str] = ...,
        text: _Optional[str] = ...,
        client_msg_id: _Optional[str] = ...,
    ) -> None: ...

class SendResponse(_message.Message):
    __slots__ = ("seq", "status", "replies", "ts", "dup")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REPLIES_FIELD_NUMBER: _ClassVar[int]
    TS_FIELD_NUMBER: _ClassVar[int]
    DUP_FIELD_NUMBER: _ClassVar[int]
    seq: int
    status: str
    replies: _containers.RepeatedCompositeFieldContainer[Message]
    ts: int
    dup: bool
    def __init__(
        self,
        seq: _Optional[int] = ...,
        status: _Optional[str] = ...,
        replies: _Optional[_Iterable[_Union[Message, _Mapping]]] = ...,
        ts: _Optional[int] = ...,
        dup: _Optional[bool] = ...,
    ) -> None: ...

class CloseRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseResponse(_message.Message):
    __slots__ = ("session_id", "status")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    status: str
    def __init__(self, session_id: _Optional[str] = ..., status: _Optional[str] = ...) -> None: ...

class HistoryRequest(_message.Message):
    __slots__ = ("session_id", "after", "limit")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    after: int
    limit: int
    def __init__(
        self,
        session_id: _Optional[str] = ...,
        after: _Optional[int] = ...,
        limit: _Optional[int] = ...,
    ) -> None: ...

class HistoryResponse(_message.Message):
    __slots__ = ("messages", "more", "epoch")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[Message]
    more: bool
    epoch: int
    def __init__(
        self,
        messages: _Optional[_Iterable[_Union[Message, _Mapping]]] = ...,
        more: _Optional[bool] = ...,
        epoch: _Optional[int] = ...,
    ) -> None: ...

class Sender(_message.Message):
    __slots__ = ("role", "id", "name")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    role: str
    id: str
    name: str
    def __init__(
        self, role: _Optional[str] = ..., id: _Optional[str] = ..., name: _Optional[str] = ...
    ) -> None: ...

class Message(_message.Message):
    __slots__ = ("conv", "seq", "epoch", "id", "client_msg_id", "sender", "text", "ts", "meta_json")
    CONV_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_MSG_ID_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TS_FIELD_NUMBER: _ClassVar[int]
    META_JSON_FIELD_NUMBER: _ClassVar[int]
    conv: str
    seq: int
    epoch: int
    id: str
    client_msg_id: str
    sender: Sender
    text: str
    ts: int
    meta_json: bytes
    def __init__(
        self,
        conv: _Optional[str] = ...,
        seq: _Optional[int] = ...,
        epoch: _Optional[int] = ...,
        id: _Optional[str] = ...,
        client_msg_id: _Optional[str] = ...,
        sender: _Optional[_Union[Sender, _Mapping]] = ...,
        text: _Optional[str] = ...,
        ts: _Optional[int] = ...,
        meta_json: _Optional[bytes] = ...,
    ) -> None: ...

class ResumePoint(_message.Message):
    __slots__ = ("epoch", "last_seq")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    last_seq: int
    def __init__(self, epoch: _Optional[int] = ..., last_seq: _Optional[int] = ...) -> None: ...

class SubscribeRequest(_message.Message):
    __slots__ = ("session_id", "resume")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    resume: ResumePoint
    def __init__(
        self,
        session_id: _Optional[str] = ...,
        resume: _Optional[_Union[ResumePoint, _Mapping]] = ...,
    ) -> None: ...

class Subscribed(_message.Message):
    __slots__ = ("conv", "epoch", "top_seq", "status")
    CONV_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TOP_SEQ_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    conv: str
    epoch: int
    top_seq: int
    status: str
    def __init__(
        self,
        conv: _Optional[str] = ...,
        epoch: _Optional[int] = ...,
        top_seq: _Optional[int] = ...,
        status: _Optional[str] = ...,
    ) -> None: ...

class Resumed(_message.Message):
    __slots__ = ("conv", "recovered", "from_seq", "to_seq")
    CONV_FIELD_NUMBER: _ClassVar[int]
    RECOVERED_FIELD_NUMBER: _ClassVar[int]
    FROM_SEQ_FIELD_NUMBER: _ClassVar[int]
    TO_SEQ_FIELD_NUMBER: _ClassVar[int]
    conv: str
    recovered: bool
    from_seq: int
    to_seq: int
    def __init__(
        self,
        conv: _Optional[str] = ...,
        recovered: _Optional[bool] = ...,
        from_seq: _Optional[int] = ...,
        to_seq: _Optional[int] = ...,
    ) -> None: ...

class Event(_message.Message):
    __slots__ = ("type", "subscribed", "msg", "resumed", "frame_json")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIBED_FIELD_NUMBER: _ClassVar[int]
    MSG_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    FRAME_JSON_FIELD_NUMBER: _ClassVar[int]
    type: str
    subscribed: Subscribed
    msg: Message
    resumed: Resumed
    frame_json: bytes
    def __init__(
        self,
        type: _Optional[str] = ...,
        subscribed: _Optional[_Union[Subscribed, _Mapping]] = ...,
        msg: _Optional[_Union[Message, _Mapping]] = ...,
        resumed: _Optional[_Union[Resumed, _Mapping]] = ...,
        frame_json: _Optional[bytes] = ...,
    ) -> None: ...
