"""The sharded key layout: tags, tenants, permit ids, exception ids, shapes.

Slots are checked against Redis Cluster's key-slot rule written here from the
specification with the standard library's CRC-CCITT (XMODEM), not with the
product's CRC16.
"""

from __future__ import annotations

import binascii
import pathlib
import random
from collections import Counter

import pytest

from keel_pdp.budget.keys import (
    KeySpace,
    permit_shard,
    shard_tags,
    single_tenant,
    tenant_shard,
)
from keel_pdp.budget.material import Materials
from keel_pdp.budget.replies import hold_reply
from keel_pdp.decision.shape import build_shape
from keel_pdp.errors import ReplyError
from keel_pdp.overage.workflow import exception_id
from keel_pdp.permits import PermitIds, degraded_permit_id, is_degraded_permit_id
from keel_pdp.policy.loader import load_bundle
from tests.helpers import budget, reference_slot, write_bundle


@pytest.mark.parametrize("shards", [2, 3, 7, 64, 100, 1024])
def test_shard_i_hashes_into_the_ith_equal_part_of_the_slots(shards: int) -> None:
    keys = KeySpace("keel", shards)
    assert len(set(keys.tags)) == shards
    for i, stream in enumerate(keys.streams):
        assert reference_slot(stream) * shards // 16384 == i
        # every key of a shard shares its slot
        assert reference_slot(keys.bases[i] + "anything") == reference_slot(stream)


def test_one_shard_keeps_the_single_tag_layout() -> None:
    keys = KeySpace("keel")
    assert keys.tags == ("pdp",)
    assert keys.stream == "keel:{pdp}:events" and keys.expiries == "keel:{pdp}:expiries"
    assert keys.permit("pmt_" + "a" * 28) == "keel:{pdp}:permit:pmt_" + "a" * 28
    assert keys.idempotency("acme", "r-1") == "keel:{pdp}:req:acme:r-1"
    assert not keys.escrow


def test_bad_shard_counts_are_refused() -> None:
    for bad in (0, -1, 1025):
        with pytest.raises(ValueError, match="key shards must be 1 to 1024"):
            shard_tags(bad)


@pytest.mark.parametrize("shards", [1, 2, 3, 64, 1000, 1024])
def test_permit_ids_carry_their_shard_and_keep_their_randomness(shards: int) -> None:
    ids = PermitIds()
    rnd = random.Random(shards)
    lows: Counter[int] = Counter()
    for _ in range(2000):
        shard = rnd.randrange(shards)
        pid = ids.new(1_700_000_000_000, shard, shards)
        assert len(pid) == 32 and not is_degraded_permit_id(pid)
        assert permit_shard(pid, shards) == shard
        # the degraded twin is in the same shard
        assert permit_shard(degraded_permit_id(pid), shards) == shard
        lows[int(pid[-3:], 16) & 1023] += 1
    # the last 10 bits are not a constant per shard: they still vary
    assert len(lows) > min(shards, 1024) * 0.5 or len(lows) > 500


def test_tenants_spread_over_the_shards_and_stay_put() -> None:
    per = Counter(tenant_shard(f"tenant-{i}", 64) for i in range(6400))
    assert len(per) == 64
    assert max(per.values()) < 2 * min(per.values())
    # stable: crc32 of the UTF-8 name, as documented
    assert tenant_shard("acme", 64) == binascii.crc32(b"acme") % 64
    assert tenant_shard("anything", 1) == 0


def test_exception_ids_name_the_budgets_shard() -> None:
    for shard in (0, 5, 63):
        exc = exception_id("pmt_" + "0" * 28, "org", ("acme",), shard, 64)
        assert exc.startswith("exc_") and len(exc) == 28
        assert permit_shard(exc, 64) == shard
    # one shard: the id is as it always was
    assert exception_id("pmt_" + "0" * 28, "org", ()) == exception_id(
        "pmt_" + "0" * 28, "org", (), 0, 1)


def _shape(tmp: pathlib.Path, tenant: str):  # type: ignore[no-untyped-def]
    d = write_bundle(tmp, [budget("org", "10.00"), budget("team", "1.00", per=["tenant"]),
                           budget("acme-only", "1.00", scope={"tenant": "acme"}),
                           budget("model", "5.00", per=["model"])])
    snap = load_bundle(d)
    return build_shape(snap, tenant, "chat", "gpt-4o-mini", "openai", 1_700_000_000_000)


def test_a_shapes_keys_sit_in_its_tenants_shard_and_shared_budgets_are_leased(
        tmp_path: pathlib.Path) -> None:
    shape = _shape(tmp_path, "acme")
    keys = KeySpace("keel", 64)
    mat = Materials(keys)(shape)
    shard = keys.tenant_shard("acme")
    by_budget = {t.budget.id: i for i, t in enumerate(shape.targets)}
    assert set(by_budget) == {"org", "team", "acme-only", "model"}
    for bid, i in by_budget.items():
        key = mat.window_keys[i]
        # every key a hold touches is in the tenant's shard: one slot, one script
        assert keys.key_shard(key) == shard
        parent = mat.parents[i]
        shared = bid in ("org", "model")
        assert (parent is not None) == shared, bid
        assert (":l:" in key) == shared
        if parent is not None:
            assert parent.key == keys.window(bid, shape.targets[i].split,
                                             shape.targets[i].window_start_ms, parent.home)
            assert keys.key_shard(parent.grants_key) == parent.home
    for bid in ("team", "acme-only"):
        t = shape.targets[by_budget[bid]]
        assert single_tenant(t.budget, t.split) == "acme"


def test_one_shard_has_no_leases(tmp_path: pathlib.Path) -> None:
    shape = _shape(tmp_path, "acme")
    mat = Materials(KeySpace("keel"))(shape)
    assert not any(mat.parents)
    assert all(k.startswith("keel:{pdp}:b:") for k in mat.window_keys)


def test_a_lease_reply_must_name_a_short_lease() -> None:
    assert hold_reply('{"r":"lease","need":[[2,450]]}').need == ((1, 450),)
    for bad in ('{"r":"lease","need":[]}', '{"r":"lease"}', '{"r":"lease","need":[[0,5]]}',
                '{"r":"lease","need":[[1,0]]}', '{"r":"lease","need":[[1,"x"]]}'):
        with pytest.raises(ReplyError):
            hold_reply(bad)


def test_foreign_keys_are_named_in_the_refusal() -> None:
    with pytest.raises(ValueError, match="not a key of this key space"):
        KeySpace("keel", 4).key_shard("other:{x}:events")


def test_a_new_store_records_format_2_and_its_layout_an_old_one_only_its_layout() -> None:
    ks = KeySpace("keel", 64)
    assert ks.first_records(False) == (("keel:{pdp}:records", "2"), ("keel:{pdp}:layout", "64"))
    # An old store (its one-shard stream exists) keeps records format 1, one shard.
    assert ks.first_records(True) == (("keel:{pdp}:layout", "1"),)
