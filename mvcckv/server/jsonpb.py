"""JSON ⇄ protobuf as etcd's gRPC gateway reads and writes it.

etcd 3.4 serves its JSON API through grpc-gateway v1 with the JSONPb
marshaler set to ``OrigName: true`` and ``EmitDefaults: false``:

* Out: field names are the proto names (``range_end``, ``ID``, ``TTL``,
  ``dbSize``, ``clientURLs``); 64-bit integers are JSON strings
  (``"revision":"2"``), 32-bit ones numbers (``"hash":123``); bytes are
  standard base64 with padding; enums are their names; a field at its zero
  value is left out (no ``"count"`` when 0, no ``"type"`` for a PUT
  event), except a oneof member that is set.  Clients rely on the
  omissions: etcd3gw reads a delete as done only if ``"deleted"`` is there.
* In: a field may be named by its proto name or its camelCase JSON name;
  64-bit integers as strings or numbers; enums as names or numbers;
  unknown fields are ignored; ``null`` leaves a field unset.  Anything else
  is refused with the message Go's decoder gives (``illegal base64 data at
  input byte 0``, ``json: cannot unmarshal number into Go value of type
  []uint8``, ``unknown value "X" for enum ...``), which the gateway sends
  back as InvalidArgument.

The decoder is written here instead of taken from
``google.protobuf.json_format`` because that one is more lenient than Go
(URL-safe and unpadded base64, fractional integers) and words its errors
differently; etcd's clients see Go's words.
"""

from __future__ import annotations

import base64
import binascii
import json
import re

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

F = FieldDescriptor


class DecodeError(ValueError):
    """A body the gateway cannot turn into the request (HTTP 400, code 3);
    ``str()`` is Go's message."""


# --- out ------------------------------------------------------------------------


def marshal(message: Message) -> bytes:
    """The message as etcd's gateway writes it (compact, proto field order)."""
    return json.dumps(to_dict(message), separators=(",", ":")).encode()


