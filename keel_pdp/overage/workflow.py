"""Exception requests: ask (from a denial), approve, refuse, list.

A request is a Redis hash next to the budgets it concerns, so every sidecar
sees the same request and an approval can write its grant in the same script
that moves the request out of PENDING (Lua in ``lua/``, one file per atomic
step). Each step appends an ``exception`` event whose ``pid`` is the denial's
permit id, so the ledger keeps the denial, the request and its outcome on one
record; an approval also appends the ``grant`` event the ledger already books.

A request nobody decides expires after ``PENDING_SECONDS``; its EXPIRED step is
recorded by the first decision attempted on it or the first listing that shows it.

The limits of the budget's exception path (maximum overage, maximum duration)
are checked when the request is made and again, against the policy then in
force, when it is approved. The requester cannot approve their own request.
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any, Literal

from redis.exceptions import RedisError

from keel_pdp import events, grants
from keel_pdp.budget.keys import PERMIT_ID_RE, permit_shard, shape_copy_key, with_shard
from keel_pdp.budget.resp import RespError
from keel_pdp.budget.store import BudgetStore, StoreUnavailable
from keel_pdp.decision import DIMENSION_NAMES, InvalidRequest
from keel_pdp.errors import ExceptionConflict as ExceptionConflict
from keel_pdp.errors import ParseError
from keel_pdp.errors import UnknownException as UnknownException
from keel_pdp.policy.snapshot import CompiledBudget, PolicySnapshot

State = Literal["pending", "approved", "rejected", "expired"]
STATES: tuple[State, ...] = ("pending", "approved", "rejected", "expired")
PENDING_SECONDS = 3 * 86_400  # a request nobody decided within 3 days expires
RETENTION_SECONDS = 90 * 86_400  # how long a request record stays listable
MAX_DENIAL_AGE_MS = 31 * 86_400_000
FUTURE_SLACK_MS = 5 * 60_000
# Where to look for the denial on the decision stream, around its permit id's
# issue time (the stream id is Redis' clock, the permit id the sidecar's).
_SCAN_BEFORE_MS, _SCAN_AFTER_MS, _SCAN_PAGE, _SCAN_PAGES = 2_000, 10_000, 500, 40
_FAILURES = (TimeoutError, RedisError, RespError, OSError)
# Permit record states of a decision that allowed the call.
_ALLOWED_STATES = frozenset({"held", "settled", "voided", "expired", "degraded"})


class NotADenial(InvalidRequest):
    """The permit named is not a budget denial of the budget named."""






@dataclass(frozen=True, slots=True)
class ExceptionAsk:
    denial_permit_id: str
    budget_id: str
    scope: tuple[tuple[str, str], ...]
    amount_micros: int
    duration_seconds: int
    justification: str
    requester: str


@dataclass(frozen=True, slots=True)
class ExceptionView:
    exception_id: str
    state: State
    denial_permit_id: str
    budget_id: str
    scope: tuple[tuple[str, str], ...]
    exception_path: str
    approver_role: str
    amount_micros: int
    duration_seconds: int
    justification: str
    requester: str
    requested_at_ms: int
    pending_until_ms: int
    policy_revision: str
    denial_seen: bool
    decided_by: str = ""
    decided_role: str = ""
    decided_at_ms: int = 0
    decision_note: str = ""
    grant_id: str = ""
    grant_expires_at_ms: int = 0
    changed: bool = True
    split: tuple[str, ...] = ()  # the scope's values in the budget's per-dimension order


def _lua(name: str) -> str:
    return resources.files("keel_pdp.overage").joinpath("lua", name).read_text()


_dumps = events.dumps


def _now_ms() -> int:
    return int(time.time() * 1000)


def exception_id(denial_permit_id: str, budget_id: str, split: Sequence[str],
                 shard: int = 0, shards: int = 1) -> str:
    """One request per (denial, budget counter): a retry finds the first one. With a
    sharded key space its last 10 bits name the shard of the budget's grants (as a
    permit id's do), where the request is kept."""
    raw = "\0".join((denial_permit_id, budget_id, *split)).encode("utf-8", "surrogatepass")
    return "exc_" + with_shard(hashlib.sha256(raw).hexdigest()[:24], shard, shards)


def grant_id_of(exc_id: str) -> str:
    return "grt-" + exc_id.removeprefix("exc_")


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes | bytearray) else str(v)


