"""Frame parsing and encoding (SPEC §1, §5)."""

import json

import pytest

from peersig import messages
from peersig.messages import BadFrame, parse_frame


def _short(value: object) -> str:
    return repr(value)[:40]


@pytest.mark.parametrize(
    ("data", "reason"),
    ids=_short,
    argvalues=[
        (b"not json", "bad_json"),
        (b"\xff\xfe{}", "bad_json"),
        (b'{"type":"OFFER","dst":"a","payload":NaN}', "bad_json"),
        (b"[" * 100000, "not_object"),
        (b'{"type":"OFFER","dst":"b","payload":' + b"[" * 100000 + b"]" * 100000 + b"}",
         "bad_json"),
        (b"[1,2]", "not_object"),
        (b"null", "not_object"),
        (b'"OFFER"', "not_object"),
        (b"{}", "bad_type"),
        (b'{"type":"OPEN"}', "bad_type"),
        (b'{"type":"ERROR"}', "bad_type"),
        (b'{"type":"offer","dst":"a"}', "bad_type"),
        (b'{"type":7}', "bad_type"),
        (b'{"type":["OFFER"],"dst":"b"}', "bad_type"),  # found by fuzzing: unhashable
        (b'{"type":{}}', "bad_type"),
        (b'{"type":"OFFER","dst":"b","payload":"\\ud800",}', "bad_json"),
        (b'{"type":"OFFER","dst":"b","payload":"\\ud800"} x', "bad_json"),
        (b'{"type":"OFFER","dst":"b","payload":["\\ud800",NaN]}', "bad_json"),
        (b'{"type":"OFFER","dst":"b","payload":"\\ud800\x01"}', "bad_json"),  # raw control
        (b'["\\udc00"]', "not_object"),
        (b'{"type":"OF\\ud800","dst":"b"}', "bad_type"),
        (b'{"type":"OFFER","dst":0,"x":"\\ud800"}', "no_dst"),
        (b'{"type":"OFFER"}', "no_dst"),
        (b'{"type":"ANSWER","dst":""}', "no_dst"),
        (b'{"type":"CANDIDATE","dst":["a"]}', "no_dst"),
    ],
)
def test_bad_frames_are_classified(data: bytes, reason: str) -> None:
    with pytest.raises(BadFrame) as e:
        parse_frame(data)
    assert e.value.reason == reason


def test_relay_frame_keeps_payload_and_ignores_client_src() -> None:
    payload = {"sdp": {"type": "offer", "sdp": "v=0\r\n\u00e9"}, "type": "data",
               "connectionId": "dc_x", "metadata": {"a": [1, 2.5, None, True]}}
    raw = json.dumps({"type": "OFFER", "src": "mallory", "dst": "bob", "payload": payload,
                      "extra": 1})
    msg = parse_frame(raw.encode())
    assert (msg.type, msg.dst) == ("OFFER", "bob")
    out = json.loads(messages.relay_frame(msg.type, "alice", "bob", msg.payload))
    assert out == {"type": "OFFER", "src": "alice", "dst": "bob", "payload": payload}
    assert list(out) == ["type", "src", "dst", "payload"]


def test_relay_without_payload_has_no_payload_key() -> None:
    msg = parse_frame(b'{"type":"LEAVE","dst":"bob"}')
    assert json.loads(messages.relay_frame(msg.type, "a", "bob", msg.payload)) == {
        "type": "LEAVE", "src": "a", "dst": "bob"}


def test_payload_is_passed_on_as_written() -> None:
    # Found by fuzzing when payloads were re-encoded: 1e400 went out as Infinity.
    raw = b'{"n":1e400, "s":"\\u00e9\xc3\xa9", "a":[ 1 ,2]}'
    msg = parse_frame(b'{"type":"OFFER","dst":"b","payload":' + raw + b"}")
    assert bytes(msg.payload) == raw


def test_heartbeat() -> None:
    assert parse_frame(b'{"type":"HEARTBEAT"}').type == "HEARTBEAT"


def test_fixed_frames_are_exact() -> None:
    assert messages.OPEN_FRAME == b'{"type":"OPEN"}'
    assert json.loads(messages.ID_TAKEN_FRAME) == {"type": "ID-TAKEN",
                                                  "payload": {"msg": "ID is taken"}}
    assert json.loads(messages.error_frame("Invalid key provided")) == {
        "type": "ERROR", "payload": {"msg": "Invalid key provided"}}
    assert json.loads(messages.leave_frame("bob")) == {"type": "LEAVE", "src": "bob"}
    assert json.loads(messages.expire_frame('x"y', "a")) == {"type": "EXPIRE", "src": 'x"y',
                                                            "dst": "a"}


@pytest.mark.parametrize("good", ["a", "alice", "A1-b2_c3 d4", "x" * 64,
                                  "3f2a1c4e-1d2b-4c3a-9e8f-0123456789ab"])
