"""What crosses the sandbox boundary: plain values as tagged JSON, in length-prefixed frames over pipes.

Only None, bool, int, float, complex, str, bytes, and lists, tuples, dicts, sets and frozensets of them cross.
A subclass travels as its base type, so an object with its own __eq__ (the "always equal" reward hack) never
reaches the checker, only the value it wraps. The receiver rebuilds exact built-in types from JSON, which no
byte string can turn into code, so whatever a hostile sample writes decodes to plain data or to a WireError.
Both sides import this module: the parent as sharelora_cli.evaluation.sandbox.wire, the child (standard
library only) from the source the parent hands it.

Decoding costs time and memory linear in the frame's size, whatever the bytes: the evaluator decodes in a thread
that shares the GIL with every other sample's. So nesting is capped before parsing (deep JSON would recurse in C),
numbers are capped in digits whatever sys.set_int_max_str_digits says (int() of n digits costs n^2), and a set,
frozenset or dict is only built when few of its members share a hash value: members with equal hashes
(k * (2**61 - 1) are all 0 for int) land in the same probe chain, and building such a set of n members costs n^2
comparisons (15.8 s for 44k ints in a 1 MiB reply).
"""

import json
import math
import os
import re
import select
import struct
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

_HEADER = struct.Struct(">I")  # payload length
MAX_DEPTH = 100  # JSON brackets inside brackets (a tagged type takes two); HumanEval's values need 6 at most
MAX_DIGITS = 4300  # of one integer: CPython's own default limit, held here whatever the process has set
MAX_SAME_HASH = 8  # members of one set or dict sharing a hash value; unequal plain values rarely share one
_ESCAPE, _STRING = re.compile(rb"\\."), re.compile(rb'"[^"]*+"')  # possessive: no backtracking
_LONG_NUMBER = re.compile(rb"(?<!\d)\d{%d}" % (MAX_DIGITS + 1))  # tried only where a run of digits starts
_BRACKETS = bytes.maketrans(b"[{]}", b"(())")
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[{]}")))
# JSON objects are never values here: each one is a tag naming the type its single field rebuilds.
_REBUILD: dict[str, Callable[[Any], object]] = {
    "tuple": tuple,
    "set": lambda members: set(_few_collisions(members)),
    "frozenset": lambda members: frozenset(_few_collisions(members)),
    "dict": lambda pairs: dict(zip(_few_collisions([key for key, _ in pairs]), [item for _, item in pairs])),
    "bytes": lambda text: text.encode("latin-1"),
    "complex": lambda parts: complex(*parts),
}
_CONTAINERS = ((tuple, "tuple"), (frozenset, "frozenset"), (set, "set"))


class WireError(ValueError):
    """A value that is not plain data, or a frame that is malformed or too large."""


def encode(value) -> bytes:
    try:
        return json.dumps(_tagged(value), ensure_ascii=True, separators=(",", ":")).encode("ascii")
    except (RecursionError, ValueError, TypeError) as err:  # another type, too deep, an int past the digit limit
        raise WireError(f"not plain data: {err}") from None


def decode(data: bytes):
    try:
        _check_shape(data)
        return json.loads(data.decode("ascii"), object_pairs_hook=_rebuild)
    except (RecursionError, ValueError, TypeError) as err:
        raise WireError(f"not plain data: {err}") from None


def _check_shape(data: bytes) -> None:
    """ValueError for a number of more than MAX_DIGITS digits, or brackets nested deeper than MAX_DEPTH (or not
    balanced), outside strings; in C-speed passes over the bytes: escapes go first, so each string is then a
    plain quote-to-quote run, and each pass of the loop drops the innermost bracket pairs."""
    outside_strings = _STRING.sub(b"", _ESCAPE.sub(b"", data))
    if _LONG_NUMBER.search(outside_strings):
        raise ValueError(f"a number of more than {MAX_DIGITS} digits")
    brackets = outside_strings.translate(_BRACKETS, delete=_NOT_BRACKETS)
    for _ in range(MAX_DEPTH):
        if not brackets:
            return
        brackets = brackets.replace(b"()", b"")
    if brackets:
        raise ValueError(f"brackets nested more than {MAX_DEPTH} deep, or unbalanced")


def _few_collisions(members: list) -> list:
    """The members, or ValueError when more than MAX_SAME_HASH of them share a hash (TypeError: unhashable)."""
    counts = Counter(map(hash, members))
    if counts and max(counts.values()) > MAX_SAME_HASH:
        raise ValueError(f"a set or dict with more than {MAX_SAME_HASH} members of one hash value")
    return members


def _tagged(value):
    """A JSON-ready tree; subclasses of the built-in types are reduced to their base type."""
    if value is None or value is True or value is False:
        return value
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, list):
        return [_tagged(item) for item in value]
    if isinstance(value, dict):
        return {"dict": [[_tagged(key), _tagged(item)] for key, item in dict.items(value)]}
    if isinstance(value, bytes):
        return {"bytes": bytes.__bytes__(value).decode("latin-1")}
    if isinstance(value, complex):
        number = complex.__complex__(value)
        return {"complex": [number.real, number.imag]}
    for kind, tag in _CONTAINERS:
        if isinstance(value, kind):
            return {tag: [_tagged(item) for item in value]}
    raise TypeError(f"a {type(value).__name__} value")


def _rebuild(pairs: list):
    if len(pairs) != 1 or pairs[0][0] not in _REBUILD:
        raise ValueError("a JSON object that is not a known type tag")
    tag, body = pairs[0]
    if type(body) is not (str if tag == "bytes" else list):
        raise TypeError(tag)
    if tag == "dict" and not all(type(pair) is list and len(pair) == 2 for pair in body):
        raise TypeError("dict entries must be [key, value] pairs")
    return _REBUILD[tag](body)


def describe(err: BaseException) -> str:
    """How a failure is reported across the boundary and in results: "Type: first line of the message"."""
    try:
        lines = str(err).strip().splitlines()
    except Exception:  # a hostile __str__ must not cost the report
        lines = []
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def send(fd: int, payload: bytes, deadline: float | None = None) -> None:
    """Write one frame; with a deadline the descriptor must be non-blocking (TimeoutError once it passes)."""
    data = memoryview(_HEADER.pack(len(payload)) + payload)
    while data:
        _wait(fd, select.POLLOUT, deadline)
        try:
            data = data[os.write(fd, data) :]
        except BlockingIOError:
            continue


def receive(fd: int, max_bytes: int, deadline: float | None = None) -> bytes | None:
    """Read one frame, or None at end of file before it; WireError for a frame over max_bytes or cut short."""
    header = _read_exactly(fd, _HEADER.size, deadline)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    if size > max_bytes:
        raise WireError(f"a reply of {size} bytes exceeds the limit of {max_bytes}")
    payload = _read_exactly(fd, size, deadline)
    if payload is None:
        raise WireError("the reply was cut short")
    return payload


def _read_exactly(fd: int, size: int, deadline: float | None) -> bytes | None:
    chunks, missing = [], size
    while missing:
        _wait(fd, select.POLLIN, deadline)
        chunk = os.read(fd, min(missing, 1 << 16))
        if not chunk:
            if missing == size:
                return None
            raise WireError("the reply was cut short")
        chunks.append(chunk)
        missing -= len(chunk)
    return b"".join(chunks)


def _wait(fd: int, events: int, deadline: float | None) -> None:
    if deadline is None:
        return
    poller = select.poll()
    poller.register(fd, events)
    if not poller.poll(max(0, math.ceil((deadline - time.monotonic()) * 1000))):
        raise TimeoutError
