"""The RESP wire vocabulary of the Redis client: packing commands (``pack_evalsha``
and the ``Shared`` middle of script calls that many calls encode once), scripts
known by their SHA1, and the client's error types.

Kept apart from the connection and the client so the budget store and the
cluster router can build commands without the client's machinery.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import hiredis

Arg = str | bytes | int | float
# hiredis' stub types the argument as a 1-tuple; it takes a tuple of any length.
_pack = cast(Callable[[tuple[Arg, ...]], bytes], hiredis.pack_command)


def _body(args: tuple[Arg, ...]) -> bytes:
    """RESP bulk strings of ``args``, without the array header."""
    whole = _pack(args)
    return whole[whole.index(b"\r\n") + 2:]


@dataclass(frozen=True, slots=True)
class Shared:
    """The middle of a script call that many calls share: the last KEYS and the
    first ARGV, encoded once. A call then sends ``EVALSHA sha numkeys *keys
    <shared.wire> *args``; its KEYS are ``keys + shared.keys`` and its ARGV
    ``shared.args + args``."""

    keys: tuple[str, ...]
    args: tuple[Arg, ...]
    wire: bytes

    @classmethod
    def of(cls, keys: Sequence[str], args: Sequence[Arg]) -> Shared:
        return cls(tuple(keys), tuple(args), _body((*keys, *args)))


def pack_evalsha(sha: str, keys: Sequence[str], args: Sequence[Arg],
                 shared: Shared | None = None) -> bytes:
    """The EVALSHA command as sent on the wire."""
    if shared is None:
        return _pack(("EVALSHA", sha, len(keys), *keys, *args))
    nkeys = len(keys) + len(shared.keys)
    count = 3 + nkeys + len(shared.args) + len(args)
    return b"".join((b"*%d\r\n" % count, _body(("EVALSHA", sha, nkeys, *keys)),
                     shared.wire, _body(tuple(args))))


class RespError(Exception):
    """An error reply from Redis (for example NOSCRIPT, WRONGTYPE, BUSY, NOAUTH)."""


class RespConnectionError(ConnectionError):
    """No usable connection: connect failed, connection lost, back-off, overload."""


class RespNotSent(RespConnectionError):
    """The command was never written (no connection, back-off, overload, closed):
    it certainly did not run, so a caller may send it elsewhere (Redis Cluster)."""


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua script known by its SHA1, as EVALSHA wants it."""

    source: str
    sha: str

    @classmethod
    def from_source(cls, source: str) -> Script:
        return cls(source, hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest())

