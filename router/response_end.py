"""Where an HTTP/1.1 response ends, followed from its bytes as they are written.

The fast lane lends a client connection to aiohttp for one request at a time and takes it back once
aiohttp's answer is out; this tells it when that is, from the framing alone: interim `1xx` answers
are skipped, then a `Content-Length` body, a chunked body (through its last chunk and trailers), or
no body (`HEAD`, 204, 304). A body delimited by the connection's close never ends here.
"""

from __future__ import annotations

_HEAD, _LENGTH, _SIZE_LINE, _CHUNK, _TRAILERS, _UNTIL_CLOSE, _DONE = range(7)
_END_OF_HEAD = b"\r\n\r\n"


class ResponseEnd:
    """Feed it what is written; `feed` says True once the response is complete."""

    __slots__ = ("_buffer", "_mode", "_no_body", "_remaining", "started")

    def __init__(self, *, no_body: bool = False) -> None:
        self._no_body = no_body  # the answer to a HEAD request
        self._mode = _HEAD
        self._buffer = b""  # a head, chunk-size line or trailer line not complete yet
        self._remaining = 0
        self.started = False  # some of the response was written

    @property
    def done(self) -> bool:
        return self._mode == _DONE

    def feed(self, data: bytes) -> bool:
        if data:
            self.started = True
        pos, end = 0, len(data)
        while pos < end and self._mode != _DONE:
            mode = self._mode
            if mode == _HEAD:
                pos = self._head(data, pos)
            elif mode in (_LENGTH, _CHUNK):
                take = min(self._remaining, end - pos)
                self._remaining -= take
                pos += take
                if not self._remaining:
                    self._mode = _DONE if mode == _LENGTH else _SIZE_LINE
            elif mode in (_SIZE_LINE, _TRAILERS):
                pos = self._line(data, pos)
            else:  # _UNTIL_CLOSE
                break
        return self._mode == _DONE

    def _head(self, data: bytes, pos: int) -> int:
        buffer = self._buffer + data[pos:]
        end = buffer.find(_END_OF_HEAD)
        if end < 0:
            self._buffer = buffer
            return len(data)
        consumed = len(data) - (len(buffer) - end - 4)  # where the head ends within `data`
        self._buffer = b""
        head = buffer[:end].lower()
        status = int(head[9:12])
        if 100 <= status < 200:
            return consumed  # an interim answer (100 Continue): the real one follows
        if self._no_body or status in (204, 304):
            self._mode = _DONE
        elif (_header(head, b"transfer-encoding") or b"").endswith(b"chunked"):
            self._mode = _SIZE_LINE
        elif (length := _header(head, b"content-length")) is not None:
            self._remaining = int(length)
            self._mode = _LENGTH if self._remaining else _DONE
        else:
            self._mode = _UNTIL_CLOSE
        return consumed

    def _line(self, data: bytes, pos: int) -> int:
        """A chunk-size line, or a trailer line (an empty one ends the body)."""
        eol = data.find(b"\n", pos)
        if eol < 0:
            self._buffer += data[pos:]
            return len(data)
        line = (self._buffer + data[pos:eol]).rstrip(b"\r")
        self._buffer = b""
        if self._mode == _TRAILERS:
            if not line:
                self._mode = _DONE
        else:
            size = int(line.split(b";", 1)[0], 16)
            if size:
                self._remaining = size + 2  # the data, then its CRLF
                self._mode = _CHUNK
            else:
                self._mode = _TRAILERS
        return eol + 1


def _header(head: bytes, name: bytes) -> bytes | None:
    """The value of header `name` in a lowercased head (the first, if repeated)."""
    at = head.find(b"\r\n" + name + b":")
    if at < 0:
        return None
    return head[at + len(name) + 3 :].split(b"\r\n", 1)[0].strip()
