"""An Authorize cancelled while its hold is in flight leaves no hold.

The caller is gone (a cancelled RPC, Envoy giving up on a Check): nobody will
ever learn the permit id, so nobody could Closeout or Void it. The engine
journals an abort for it, as for a timed-out call; whichever of the script and
the abort runs first, nothing stays held, and the stream says what happened.
"""

from __future__ import annotations

import asyncio
import pathlib
from typing import Any

import pytest
import redis

from keel_pdp.budget.store import BudgetStore
from keel_pdp.decision import AuthorizeInput
from keel_pdp.engine import Engine
from keel_pdp.metrics import Metrics
from keel_pdp.policy.loader import load_bundle
from keel_pdp.policy.reload import PolicyHolder
from tests.helpers import budget, write_bundle

pytestmark = pytest.mark.redis


@pytest.mark.parametrize("when", ["after the script ran", "before it was sent"])
async def test_a_cancelled_authorize_holds_nothing_once_its_abort_ran(
        redis_url: str, tmp_path: pathlib.Path, when: str) -> None:
    bundle = write_bundle(tmp_path / "b", [budget("team", "10.00", per=["tenant"])])
    holder = PolicyHolder(bundle)
    holder.set(load_bundle(bundle))
    store = BudgetStore.from_url(redis_url, prefix="c", timeout_s=2.0)
    engine = Engine(holder, store, Metrics())
    r: Any = redis.Redis.from_url(redis_url)
    real = store.transport.eval_script
    reached = asyncio.Event()

    async def slow_reply(*a: Any, **kw: Any) -> Any:
        if when == "after the script ran":
            await real(*a, **kw)  # the hold is made in Redis...
        reached.set()
        await asyncio.Event().wait()  # ...and its reply never comes back in time

    store.transport.eval_script = slow_reply  # type: ignore[method-assign]
    task = asyncio.create_task(engine.authorize(AuthorizeInput(
        "gone-1", "acme", "chat", "gpt-4o-mini", "openai", 1000, 500)))
    await reached.wait()
    if when == "after the script ran":
        (window,) = list(r.scan_iter("c:*:b:team:*"))
        assert int(r.hget(window, "h")) > 0  # held, and the caller is about to go
    store.transport.eval_script = real  # type: ignore[method-assign]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(100):  # the abort goes out from the outbox
        if not engine.outbox_len:
            break
        await engine.flush_outbox()
        await asyncio.sleep(0.02)
    assert engine.outbox_len == 0
    types = [f[b"type"] for _, f in r.xrange("c:{pdp}:events")]
    if when == "after the script ran":
        (window,) = list(r.scan_iter("c:*:b:team:*"))
        assert int(r.hget(window, "h")) == 0
        assert types == [b"decision", b"void"]
        assert b"aborted" in r.xrange("c:{pdp}:events")[1][1][b"data"]
    else:
        assert types == [] and not list(r.scan_iter("c:*:b:team:*"))
    # Either way the permit id is spent: a late script finds its tombstone.
    (permit,) = list(r.scan_iter("c:*:permit:*"))
    assert r.hget(permit, "state") in (b"voided", b"aborted")
    await store.close()
