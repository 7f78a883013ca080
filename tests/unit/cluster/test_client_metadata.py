"""The clients' call metadata: the Serve application the proxy routes by, and the token."""

from __future__ import annotations

from cluster.builder import APP_NAME
from cluster.client.sync import APPLICATION, call_metadata


def test_calls_name_the_deployed_application() -> None:
    assert APPLICATION == APP_NAME
    assert call_metadata(None, APPLICATION) == (("application", APP_NAME),)
    assert call_metadata("t0k", APPLICATION) == (
        ("application", APP_NAME),
        ("authorization", "Bearer t0k"),
    )
    assert call_metadata("t0k", None) == (("authorization", "Bearer t0k"),)
    assert call_metadata(None, None) == ()
