"""Request messages checked as they are decoded, before any servicer sees them.

:class:`services.common.server.StatusMappingInterceptor` wraps every handler's request deserializer with
:func:`checked_deserializer`. Bytes that do not decode to the request message, or a message carrying an enum
value its proto does not define (proto3 enums keep unknown numbers, so ``task = 99`` would otherwise be
served as if it were valid), become a :class:`Rejected` logged at WARNING without a traceback; the handler
then raises its :class:`~services.common.errors.InvalidArgument` in place of the request (:func:`accepted`,
:func:`accepted_stream`). A raising deserializer would instead end the call UNKNOWN or INTERNAL before any
of our code runs.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from services.common.errors import InvalidArgument

logger = logging.getLogger(__name__)


def check_enums(message: Message, prefix: str = "") -> None:
    """Checks that every enum field set in ``message`` (nested messages included) holds a defined value.

    Args:
        message: A decoded proto message.
        prefix: Path of ``message`` in the request, for error messages ("config.").

    Raises:
        InvalidArgument: An enum field holds a number its enum does not define; the message names the field
            and the values allowed.
    """
    for field, value in message.ListFields():
        if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
            field, values = field.message_type.fields_by_name["value"], list(value.values())
        else:
            values = list(value) if field.is_repeated else [value]
        _check_values(field, values, prefix + field.name)


def _check_values(field: FieldDescriptor, values: Sequence[Any], path: str) -> None:
    if field.type == FieldDescriptor.TYPE_ENUM:
        enum = field.enum_type
        for number in values:
            if number not in enum.values_by_number:
                allowed = ", ".join(f"{v.name} ({v.number})" for v in enum.values)
                raise InvalidArgument(
                    f"{path} {number} is not defined in {enum.full_name}: use one of {allowed}"
                )
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        for item in values:
            check_enums(item, path + ".")


@dataclasses.dataclass(frozen=True)
class Rejected:
    """Stands in for a request message that did not decode or check; the handler raises ``error``."""

    error: InvalidArgument


def checked_deserializer(
    deserialize: Callable[[bytes], Any] | None, method: str
) -> Callable[[bytes], Any] | None:
    """Wraps a handler's request deserializer so that a bad message becomes a :class:`Rejected`.

    Args:
        deserialize: The generated ``FromString`` of the request message; ``None`` passes raw bytes through.
        method: Full method name, for the log line.

    Returns:
        A deserializer that returns the message, or a :class:`Rejected` naming the message type and the
        decode error or the bad enum field; it never raises.
    """
    if deserialize is None:
        return None
    descriptor = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    name = descriptor.full_name if descriptor is not None else "request message"

    def parse(data: bytes) -> Any:
        try:
            message = deserialize(data)
            check_enums(message)
        except DecodeError as exc:
            # DecodeError reads "Error parsing message with type '<name>': <reason>"; the name is said once.
            reason = str(exc).rpartition("': ")[2]
            error = InvalidArgument(f"request is not a valid {name}: {reason}")
        except InvalidArgument as exc:
            error = exc
        else:
            return message
        logger.warning("%s: %s", method, error)
        return Rejected(error)

    return parse


def accepted(request: Any) -> Any:
    """``request`` itself, unless it is a :class:`Rejected`.

    Raises:
        InvalidArgument: ``request`` is a :class:`Rejected`.
    """
    if isinstance(request, Rejected):
        raise request.error
    return request


async def accepted_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """The messages of a request stream, in order, through :func:`accepted`.

    Raises:
        InvalidArgument: At the first :class:`Rejected` message.
    """
    async for request in requests:
        yield accepted(request)
