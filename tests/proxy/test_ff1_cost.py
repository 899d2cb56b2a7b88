"""FF1's cost grows with the square of the message length, and the proxy used to protect
request bodies on its event loop: one 384 KiB value stalled every other client for 17.5 s
(cf. kpdyer/libffx#50). Now fpe/token values are capped at ``MAX_FPE_CHARS`` (4096) characters
and bodies are protected in a thread pool, so a small request is answered while a large one is
still being protected. Two concurrent clients against the real proxy process; the assertions
compare the two requests with each other, not with absolute times."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from safehold.proxy.transforms import MAX_FPE_CHARS
from tests.support.proxy_capture import capture_stack, captured, client

pytestmark = pytest.mark.slow
http = client()

SCHEMA = """
[fields."notes.*"]
transform = "fpe"
alphabet = "alnum"

[fields.ssn]
transform = "fpe"
alphabet = "digits"
"""


def mixed(n: int) -> str:
    # letters and digits: the mixed-radix path, FF1's most expensive case
    return ("aB3xY7" * (n // 6 + 1))[:n]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with capture_stack(tmp_path_factory.mktemp("proxy"), SCHEMA) as s:
        yield s


def test_ff1_value_over_the_cap_is_refused_naming_the_cap(stack):
    before, _ = captured(stack)
    r = http.post(stack.proxy + "/records", json={"notes": [mixed(MAX_FPE_CHARS + 1)]}, timeout=15)
    assert r.status_code == 422, r.text[:200]
    assert f"over the fpe cap of {MAX_FPE_CHARS}" in r.json()["error"]
    assert captured(stack, before)[1] == []
    # at the cap it is protected
    r = http.post(stack.proxy + "/records", json={"notes": [mixed(MAX_FPE_CHARS)]}, timeout=15)
    assert r.status_code == 200, r.text[:200]
    (req,) = captured(stack, before)[1]
    assert mixed(MAX_FPE_CHARS) not in req["body"]


def test_large_ff1_request_does_not_stall_a_small_one(stack):
    large = {"notes": [mixed(MAX_FPE_CHARS)] * 200}  # ~200 x 15 ms of FF1 on the reference machine
    done: dict[str, float] = {}
    status: dict[str, int] = {}

    def send_large() -> None:
        with httpx.Client(timeout=120) as c:
            status["large"] = c.post(stack.proxy + "/records", json=large).status_code
        done["large"] = time.monotonic()

    t = threading.Thread(target=send_large)
    t.start()
    time.sleep(0.3)  # the large body is uploaded and being protected
    assert t.is_alive(), "the large request finished too fast for this test to mean anything"
    small_done = []
    for i in range(3):
        r = http.post(stack.proxy + "/records", json={"ssn": f"12345678{i}", "notes": ["Erika7"]})
        assert r.status_code == 200, r.text
        small_done.append(time.monotonic())
    t.join(timeout=120)
    assert status.get("large") == 200  # the large request was processed, not dropped
    # every small request was answered while the large one was still being protected
    assert all(s < done["large"] for s in small_done), (small_done, done)
