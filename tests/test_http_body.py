"""Properties of request-body framing (serving/http_body.py): any chunking of a body reads back as
that body; any bytes at all give a body within the limit or a BodyRefused, never another error
and never a read past the end of the framed body."""

from __future__ import annotations

import io
from email.message import Message

from hypothesis import event, given, settings
from hypothesis import strategies as st

from serving import http_body

LIMIT = 256


def framed(chunks: list[bytes], extensions: list[bytes], trailers: list[bytes]) -> bytes:
    """`chunks` in RFC 9112 §7.1 chunked framing, with chunk extensions and trailer lines."""
    lines = [
        b"%X%s\r\n%s\r\n" % (len(chunk), extension, chunk)
        for chunk, extension in zip(chunks, extensions + [b""] * len(chunks), strict=False)
    ]
    return b"".join(lines) + b"0\r\n" + b"".join(line + b"\r\n" for line in trailers) + b"\r\n"


chunk_lists = st.lists(st.binary(min_size=1, max_size=40), max_size=8)
extensions = st.lists(st.sampled_from([b"", b";a=1", b" ;x", b';name="v"']), max_size=8)
trailers = st.lists(st.sampled_from([b"X-A: 1", b"Digest: abc"]), max_size=3)


@settings(max_examples=300, deadline=None)
@given(chunk_lists, extensions, trailers, st.binary(max_size=20))
def test_any_chunking_reads_back_the_body_and_stops_at_its_end(chunks, exts, trails, after):
    stream = io.BytesIO(framed(chunks, exts, trails) + after)
    body = b"".join(chunks)
    if len(body) > LIMIT:
        event("over the limit")
        try:
            http_body.read_chunked(stream, LIMIT)
        except http_body.BodyRefused as refused:
            assert refused.status == 413
        else:
            raise AssertionError("a body over the limit was read")
        return
    assert http_body.read_chunked(stream, LIMIT) == body
    assert stream.read() == after  # the next request starts exactly where this one ended


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.binary(max_size=80), chunk_lists.map(lambda c: framed(c, [], [])[:-3])))
def test_any_bytes_give_a_body_within_the_limit_or_a_named_refusal(raw):
    try:
        body = http_body.read_chunked(io.BytesIO(raw), LIMIT)
    except http_body.BodyRefused as refused:
        event(f"refused {refused.status}")
        assert refused.status in (400, 413) and refused.message
    else:
        assert len(body) <= LIMIT


def headers_of(*pairs: tuple[str, str]) -> Message:
    """A header block as http.server parses one (email.message.Message keeps repeats)."""
    message = Message()
    for name, value in pairs:
        message[name] = value
    return message


header_values = st.one_of(
    st.from_regex(r"[0-9]{1,20}", fullmatch=True),
    st.text(alphabet=" +-_,0123456789xXaAfF", max_size=8),
    st.sampled_from(["chunked", "Chunked", " chunked ", "gzip", "gzip, chunked", "identity"]),
)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["Content-Length", "Transfer-Encoding"]), header_values),
                max_size=3))  # fmt: skip
def test_declared_length_is_one_plain_number_within_the_limit_or_chunked_alone(pairs):
    headers = headers_of(*pairs)
    lengths = headers.get_all("Content-Length") or []
    try:
        length = http_body.declared_length(headers, LIMIT)
    except http_body.BodyRefused as refused:
        event(f"refused {refused.status}")
        assert refused.status in (400, 413, 501) and refused.message
        return
    if length is None:
        assert not lengths and [
            v.strip().lower() for v in headers.get_all("Transfer-Encoding")
        ] == ["chunked"]
    else:
        assert not headers.get_all("Transfer-Encoding")
        assert 0 <= length <= LIMIT
        assert all(int(value) == length for value in lengths)