class ExceptionDesk:
    """The exception workflow over one budget store."""

    def __init__(self, store: BudgetStore, *, pending_seconds: int = PENDING_SECONDS,
                 retention_seconds: int = RETENTION_SECONDS, timeout_s: float = 2.0,
                 clock_ms: Callable[[], int] | None = None) -> None:
        self.store = store
        # The sidecar's clock (kept on the store's, keel_pdp.clock) for expiries.
        self._now_ms = clock_ms or _now_ms
        self.keys = store.keys
        self.pending_seconds = pending_seconds
        self.retention_seconds = retention_seconds
        self.timeout_s = timeout_s
        self._request = store.transport.script(_lua("exception_request.lua"))
        self._decide = store.transport.script(_lua("exception_decide.lua"))

    # ----------------------------------------------------------------- keys
    def _grants_key(self, exc_id: str, budget_id: str, split: Sequence[str]) -> str:
        """The budget's grants, in the shard its exception requests are kept in."""
        return self.keys.grants(budget_id, tuple(split), self._shard(exc_id))

    def _shard(self, exc_id: str) -> int:
        try:
            return permit_shard(exc_id, self.keys.shards)
        except ValueError:  # not an id this workflow made: found nowhere
            return 0

    def record_key(self, exc_id: str) -> str:
        return f"{self.keys.bases[self._shard(exc_id)]}exc:{exc_id}"

    def index_key_of(self, shard: int) -> str:
        return f"{self.keys.bases[shard]}excs"

    @property
    def index_key(self) -> str:
        return self.index_key_of(0)

    # ------------------------------------------------------------------ I/O
    async def _script(self, script: Any, keys: list[str], args: list[str | int]) -> dict[str, Any]:
        try:
            raw = await self.store.transport.eval_script(script, keys, args, self.timeout_s)
        except _FAILURES as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return events.loads_object(_text(raw), "exception script reply")

    async def _read(self, coro: Any) -> Any:
        try:
            return await asyncio.wait_for(coro, timeout=self.timeout_s)
        except _FAILURES as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc

    # -------------------------------------------------------------- request
    async def request(self, snapshot: PolicySnapshot, ask: ExceptionAsk,
                      now_ms: int | None = None) -> ExceptionView:
        now = self._now_ms() if now_ms is None else now_ms
        pid = ask.denial_permit_id
        if not PERMIT_ID_RE.match(pid):
            raise InvalidRequest(f"denial_permit_id {pid[:80]!r} is not a Keel permit id "
                                 "(the permit_id of the denied Authorize)")
        if not ask.requester.strip():
            raise InvalidRequest("requester is required (who asks for the exception)")
        if len(ask.requester) > 200:
            raise InvalidRequest("requester is longer than 200 characters")
        if len(ask.justification) > 2000:
            raise InvalidRequest("justification is longer than 2000 characters")
        budget = snapshot.budget(ask.budget_id)
        if budget is None:
            raise InvalidRequest(f"budget_id {ask.budget_id!r} is not a budget of policy "
                                 f"{snapshot.policy_revision}")
        if not budget.exception_path:
            raise NotADenial(f"budget {budget.id} has no exception path: its cap can only be "
                             "changed in the policy")
        rule = snapshot.exception_paths[budget.exception_path]
        split = grants.validate(snapshot, grants.GrantRequest(
            exception_path=budget.exception_path, budget_id=budget.id, scope=ask.scope,
            amount_micros=ask.amount_micros, duration_seconds=ask.duration_seconds,
            approver=ask.requester, approver_role=rule.approver_role,
            justification=ask.justification))
        issued = int(pid[4:16], 16)
        if issued > now + FUTURE_SLACK_MS:
            raise InvalidRequest(f"denial_permit_id {pid} was issued in the future")
        if issued < now - MAX_DENIAL_AGE_MS:
            raise InvalidRequest(f"denial {pid} is older than {MAX_DENIAL_AGE_MS // 86_400_000} "
                                 "days: ask again from a recent denial")
        seen = await self._check_denial(pid, budget, split)
        exc_id = exception_id(pid, budget.id, split, self.keys.home_shard(budget, split),
                              self.keys.shards)
        shard = self._shard(exc_id)
        scope = dict(zip([DIMENSION_NAMES[i] for i in budget.per], split, strict=True))
        until = now + self.pending_seconds * 1000
        rec = {"v": 1, "exc": exc_id, "denial": pid, "budget": budget.id, "split": list(split),
               "scope": scope, "path": rule.name, "role": rule.approver_role,
               "amt": ask.amount_micros, "dur": ask.duration_seconds,
               "why": ask.justification, "by": ask.requester, "at": now, "until": until,
               "rev": snapshot.policy_revision, "seen": seen}
        fp = hashlib.sha256(_dumps([ask.amount_micros, ask.duration_seconds, ask.justification,
                                    ask.requester]).encode()).hexdigest()[:32]
        out = await self._script(
            self._request, [self.record_key(exc_id), self.index_key_of(shard),
                            self.keys.streams[shard]],
            [exc_id, fp, now, until, self.retention_seconds, _dumps(rec), pid, _dumps(rec)])
        view = await self.get(exc_id, now)
        if view is None:  # pragma: no cover - written just now
            raise StoreUnavailable(f"exception {exc_id} vanished after it was recorded")
        if out.get("created") == 1:
            return view
        if out.get("same") == 1:
            return replace(view, changed=False)
        raise ExceptionConflict(
            f"an exception for denial {pid} on budget {budget.id} was already requested "
            f"({exc_id}, {view.state}) with a different amount, duration, justification or "
            "requester")

    async def _check_denial(self, pid: str, budget: CompiledBudget,
                            split: tuple[str, ...]) -> bool:
        """Refuse a permit that was allowed, or a denial by something other than
        this budget; True when the denial itself was read back from the stream."""
        raw_state = await self._read(self.store.client.hget(self.keys.permit(pid), "state"))
        state = _text(raw_state) if raw_state is not None else ""
        if state in _ALLOWED_STATES:
            raise NotADenial(f"permit {pid} was allowed (it is {state}), not denied: an "
                             "exception is requested from a denied Authorize")
        found = await self.find_decision(pid)
        if found is None:
            if state == "denied":  # the marker of a denial recorded without a hold
                raise NotADenial(f"denial {pid} was decided by policy or without the budget "
                                 "store, not by a budget's cap: an exception cannot change it")
            return False
        data, res = found
        if res.get("d") != "DENY":
            raise NotADenial(f"permit {pid} was {res.get('d')}, not denied: an exception is "
                             "requested from a denied Authorize")
        checked = [b for b in data.get("budgets") or [] if isinstance(b, dict)]
        mine = [b for b in checked if b.get("id") == budget.id
                and tuple(b.get("split") or ()) == split]
        if "fail" not in res or res.get("degraded"):
            codes = sorted({str(r.get("code")) for r in (res.get("reasons") or
                                                          data.get("reasons") or [])
                            if isinstance(r, dict)})
            raise NotADenial(
                f"denial {pid} was not a budget's ({', '.join(codes) or 'policy'}): an exception "
                "raises a budget cap and cannot change that decision")
        if not mine:
            names = sorted({str(b.get("id")) for b in checked})
            raise NotADenial(f"denial {pid} was not decided against budget {budget.id} "
                             f"with scope {list(split)} (it checked {', '.join(names) or 'none'})")
        # Checked is not enough: the budget named must be the one whose cap denied
        # the call (res.fail, 1-based in data.budgets: the block reason's budget_id).
        # A budget the call fitted in did not deny it, so an exception on it is not
        # an exception to this denial.
        listed = data.get("budgets") or []
        fail = res.get("fail")
        denier = (listed[fail - 1] if type(fail) is int and 1 <= fail <= len(listed)
                  and isinstance(listed[fail - 1], dict) else {})
        if denier.get("id") != budget.id or tuple(denier.get("split") or ()) != split:
            raise NotADenial(
                f"denial {pid} was decided by budget {denier.get('id') or '(unknown)'} "
                f"with scope {list(denier.get('split') or ())}, not by budget {budget.id} "
                f"with scope {list(split)}: ask on the budget its block reason names")
        return True

    async def find_decision(self, pid: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The decision event of ``pid`` while it is still on the stream (the
        ledger writer trims what it has stored)."""
        issued = int(pid[4:16], 16)
        lo: str = str(max(issued - _SCAN_BEFORE_MS, 0))
        hi = str(issued + _SCAN_AFTER_MS)
        want = pid.encode()
        for _ in range(_SCAN_PAGES):
            page: Any = await self._read(self.store.client.xrange(
                self.keys.stream_of(pid), min=lo, max=hi, count=_SCAN_PAGE))
            for _eid, fields in page:
                if fields.get(b"pid") == want and fields.get(b"type") == b"decision":
                    digest = events.entry_shape(fields)
                    if digest is not None:
                        # The shape's members are in their stored copy.
                        key = shape_copy_key(self.keys.stream_of(pid), digest)
                        copy: Any = await self._read(self.store.client.get(key))
                        try:
                            fields = events.entry_with_shape(fields, digest, copy, key)
                        except ParseError as exc:
                            raise NotADenial(f"denial {pid} cannot be read: {exc}") from exc
                    return (events.loads_object(fields.get(b"data", b"{}"), "data"),
                            events.loads_object(fields.get(b"res", b"{}"), "res"))
            if len(page) < _SCAN_PAGE:
                return None
            lo = "(" + _text(page[-1][0])
        return None

    # --------------------------------------------------------------- decide
    async def decide(self, snapshot: PolicySnapshot, exc_id: str, action: Literal[
            "approve", "reject"], approver: str, approver_role: str, note: str = "",
            now_ms: int | None = None) -> ExceptionView:
        now = self._now_ms() if now_ms is None else now_ms
        if not approver.strip():
            raise InvalidRequest("approver is required")
        if len(approver) > 200 or len(note) > 2000:
            raise InvalidRequest("approver or note is too long")
        if action == "reject" and len(note.strip()) < 3:
            raise InvalidRequest("a refusal needs a note saying why")
        view = await self.get(exc_id, now)
        if view is None:
            raise UnknownException(f"no exception request {exc_id[:80]!r} (never made, or older "
                                   f"than {self.retention_seconds // 86_400} days)")
        if view.state in ("approved", "rejected") or (view.state == "expired"
                                                      and view.decided_at_ms):
            return self._settled(view, action, approver)
        rule = snapshot.exception_paths.get(view.exception_path)
        if rule is None:
            raise InvalidRequest(f"exception path {view.exception_path!r} is no longer declared "
                                 f"in policy {snapshot.policy_revision}")
        if approver_role != rule.approver_role:
            raise grants.GrantForbidden(
                f"exception path {rule.name} is decided by role {rule.approver_role!r}, "
                f"not {approver_role!r}")
        if approver.strip().casefold() == view.requester.strip().casefold():
            raise grants.GrantForbidden(f"{view.requester} requested {exc_id}: a requester "
                                        "cannot decide their own exception")
        gid = grant_id_of(exc_id)
        expires = now + view.duration_seconds * 1000
        grant_data = ""
        if action == "approve":
            g = grants.GrantRequest(
                exception_path=view.exception_path, budget_id=view.budget_id, scope=view.scope,
                amount_micros=view.amount_micros, duration_seconds=view.duration_seconds,
                approver=approver, approver_role=approver_role,
                justification=view.justification, grant_id=gid)
            split = grants.validate(snapshot, g)
            grant_data = _dumps({
                "v": 1, "now": now, "budget": view.budget_id, "split": list(split),
                "path": view.exception_path, "amount": view.amount_micros, "exp": expires,
                "approver": approver, "role": approver_role, "why": view.justification,
                "rev": snapshot.policy_revision, "exc": exc_id,
                "denial": view.denial_permit_id})
        split = view.split  # in the budget's per-dimension order, as requested
        dec = {"by": approver, "role": approver_role, "note": note, "at": now}
        if action == "approve":
            dec.update({"grant": gid, "gexp": expires})
        event = _dumps({"v": 1, "exc": exc_id, "budget": view.budget_id,
                        "split": list(split), "path": view.exception_path, **dec,
                        "rev": snapshot.policy_revision})
        out = await self._script(
            self._decide,
            [self.record_key(exc_id), self._grants_key(exc_id, view.budget_id, split),
             self.keys.streams[self._shard(exc_id)]],
            [action, now, _dumps(dec), gid, view.amount_micros, expires,
             view.denial_permit_id, event, grant_data, exc_id])
        r = out.get("r")
        if r == "unknown":
            raise UnknownException(f"no exception request {exc_id[:80]!r}")
        after = await self.get(exc_id, now)
        if r == "expired" or after is None:
            raise ExceptionConflict(f"exception {exc_id} expired unanswered at "
                                    f"{view.pending_until_ms} ms (request it again)")
        if r == "decided":
            return self._settled(after, action, approver)
        return after

    async def _record_expiry(self, view: ExceptionView, now: int) -> ExceptionView | None:
        """Put the EXPIRED step of a request nobody decided on the ledger (once)."""
        exc_id = view.exception_id
        event = _dumps({"v": 1, "exc": exc_id, "budget": view.budget_id,
                        "split": list(view.split), "path": view.exception_path, "at": now})
        await self._script(
            self._decide, [self.record_key(exc_id),
                           self._grants_key(exc_id, view.budget_id, view.split),
                           self.keys.streams[self._shard(exc_id)]],
            ["expire", now, "{}", "", 0, 0, view.denial_permit_id, event, "", exc_id])
        return await self.get(exc_id, now)

    @staticmethod
    def _settled(view: ExceptionView, action: str, approver: str) -> ExceptionView:
        """A request that is no longer pending: a retry of the decision that
        settled it is answered unchanged; anything else is a conflict."""
        if view.state == "expired" or view.state == "pending":
            raise ExceptionConflict(f"exception {view.exception_id} expired unanswered "
                                    f"(pending until {view.pending_until_ms} ms); request it "
                                    "again")
        done = "approved" if action == "approve" else "rejected"
        if view.state == done and view.decided_by == approver:
            return replace(view, changed=False)
        raise ExceptionConflict(f"exception {view.exception_id} was already {view.state} by "
                                f"{view.decided_by} at {view.decided_at_ms} ms")

    # ----------------------------------------------------------------- read
    async def get(self, exc_id: str, now_ms: int | None = None) -> ExceptionView | None:
        if not exc_id.startswith("exc_") or len(exc_id) > 64:
            return None
        raw = await self._read(self.store.client.hgetall(self.record_key(exc_id)))
        return _view(raw, self._now_ms() if now_ms is None else now_ms)

    async def list(self, state: str = "", budget_id: str = "", limit: int = 100,
                   now_ms: int | None = None,
                   keep: Callable[[ExceptionView], bool] | None = None
                   ) -> list[ExceptionView]:
        """Newest first; ``keep`` (a caller's view) filters before ``limit`` counts."""
        if state and state not in STATES:
            raise InvalidRequest(f"state must be one of {', '.join(STATES)}")
        limit = min(max(limit or 100, 1), 1000)
        now = self._now_ms() if now_ms is None else now_ms
        found: list[ExceptionView] = []
        for shard in range(self.keys.shards):
            found.extend(await self._list_shard(shard, state, budget_id, limit, now, keep))
        if self.keys.shards > 1:
            found.sort(key=lambda v: v.requested_at_ms, reverse=True)
        return found[:limit]

    async def _list_shard(self, shard: int, state: str, budget_id: str, limit: int,
                          now: int, keep: Callable[[ExceptionView], bool] | None = None
                          ) -> builtins.list[ExceptionView]:
        out: list[ExceptionView] = []
        start, page = 0, 200
        client = self.store.client
        index_key = self.index_key_of(shard)
        while len(out) < limit:
            ids: Any = await self._read(client.zrevrange(index_key, start,
                                                         start + page - 1))
            if not ids:
                break
            pipe = client.pipeline(transaction=False)
            for i in ids:
                pipe.hgetall(self.record_key(_text(i)))
            rows: Any = await self._read(pipe.execute())
            gone = []
            for i, raw in zip(ids, rows, strict=True):
                v = _view(raw, now)
                if v is not None and v.state == "expired" and not v.decided_at_ms:
                    v = await self._record_expiry(v, now)
                if v is None:
                    gone.append(i)
                elif ((not state or v.state == state)
                      and (not budget_id or v.budget_id == budget_id)
                      and (keep is None or keep(v))):
                    out.append(v)
            if gone:  # records past their retention: drop them from the index
                await self._read(client.zrem(index_key, *gone))
                start -= len(gone)
            start += page
        return out[:limit]


def _view(raw: dict[Any, Any], now: int) -> ExceptionView | None:
    if not raw:
        return None
    f = {_text(k): _text(v) for k, v in raw.items()}
    rec = events.loads_object(f["rec"], "rec")
    dec = events.loads_object(f.get("dec") or "{}", "dec")
    state = f.get("state", "pending")
    if state == "pending" and now >= int(f.get("until", rec["until"])):
        state = "expired"
    scope = tuple(sorted((str(k), str(v)) for k, v in (rec.get("scope") or {}).items()))
    return ExceptionView(
        exception_id=rec["exc"], state=state,  # type: ignore[arg-type]
        denial_permit_id=rec["denial"], budget_id=rec["budget"], scope=scope,
        exception_path=rec["path"], approver_role=rec["role"], amount_micros=int(rec["amt"]),
        duration_seconds=int(rec["dur"]), justification=rec["why"], requester=rec["by"],
        requested_at_ms=int(rec["at"]), pending_until_ms=int(rec["until"]),
        policy_revision=rec.get("rev", ""), denial_seen=bool(rec.get("seen")),
        decided_by=str(dec.get("by", "")), decided_role=str(dec.get("role", "")),
        decided_at_ms=int(dec.get("at", 0)), decision_note=str(dec.get("note", "")),
        grant_id=str(dec.get("grant", "")), grant_expires_at_ms=int(dec.get("gexp", 0)),
        split=tuple(str(v) for v in rec.get("split") or ()))
