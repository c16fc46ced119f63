"""The request rules (llama_router/relay/request_rules.py) that need no server to check."""

from __future__ import annotations

import pytest

from llama_router.core.errors import RouterError
from llama_router.relay.request_rules import Resend, model_in_body, renamer, request_drop, resend
from llama_router.upstream.upstream_http import (
    BodyFailed,
    ConnectFailed,
    ConnectionDropped,
    UpstreamError,
    UpstreamTimeout,
)

CLOSED_FRESH = ConnectionDropped("closed", reset=False)
CLOSED_REUSED = ConnectionDropped("closed", reset=False, reused=True)
RESET = ConnectionDropped("reset", reset=True)
REFUSED = ConnectFailed("refused")


@pytest.mark.parametrize(
    ("error", "attempt", "serving", "sent_before", "expected"),
    [
        # Closed after the request went out: it may be what killed the server.
        (CLOSED_FRESH, 1, True, False, Resend.NEVER),
        # ... unless a live server closed a kept-alive connection as the request arrived: once more.
        (CLOSED_REUSED, 1, True, False, Resend.SAME_UPSTREAM),
        (CLOSED_REUSED, 1, False, False, Resend.NEVER),
        (CLOSED_REUSED, 2, True, False, Resend.NEVER),
        # Refused or reset: never reached a live process; a fresh one if this one has exited.
        (REFUSED, 1, True, False, Resend.IF_EXITED),
        (RESET, 1, True, False, Resend.IF_EXITED),
        (RESET, 2, True, False, Resend.IF_EXITED),
        # After a try that may have reached the process, never to another one.
        (REFUSED, 2, False, True, Resend.NEVER),
        (RESET, 2, False, True, Resend.NEVER),
        # No answer in time, or a body broken off: the upstream had it.
        (UpstreamTimeout("slow"), 1, True, False, Resend.NEVER),
        (BodyFailed("cut"), 1, True, False, Resend.NEVER),
    ],
)
def test_a_request_is_sent_again_only_when_it_cannot_have_reached_a_live_upstream(
    error: UpstreamError, attempt: int, serving: bool, sent_before: bool, expected: Resend
) -> None:
    assert resend(error, attempt, serving=serving, sent_before=sent_before) is expected


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{", "invalid_json"),
        (b"\xff", "invalid_json"),
        (b"[1]", "invalid_json"),
        (b"{}", "missing_model"),
        (b'{"model": ""}', "missing_model"),
        (b'{"model": 3}', "invalid_model"),
    ],
)
def test_a_body_that_names_no_model_is_a_400_saying_why(body: bytes, code: str) -> None:
    with pytest.raises(RouterError) as raised:
        model_in_body(body)
    assert (raised.value.status, raised.value.code) == (400, code)


def test_answers_are_renamed_only_when_they_name_another_model_than_asked() -> None:
    assert renamer("m", "m", fallback=False) is None
    assert renamer("m", "alias", fallback=True) is None, "a fallback answers under its own name"
    rename = renamer("m", "alias", fallback=False)
    assert rename is not None
    assert rename.feed(b'data: {"model":"m","x":1}\n\ndata: {"mo') == b'data: {"model":"alias","x":1}\n\n'
    assert rename.feed(b'del":"m"}\n\n') + rename.flush() == b'data: {"model":"alias"}\n\n'


def test_the_routers_keys_are_kept_from_the_upstream_only_while_it_checks_keys() -> None:
    assert {b"authorization", b"x-api-key"} <= request_drop(strip_auth=True)
    assert not {b"authorization", b"x-api-key"} & request_drop(strip_auth=False)
    assert {b"connection", b"transfer-encoding", b"expect", b"host", b"content-length"} <= request_drop(
        strip_auth=False
    )