def test_valid_ids(good: str) -> None:
    assert messages.valid_id(good)


@pytest.mark.parametrize("bad", ["", "-a", "a-", "a--b", "a  b", "a.b", "é", "x" * 65,
                                 "a\nb", "a/b"])
def test_invalid_ids(bad: str) -> None:
    assert not messages.valid_id(bad)


@pytest.mark.parametrize("good", ["r", "discord:1234567890", "a.b_c-d:e", "x" * 128])
def test_valid_rooms(good: str) -> None:
    assert messages.valid_room(good)


@pytest.mark.parametrize("bad", ["", "x" * 129, "a b", "a~b", "a/b", "é", "a\n"])
def test_invalid_rooms(bad: str) -> None:
    assert not messages.valid_room(bad)


# A display name cut in the middle of an emoji: JSON.stringify writes the lone surrogate as
# an escape (ECMA-262 since ES2019). Once dropped as bad JSON (issue 17).
CUT_EMOJI = (b'{"type":"OFFER","dst":"callee","payload":{"type":"data","connectionId":"dc_1",'
             b'"metadata":{"name":"Ana \\ud83d"},"sdp":{"type":"offer","sdp":"v=0\\r\\n"}}}')


@pytest.mark.parametrize("payload", [
    b'{"name":"Ana \\ud83d"}',
    b'"\\udc00"',
    b'"\\uDE00\\uD83D"',  # the wrong order: two lone surrogates
    b'{"\\ud800":["\\udbff", 1e400, "\\u0000", "\xe2\x80\xa8"]}',
    b' [ "\\ud83d\\ude00" , "\\ud83d" ] ',  # whitespace around the payload is the client's
    '"\\ud800 \u00e9 \U0001f600"'.encode(),
])
def test_lone_surrogates_in_a_payload_are_relayed_as_written(payload: bytes) -> None:
    frame = b'{"type":"OFFER","dst":"bob","payload":' + payload + b',"src":"x\\udfff"}'
    msg = parse_frame(frame)
    assert (msg.type, msg.dst, bytes(msg.payload)) == ("OFFER", "bob", payload.strip())


def test_the_cut_emoji_offer_is_relayed_byte_for_byte() -> None:
    msg = parse_frame(CUT_EMOJI)
    out = messages.relay_frame(msg.type, "caller", msg.dst, msg.payload)
    assert out == (b'{"type":"OFFER","src":"caller","dst":"callee",'
                   + CUT_EMOJI[CUT_EMOJI.index(b'"payload"'):])


def test_the_fallback_reads_a_bounded_number_of_members() -> None:
    # A HEARTBEAT that forces the slow reader through thousands of members: refused.
    many = b'{"type":"HEARTBEAT","x":"\\ud800"' + b',"a":0' * 10900 + b"}"
    with pytest.raises(BadFrame) as e:
        parse_frame(many)
    assert e.value.reason == "bad_json"
    members = b"".join(b',"k%d":0' % n for n in range(29))  # 32 in all
    assert parse_frame(b'{"type":"OFFER","dst":"b","payload":"\\ud800"' + members + b"}")


def test_a_lone_surrogate_in_dst_is_a_destination_like_any_other() -> None:
    msg = parse_frame(b'{"type":"OFFER","dst":"b\\ud800","payload":"\\ud800"}')
    assert (msg.dst, bytes(msg.payload)) == ("b\ud800", b'"\\ud800"')


@pytest.mark.parametrize(("data", "expected"), [
    (b'{"type":5,', "bad_json"),
    (b'{"type":null}x', "bad_json"),
    (b'{"type":{}, "dst":"b"', "bad_json"),
    (b'{"type":5,"x":NaN}', "bad_json"),
    (b'{"dst":5,"type":1e400}', "bad_type"),
    (b'{"type":5,"type":"OFFER","dst":"b"}', "OFFER"),
    (b'{"dst":5,"dst":"b","type":"OFFER"}', "OFFER"),
    (b'{"type":5,"type":"HEARTBEAT"}', "HEARTBEAT"),
    (b'{"dst":5,"dst":"b","type":"OFFER","p":"\\ud800"}', "OFFER"),
])
def test_a_reason_does_not_depend_on_which_bad_field_comes_first(data: bytes,
                                                                 expected: str) -> None:
    # Found in review of the typed Inbound: a type that is not a string, met first, must
    # not make invalid JSON bad_type, nor a repeated key refuse what JSON.parse reads (the
    # last of a repeated key wins).
    try:
        got = parse_frame(data).type
    except BadFrame as e:
        got = e.reason
    assert got == expected


def test_a_frame_without_a_type_is_refused_whatever_the_app_types() -> None:
    # Found in review: an absent type decodes as "", which no app message type can be
    # (app_type_problem), but Config does not check its app_message_types itself.
    with pytest.raises(BadFrame) as e:
        parse_frame(b'{"dst":"b"}', frozenset({""}))
    assert e.value.reason == "bad_type"
