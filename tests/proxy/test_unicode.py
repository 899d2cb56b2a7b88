"""A JSON request whose string decodes to a lone UTF-16 surrogate (``"\\ud800"``) is refused
with a message that says so (400), not a 500 from the UTF-8 encoder, and never forwarded."""

from __future__ import annotations

import pytest

from tests.support.proxy_capture import capture_stack, captured, client

pytestmark = pytest.mark.slow
http = client()

SCHEMA = """
[fields.name]
transform = "deterministic"
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with capture_stack(tmp_path_factory.mktemp("proxy"), SCHEMA) as s:
        yield s


@pytest.mark.parametrize("body", [b'{"name": "Er\\ud800ika"}', b'{"other": "\\udfff"}',
                                  b'[{"name": "ok"}, {"x\\ud800": 1}]'])
def test_lone_surrogate_in_request_json_is_refused(stack, body):
    before, _ = captured(stack)
    r = http.post(stack.proxy + "/records", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert "lone UTF-16 surrogate" in r.json()["error"]
    assert captured(stack, before)[1] == []


def test_escaped_pairs_and_escaped_backslashes_still_pass(stack):
    before, _ = captured(stack)
    for body in (b'{"name": "\\ud83d\\ude00"}', b'{"other": "\\\\ud800"}'):
        r = http.post(stack.proxy + "/records", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 200, r.text
    assert len(captured(stack, before)[1]) == 2
