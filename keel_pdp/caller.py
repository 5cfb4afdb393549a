"""The identity of the caller whose request is being served.

The transport edge (``keel_pdp.server.identity``) authenticates the caller and
sets it here; the decision, settlement and void events, built deep inside the
engine, read it, so the ledger can say who authorized and who closed out
without every signature in between carrying it. Tasks started while serving a
request (an ext_proc settlement, a void of an abandoned check) inherit it;
the expiry sweeper has none.
"""

from __future__ import annotations

from contextvars import ContextVar

CALLER: ContextVar[str] = ContextVar("keel_pdp_caller", default="")
MAX_CALLER_CHARS = 512


def current() -> str:
    return CALLER.get()


def event_fields() -> dict[str, str]:
    """``{"caller": identity}`` for an event's data, or nothing when unknown."""
    who = CALLER.get()
    return {"caller": who} if who else {}
