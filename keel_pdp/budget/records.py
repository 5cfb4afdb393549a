"""The format of the idempotency records the authorize script writes.

An idempotency record maps (tenant, request_id) to the first answer, so that a
retry is answered with the same permit while it is held, and a permit that ended
is never handed out again.

* **Format 2** (this release's): a string, ``<fingerprint>\\n<result>`` with the
  record's TTL, written with one ``SET ... EX``. When its permit ends nothing marks
  the record: a replay reads the permit's own state (``settled``, ``voided``,
  ``expired``; gone counts as expired). A replay that hands the permit out marks the
  permit (``rp``), which is what an abort reads. The permit leaves out what the
  amount and the request already say (``est``, the estimate, equal to the amount
  held; ``ik``, the record's key).
* **Format 1** (every earlier release): a hash (``fp``, ``res``, ``pid``, ``exp``),
  ``HSET`` plus ``EXPIRE``; closeout and release mark it (``st``) when its permit
  ends, and a replay marks it (``rp``). The permit has ``est`` and ``ik``.

The scripts of this release read both forms and look at the permit's state in
both. A sidecar of an earlier release reads only format 1 and relies on the
``st`` mark, so format 2 is written only where the deployment says so: the key
``<prefix>:{pdp}:records`` holds ``2``. A new deployment (the first sidecar or
ledger writer to record the key layout, on an empty store) sets it. A deployment
that ran an earlier release keeps format 1 until every sidecar runs this release;
then ``keel-pdp records --upgrade`` sets it, and each sidecar writes format 2
from its next start (docs/redis-cluster.md, "Rolling upgrades").

Measured as A/Bs on one Redis (bench/README.md, "Records format 2"): the string
record costs about 2% less Redis time per Authorize (one command instead of two)
and about 8% less per Closeout (the record is neither read nor written); the
shorter permit about 2.4% less per Authorize and 1.7% per Closeout.

A store that loses every key (a Redis restarted without its data) looks new to the
next sidecar that starts, which then declares format 2: after such a loss, start no
sidecar of an earlier release on it.
"""

from __future__ import annotations

RECORDS_FORMAT = 2  # what this release writes where the deployment allows it
FORMATS = (1, 2)


def check_format(records: int) -> None:
    if records not in FORMATS:
        raise ValueError(f"records format must be one of {FORMATS}, not {records!r}")


def declared_format(raw: bytes | str | None) -> int:
    """The format a deployment's records key declares: 1 when it has none (a
    deployment that ran an earlier release) or holds anything but a known format."""
    if raw is None:
        return 1
    text = raw.decode() if isinstance(raw, bytes | bytearray) else str(raw)
    return int(text) if text in ("1", "2") else 1
