"""RFC 6455 framing (peersig/framing.py): pure functions, checked against the RFC's own
examples and against a frame builder written from section 5.2."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from peersig import framing
from peersig.framing import PING_FRAME, PONG, accept_key, split_frames, text_frame, unmask


def client_frame(payload: bytes, opcode: int = 1, fin: bool = True,
                 mask: bytes = b"\x11\x22\x33\x44", length_bytes: int | None = None) -> bytes:
    """A masked client frame as section 5.2 lays it out; ``length_bytes`` forces the
    encoding of the length (0, 2 or 8 extra bytes)."""
    size = len(payload)
    if length_bytes is None:
        length_bytes = 0 if size < 126 else 2 if size < 65536 else 8
    head = bytes(((0x80 if fin else 0) | opcode,))
    if length_bytes == 0:
        head += bytes((0x80 | size,))
    elif length_bytes == 2:
        head += bytes((0x80 | 126,)) + size.to_bytes(2, "big")
    else:
        head += bytes((0x80 | 127,)) + size.to_bytes(8, "big")
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


def test_the_accept_key_of_the_rfc_example() -> None:
    # RFC 6455 section 1.3
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 125, 126, 127, 128, 1200, 65536])
@pytest.mark.parametrize("native", [True, False], ids=["as-installed", "big-integer"])
def test_unmask_matches_the_rfc(size: int, native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not native:
        monkeypatch.setattr(framing, "_native_unmask", None)
    payload, mask = os.urandom(size), os.urandom(4)
    assert unmask(mask, payload) == bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def test_the_rfc_example_frames() -> None:
    # RFC 6455 section 5.7: a masked "Hello", and an unmasked one from the server
    hello = bytes.fromhex("818537fa213d7f9f4d5158")
    assert split_frames(hello, 0) == [(b"Hello", len(hello))]
    assert text_frame(b"Hello") == bytes.fromhex("810548656c6c6f")
    assert PING_FRAME == b"\x89\x00"


@pytest.mark.parametrize("size, head", [
    (0, b"\x81\x00"), (125, b"\x81\x7d"), (126, b"\x81\x7e\x00\x7e"),
    (65535, b"\x81\x7e\xff\xff"), (65536, b"\x81\x7f" + (65536).to_bytes(8, "big")),
])
def test_server_frames_use_the_shortest_length(size: int, head: bytes) -> None:
    payload = b"x" * size
    assert text_frame(payload) == head + payload


def test_several_frames_and_pongs_in_one_read() -> None:
    data = client_frame(b"a") + client_frame(b"", opcode=10) + client_frame(b"b" * 300)
    assert split_frames(data, 0) == [(b"a", 7), (PONG, 13), (b"b" * 300, len(data))]


@pytest.mark.parametrize("name, frame", [
    ("binary", client_frame(b"x", opcode=2)),
    ("fragment", client_frame(b"x", fin=False)),
    ("continuation", client_frame(b"x", opcode=0)),
    ("close", client_frame(b"\x03\xe8", opcode=8)),
    ("ping", client_frame(b"", opcode=9)),
    ("pong with a body", client_frame(b"x", opcode=10)),
    ("not minimally encoded", client_frame(b"x", length_bytes=2)),
    ("64-bit length", client_frame(b"x" * 200, length_bytes=8)),
    ("unmasked", text_frame(b"x" * 10)),
    ("cut short", client_frame(b"x" * 300)[:-1]),
    ("header cut", client_frame(b"x" * 300)[:5]),
    ("over the limit", client_frame(b"x" * 101)),
])
def test_anything_else_stops_the_split_where_it_starts(name: str, frame: bytes) -> None:
    first = client_frame(b"ok")
    assert split_frames(first + frame, 100) == [(b"ok", len(first))], name


@given(st.lists(st.binary(max_size=70000), max_size=6))
def test_any_run_of_text_frames_comes_back_whole(payloads: list[bytes]) -> None:
    data = b"".join(client_frame(p) for p in payloads)
    frames = split_frames(data, 0)
    assert [f for f, _end in frames] == payloads
    assert (frames[-1][1] if frames else 0) == (len(data) if payloads else 0)


@given(st.binary(max_size=300))
def test_any_bytes_split_without_error_within_their_length(data: bytes) -> None:
    ends = [end for _f, end in split_frames(data, 125)]
    assert ends == sorted(ends) and all(0 < e <= len(data) for e in ends)
