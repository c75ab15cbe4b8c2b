"""``ModelInfo`` as a plain, typed JSON object: numbers as numbers (protobuf's JSON mapping
turns uint64 into strings), every field present (also false and zero ones), and the
checkpoint config as a nested object instead of an escaped JSON string."""

from __future__ import annotations

import json

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message


def message_to_plain(message: Message) -> dict:
    """Every field of ``message`` (defaults included) as Python values; enums by name."""
    plain = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if _is_repeated(field):
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                plain[field.name] = {key: _plain_value(field.message_type.fields_by_name["value"], v)
                                     for key, v in value.items()}  # fmt: skip
            else:
                plain[field.name] = [_plain_value(field, v) for v in value]
        else:
            plain[field.name] = _plain_value(field, value)
    return plain


def model_info_dict(info: Message) -> dict:
    plain = message_to_plain(info)
    config_json = plain.pop("config_json", "")
    try:
        plain["config"] = json.loads(config_json) if config_json else {}
    except ValueError:
        plain["config"] = config_json  # not JSON: shown as sent
    return plain


def _plain_value(field: FieldDescriptor, value):
    if field.message_type is not None:
        return message_to_plain(value) if isinstance(value, Message) else value
    if field.enum_type is not None:
        known = field.enum_type.values_by_number
        return known[value].name if value in known else value
    return value


def _is_repeated(field: FieldDescriptor) -> bool:
    # protobuf >= 5 has is_repeated; 7 dropped label, which older ones need.
    repeated = getattr(field, "is_repeated", None)
    return repeated if repeated is not None else field.label == FieldDescriptor.LABEL_REPEATED
