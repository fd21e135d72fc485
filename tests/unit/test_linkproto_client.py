"""The link client's pure parts: the poll answer's shape check and the retry backoff."""

from __future__ import annotations

import pytest

from appliance.link import Backoff, LinkError, PollAnswer

GOOD = {
    "version": 3, "state": "activated",
    "gatewayArn": "arn:aws:backup-gateway:us-west-2:123456789012:gateway/bgw-0123ABCD",
    "gatewayName": "demo", "region": "us-west-2",
    "bandwidthRateLimitIntervals": [], "softwareUpdateRequest": 1,
}


def test_poll_answer_parsed() -> None:
    a = PollAnswer.from_json(GOOD)
    assert (a.version, a.state, a.gateway_name, a.software_update_request) == (
        3, "activated", "demo", 1
    )


@pytest.mark.parametrize(
    "change",
    [
        {"version": "3"},
        {"state": "gone"},
        {"gatewayName": 5},
        {"bandwidthRateLimitIntervals": {}},
        {"bandwidthRateLimitIntervals": [1]},
        {"softwareUpdateRequest": "1"},
    ],
)
def test_poll_answer_with_wrong_shape_is_a_link_error(change: dict[str, object]) -> None:
    with pytest.raises(LinkError, match="link-protocol"):
        PollAnswer.from_json({**GOOD, **change})
    with pytest.raises(LinkError):
        PollAnswer.from_json([GOOD])


def test_backoff_grows_is_capped_jittered_and_resets() -> None:
    b = Backoff(base=0.5, cap=8.0)
    delays = [b.next_delay() for _ in range(40)]
    ceilings = [min(8.0, 0.5 * 2**i) for i in range(40)]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert len({round(d, 6) for d in delays[10:]}) > 1  # jittered, not in lockstep
    b.reset()
    assert b.next_delay() <= 0.5
