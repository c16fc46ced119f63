"""`ResponseEnd` finds the end of a response in the bytes as written, however they are split."""

from __future__ import annotations

import pytest

from router.response_end import ResponseEnd

CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"7\r\ndata: 1\r\n"
    b"a;ext=1\r\n0123456789\r\n"
    b"0\r\nX-Trailer: yes\r\n\r\n"
)
LENGTH = b'HTTP/1.1 404 Not Found\r\nContent-Length: 11\r\nContent-Type: application/json\r\n\r\n{"e": "no"}'
CONTINUE_THEN_LENGTH = b"HTTP/1.1 100 Continue\r\n\r\n" + LENGTH
EMPTY = b"HTTP/1.1 204 No Content\r\nServer: x\r\n\r\n"
ZERO = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


def ends_only_at_the_last_byte(response: bytes, *, no_body: bool = False) -> None:
    """Split the response at every pair of points: not done before its last byte, done with it."""
    for first in range(1, len(response)):
        for second in (first, *range(first + 1, len(response), 7)):
            tracker = ResponseEnd(no_body=no_body)
            parts = [response[:first], response[first:second], response[second:]]
            results = [tracker.feed(part) for part in parts if part]
            assert results[-1] is True, (first, second)
            assert not any(results[:-1]), (first, second)


@pytest.mark.parametrize("response", [CHUNKED, LENGTH, CONTINUE_THEN_LENGTH, EMPTY, ZERO])
def test_the_end_is_found_at_the_last_byte_wherever_the_writes_split(response: bytes) -> None:
    ends_only_at_the_last_byte(response)


def test_a_head_answer_ends_with_its_head_whatever_its_length_says() -> None:
    ends_only_at_the_last_byte(b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n", no_body=True)


def test_a_body_delimited_by_the_close_never_ends() -> None:
    tracker = ResponseEnd()
    assert not tracker.feed(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nsome")
    assert not tracker.feed(b" more")
    assert tracker.started and not tracker.done


def test_the_last_chunk_alone_is_not_the_end_until_its_blank_line() -> None:
    tracker = ResponseEnd()
    assert not tracker.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n")
    assert tracker.feed(b"\r\n")