def to_dict(message: Message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


# --- in -------------------------------------------------------------------------

_DECODER = json.JSONDecoder()
_WHITESPACE = re.compile(r"[ \t\n\r]*")


def next_value(text: str, pos: int) -> tuple[object, int] | None:
    """The next JSON value in ``text`` from ``pos`` and the position after
    it, or None at the end (only whitespace left), as Go's ``json.Decoder``
    reads a stream of values: what follows a value is not looked at until
    the next call.  Raises :class:`DecodeError`, also for a value cut short
    (``unexpected EOF``)."""
    pos = _WHITESPACE.match(text, pos).end()
    if pos == len(text):
        return None
    try:
        return _DECODER.raw_decode(text, pos)
    except json.JSONDecodeError as err:
        raise DecodeError(_go_syntax_error(err)) from None


def complete(text: str, pos: int) -> bool:
    """Whether ``text[pos:]`` starts with a whole JSON value (a stream
    reader waits for more bytes otherwise)."""
    try:
        return next_value(text, pos) is not None
    except DecodeError as err:
        return str(err) != "unexpected EOF"


def parse(body: bytes, cls: type[Message]) -> Message:
    """A unary request body: its first JSON value (an empty body is the
    empty request), as grpc-gateway decodes it."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        text = body.decode("utf-8", errors="replace")
    found = next_value(text, 0)
    message = cls()
    if found is not None:
        fill(message, found[0])
    return message


def fill(message: Message, value: object) -> None:
    """Set ``message`` from one decoded JSON value (a JSON object)."""
    if not isinstance(value, dict):
        raise DecodeError(f"json: cannot unmarshal {_json_kind(value)} into Go value of type "
                          "map[string]json.RawMessage")
    descriptor: Descriptor = message.DESCRIPTOR
    fields = _fields_by_name(descriptor)
    for name, item in value.items():
        field = fields.get(name)
        if field is None or item is None:
            continue  # unknown fields are ignored; null leaves the field unset
        if field.is_repeated:
            if not isinstance(item, list):
                raise DecodeError(f"json: cannot unmarshal {_json_kind(item)} into Go value of type "
                                  "[]json.RawMessage")
            target = getattr(message, field.name)
            for element in item:
                if field.type == F.TYPE_MESSAGE:
                    fill(target.add(), element)
                else:
                    target.append(_scalar(field, element))
        elif field.type == F.TYPE_MESSAGE:
            sub = getattr(message, field.name)
            sub.SetInParent()  # an empty object still sets a oneof member
            fill(sub, item)
        else:
            setattr(message, field.name, _scalar(field, item))


_FIELD_CACHE: dict[str, dict[str, FieldDescriptor]] = {}


def _fields_by_name(descriptor: Descriptor) -> dict[str, FieldDescriptor]:
    fields = _FIELD_CACHE.get(descriptor.full_name)
    if fields is None:
        fields = {}
        for field in descriptor.fields:
            fields[field.json_name] = field
            fields[field.name] = field
        _FIELD_CACHE[descriptor.full_name] = fields
    return fields


_INT_TYPES = {
    F.TYPE_INT64: ("int64", -(2**63), 2**63 - 1), F.TYPE_SINT64: ("int64", -(2**63), 2**63 - 1),
    F.TYPE_SFIXED64: ("int64", -(2**63), 2**63 - 1),
    F.TYPE_UINT64: ("uint64", 0, 2**64 - 1), F.TYPE_FIXED64: ("uint64", 0, 2**64 - 1),
    F.TYPE_INT32: ("int32", -(2**31), 2**31 - 1), F.TYPE_SINT32: ("int32", -(2**31), 2**31 - 1),
    F.TYPE_SFIXED32: ("int32", -(2**31), 2**31 - 1),
    F.TYPE_UINT32: ("uint32", 0, 2**32 - 1), F.TYPE_FIXED32: ("uint32", 0, 2**32 - 1),
}


def _scalar(field: FieldDescriptor, value: object):
    kind = field.type
    if kind == F.TYPE_BYTES:
        if not isinstance(value, str):
            raise DecodeError(f"json: cannot unmarshal {_json_kind(value)} into Go value of type []uint8")
        return decode_base64(value)
    if kind == F.TYPE_STRING:
        if not isinstance(value, str):
            raise DecodeError(f"json: cannot unmarshal {_json_kind(value)} into Go value of type string")
        return value
    if kind == F.TYPE_BOOL:
        if not isinstance(value, bool):
            raise DecodeError(f"json: cannot unmarshal {_json_kind(value)} into Go value of type bool")
        return value
    if kind == F.TYPE_ENUM:
        return _enum(field, value)
    if kind in _INT_TYPES:
        return _integer(_INT_TYPES[kind], value)
    raise DecodeError(f"json: cannot unmarshal {_json_kind(value)} into a {field.name} field")


def _integer(kind: tuple[str, int, int], value: object) -> int:
    go_type, low, high = kind
    if isinstance(value, str):
        # jsonpb unquotes an integer given as a string and reads the
        # inside as JSON: "x" fails like the bare character would.
        found = next_value(value, 0) if value.strip() else None
        if found is None:
            raise DecodeError("unexpected end of JSON input")
        value = found[0]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DecodeError(f"json: cannot unmarshal {_json_kind(value)} into Go value of type {go_type}")
    if isinstance(value, float) or not low <= value <= high:
        raise DecodeError(f"json: cannot unmarshal number {_go_number(value)} into Go value of type {go_type}")
    return value


def _enum(field: FieldDescriptor, value: object) -> int:
    enum = field.enum_type
    if isinstance(value, str):
        member = enum.values_by_name.get(value)
        if member is None:
            raise DecodeError(f'unknown value "{value}" for enum {_go_enum_name(enum)}')
        return member.number
    if isinstance(value, bool) or not isinstance(value, int) or not -(2**31) <= value < 2**31:
        raise DecodeError(f"json: cannot unmarshal {_json_kind(value)} into Go value of type "
                          f"{_go_enum_name(enum)}")
    return value


def _go_enum_name(enum) -> str:
    # Go's generated name: the package, then the nesting joined by "_"
    # (etcdserverpb.RangeRequest_SortOrder).
    package = enum.file.package
    return f"{package}.{enum.full_name[len(package) + 1:].replace('.', '_')}"


_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


def decode_base64(text: str) -> bytes:
    """Standard base64 with padding, strictly, as Go's ``encoding/json``
    reads ``[]byte``; the error names the byte Go names."""
    match = _BASE64.match(text)
    end = match.end()
    if end < len(text):
        raise DecodeError(f"illegal base64 data at input byte {end}")
    if len(text) % 4:
        # Go stops at the quantum left incomplete.
        raise DecodeError(f"illegal base64 data at input byte {len(text) - len(text) % 4}")
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        raise DecodeError("illegal base64 data at input byte 0") from None


def _json_kind(value: object) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null"


def _go_number(value: int | float) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


def _go_syntax_error(err: json.JSONDecodeError) -> str:
    """Go's ``json.Decoder`` message for the syntax error Python found."""
    text, pos = err.doc, err.pos
    if pos >= len(text) or err.msg.startswith("Unterminated string"):
        return "unexpected EOF"
    char = text[pos]
    shown = _go_char(char)
    if err.msg == "Expecting value":
        for literal in ("null", "true", "false"):
            if char == literal[0]:
                for i, expected in enumerate(literal[1:], 1):
                    if pos + i >= len(text):
                        return "unexpected EOF"
                    if text[pos + i] != expected:
                        return f"invalid character {_go_char(text[pos + i])} in literal {literal} " \
                               f"(expecting '{expected}')"
        return f"invalid character {shown} looking for beginning of value"
    if err.msg.startswith("Expecting property name"):
        return f"invalid character {shown} looking for beginning of object key string"
    if err.msg.startswith("Expecting ':'"):
        return f"invalid character {shown} after object key"
    if err.msg.startswith("Expecting ','"):
        inside = _innermost_open(text, pos)
        where = "object key:value pair" if inside == "{" else "array element"
        return f"invalid character {shown} after {where}"
    return f"invalid character {shown} in string literal" if "string" in err.msg.lower() else err.msg


def _go_char(char: str) -> str:
    if char == "'":
        return "'\\''"
    if char == '"':
        return "'\"'"
    if char < " ":
        return repr(char)
    return f"'{char}'"


def _innermost_open(text: str, pos: int) -> str:
    """``{`` or ``[``: the container open at ``pos`` (strings skipped)."""
    stack: list[str] = []
    in_string = escaped = False
    for char in text[:pos]:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            stack.append(char)
        elif char in "}]" and stack:
            stack.pop()
    return stack[-1] if stack else "{"
