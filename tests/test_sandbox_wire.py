"""Values crossing the sandbox boundary arrive as exact built-in types, and no byte string decodes to anything else."""

import json
import math
import os
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sharelora_cli.evaluation.sandbox import wire as sandbox_wire
from sharelora_cli.evaluation.sandbox.wire import WireError, decode, encode

hashable = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text() | st.binary(),
    lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3),
    max_leaves=8,
)
plain = st.recursive(
    hashable | st.complex_numbers(allow_nan=False),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(hashable, inner, max_size=3) | st.sets(hashable, max_size=3)
    ),
    max_leaves=20,
)


def _exact_types(value) -> list:
    """The value's type tree, so equal values of different types (1 == 1.0 == True, [1] vs (1,)) are told apart."""
    if isinstance(value, (list, tuple)):
        return [type(value), [_exact_types(item) for item in value]]
    if isinstance(value, dict):
        return [dict, sorted(repr((_exact_types(key), _exact_types(item))) for key, item in value.items())]
    if isinstance(value, (set, frozenset)):
        return [type(value), sorted(repr(_exact_types(item)) for item in value)]
    return [type(value)]


@settings(max_examples=300, deadline=None)
@given(plain)
def test_plain_values_round_trip_with_their_exact_types(value):
    decoded = decode(encode(value))
    assert decoded == value
    assert _exact_types(decoded) == _exact_types(value)


def test_special_floats_keep_their_identity():
    values = decode(encode([math.inf, -math.inf, -0.0, math.nan]))
    assert values[:2] == [math.inf, -math.inf]
    assert math.copysign(1.0, values[2]) == -1.0 and math.isnan(values[3])


def test_subclasses_cross_as_their_base_type_without_their_methods():
    class AlwaysEqual(str):
        def __eq__(self, other):
            return True

        __hash__ = str.__hash__

    class Loud(int):
        pass

    decoded = decode(encode((AlwaysEqual("wrong"), Loud(7))))
    assert decoded == ("wrong", 7)
    assert [type(item) for item in decoded] == [str, int]
    assert decoded[0] != "right"


@pytest.mark.parametrize("value", [object(), len, iter([1]), (x for x in ()), bytearray(b"x"), range(3), type])
def test_anything_else_is_refused(value):
    with pytest.raises(WireError, match="not plain data"):
        encode([1, {"key": value}])


def test_self_referencing_and_too_deep_values_are_refused():
    loop = []
    loop.append(loop)
    with pytest.raises(WireError):
        encode(loop)
    deep = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(WireError):
        encode(deep)


@pytest.mark.parametrize(
    "data",
    [
        b"{}",  # an object that is no type tag
        b'{"tuple": [1], "set": [2]}',  # two tags
        b'{"eval": "__import__(\'os\')"}',  # an unknown tag
        b'{"set": [[1, 2]]}',  # unhashable member
        b'{"dict": [[[1], 2]]}',  # unhashable key
        b'{"dict": [[1, 2, 3]]}',
        b'{"bytes": "\\u0100"}',  # not a byte
        b'{"tuple": "abc"}',
        b"[" * 200_000 + b"]" * 200_000,  # nesting past the recursion limit
        b"1" * 5000,  # an integer past Python's digit limit
        b"\xff\xfe",
        b"",
    ],
)
def test_hostile_bytes_decode_to_a_wire_error_only(data):
    with pytest.raises(WireError):
        decode(data)


@settings(max_examples=500, deadline=None)
@given(
    st.binary(max_size=64) | st.text(alphabet='[]{}":,0123456789.eE-+ tuplesdicbyomx\\u', max_size=64).map(str.encode)
)
def test_arbitrary_bytes_never_raise_anything_but_a_wire_error(data):
    try:
        value = decode(data)
    except WireError:
        return
    assert decode(encode(value)) == value or value != value  # plain data (NaN is the one value unequal to itself)


def _frames(raw: bytes, max_bytes: int) -> list:
    """What receive() makes of a byte stream: payloads until end of file, or the error that stops it."""
    read, write = os.pipe()
    os.write(write, raw)
    os.close(write)
    frames = []
    try:
        while (frame := sandbox_wire.receive(read, max_bytes)) is not None:
            frames.append(frame)
    except WireError as err:
        frames.append(str(err))
    finally:
        os.close(read)
    return frames


def test_frames_carry_payloads_and_refuse_oversized_or_truncated_ones():
    assert _frames(b"\x00\x00\x00\x05hello\x00\x00\x00\x00", 10) == [b"hello", b""]
    assert _frames(b"\x00\x00\x00\x0b" + b"x" * 11, 10) == ["a reply of 11 bytes exceeds the limit of 10"]
    assert _frames(b"\x00\x00\x00\x09abc", 10) == ["the reply was cut short"]
    assert _frames(b"\x00\x00", 10) == ["the reply was cut short"]


def test_receiving_gives_up_at_the_deadline():
    read, write = os.pipe()
    try:
        with pytest.raises(TimeoutError):
            sandbox_wire.receive(read, max_bytes=10, deadline=0.0)
    finally:
        os.close(read)
        os.close(write)


COLLIDING = [k * (2**61 - 1) for k in range(1, 200)]  # every one hashes to 0: one probe chain for all


@pytest.mark.parametrize("tag", ["set", "frozenset"])
def test_a_hash_flooded_set_is_refused_before_it_is_built(tag):
    frame = json.dumps({tag: COLLIDING}).encode()
    with pytest.raises(WireError, match=r"more than 8 members of one hash value"):
        decode(frame)
    tuples = json.dumps({tag: [{"tuple": [n, 1]} for n in COLLIDING]}).encode()
    with pytest.raises(WireError, match=r"more than 8 members of one hash value"):
        decode(tuples)  # tuples of colliding ints collide too


def test_a_hash_flooded_dict_is_refused_and_a_few_shared_hashes_are_fine():
    with pytest.raises(WireError, match=r"more than 8 members of one hash value"):
        decode(json.dumps({"dict": [[n, 0] for n in COLLIDING]}).encode())
    few = COLLIDING[: sandbox_wire.MAX_SAME_HASH]
    assert decode(encode(set(few))) == set(few)
    assert decode(encode({-1: "a", -2: "b"})) == {-1: "a", -2: "b"}  # hash(-1) == hash(-2)


def test_integers_are_capped_in_digits_whatever_the_process_allows():
    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)  # unlimited: int() of n digits would cost n^2
    try:
        assert decode(b"9" * sandbox_wire.MAX_DIGITS) == int("9" * sandbox_wire.MAX_DIGITS)
        with pytest.raises(WireError, match="a number of more than 4300 digits"):
            decode(b"[-" + b"9" * 100_000 + b"]")
        assert decode(encode(["9" * 100_000, 1.5e300])) == ["9" * 100_000, 1.5e300]  # digits in text do not count
    finally:
        sys.set_int_max_str_digits(limit)


def test_nesting_is_capped_outside_strings_only():
    depth = sandbox_wire.MAX_DEPTH
    assert decode(b"[" * depth + b"]" * depth) is not None
    with pytest.raises(WireError, match=f"nested more than {depth} deep"):
        decode(b"[" * (depth + 1) + b"]" * (depth + 1))
    brackets_in_text = '["' + "[{" * 5000 + '\\"]"]'
    assert decode(brackets_in_text.encode()) == ["[{" * 5000 + '"]']
    with pytest.raises(WireError):
        decode(b'["' + b'\\"' * 100_000)  # a string that never ends: one linear pass, then an error
