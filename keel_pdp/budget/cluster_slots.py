"""Redis Cluster addressing: which slot a key lives in (CRC16 of its hash tag,
modulo 16384, as Redis computes it), the one slot of a call's keys, which keys
a plain command names, and the ``MOVED``/``ASK`` redirections.

Pure functions, kept apart from ``ClusterClient`` so they can be used (and
tested) without a connection; ``call_slot`` runs for every call on the hot path.
"""

from __future__ import annotations

from collections.abc import Sequence

from keel_pdp.budget.resp_pack import Arg

SLOTS = 16384

Address = tuple[str, int]


# ------------------------------------------------------------------ key slots
def _crc16_table() -> tuple[int, ...]:
    # CRC-16/XMODEM (polynomial 0x1021, initial value 0), the CRC Redis Cluster uses.
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return tuple(table)


_TABLE = _crc16_table()


def crc16(data: bytes) -> int:
    crc = 0
    table = _TABLE
    for b in data:
        crc = ((crc << 8) & 0xFFFF) ^ table[(crc >> 8) ^ b]
    return crc


def hash_tag(key: str) -> str:
    """The part of ``key`` that is hashed: the text between the first ``{`` and the
    first ``}`` after it, when that is not empty; otherwise the whole key."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1:end]
    return key


_slot_cache: dict[str, int] = {}
_SLOT_CACHE_MAX = 65_536


def key_slot(key: str | bytes) -> int:
    """The cluster slot of ``key`` (what ``CLUSTER KEYSLOT`` answers)."""
    if isinstance(key, bytes):
        # "{" and "}" never occur inside a UTF-8 multi-byte sequence, so the tag
        # found in bytes is the tag found in text; bytes that are not UTF-8 are
        # hashed as they are.
        start = key.find(b"{")
        if start >= 0:
            end = key.find(b"}", start + 1)
            if end > start + 1:
                return crc16(key[start + 1:end]) & (SLOTS - 1)
        return crc16(key) & (SLOTS - 1)
    tag = hash_tag(key)
    slot = _slot_cache.get(tag)
    if slot is None:
        slot = crc16(tag.encode("utf-8", "surrogatepass")) & (SLOTS - 1)
        if len(_slot_cache) >= _SLOT_CACHE_MAX:
            _slot_cache.clear()
        _slot_cache[tag] = slot
    return slot


class CrossSlotError(ValueError):
    """The keys of one call live in different cluster slots. A programming or
    key-layout error, never a store outage: it is not a ``RespError`` or an
    ``OSError``, so the budget store does not turn it into a fail-open decision."""


def call_slot(keys: Sequence[str]) -> int | None:
    """The one slot of ``keys`` (None for no keys); ``CrossSlotError`` if they differ."""
    # key_slot, inlined: this runs for every key of every call.
    cache = _slot_cache
    slot = -1
    for k in keys:
        start = k.find("{")
        if start >= 0:
            end = k.find("}", start + 1)
            tag = k[start + 1:end] if end > start + 1 else k
        else:
            tag = k
        got = cache.get(tag)
        if got is None:
            got = key_slot(tag)  # a tag has no "}", so it hashes whole: the key's slot
        if slot < 0:
            slot = got
        elif got != slot:
            raise _cross_slot(keys)
    return None if slot < 0 else slot


def _cross_slot(keys: Sequence[str]) -> CrossSlotError:
    by_slot: dict[int, list[str]] = {}
    for key in keys:
        by_slot.setdefault(key_slot(key), []).append(key)
    detail = "; ".join(f"slot {s}: {', '.join(repr(k) for k in ks[:4])}"
                       + (f" and {len(ks) - 4} more" if len(ks) > 4 else "")
                       for s, ks in sorted(by_slot.items()))
    return CrossSlotError(
        f"the keys of one Redis Cluster call must share a slot (one hash tag); "
        f"these span {len(by_slot)} slots: {detail}")


# ------------------------------------------------------------------ routing
# Commands with no key: sent to any master. SCRIPT and FUNCTION go to every master.
_KEYLESS = frozenset({"PING", "ECHO", "TIME", "INFO", "CLUSTER", "CONFIG", "DBSIZE",
                      "COMMAND", "CLIENT", "LASTSAVE", "MEMORY", "SLOWLOG", "LATENCY",
                      "ACL", "HELLO", "AUTH", "READONLY", "READWRITE"})
_BROADCAST = frozenset({"SCRIPT", "FUNCTION"})
# Commands whose every argument after the name is a key.
_ALL_KEYS = frozenset({"DEL", "UNLINK", "EXISTS", "MGET", "TOUCH", "WATCH", "SINTER",
                       "SUNION", "SDIFF", "PFCOUNT"})
_NUMKEYS = frozenset({"EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO"})


def _text(value: Arg) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return str(value)


def command_keys(args: Sequence[Arg]) -> list[str]:
    """The keys of a plain command, for routing: the first argument for most
    commands, every argument for DEL/MGET/..., KEYS of EVAL-style commands, every
    other argument of MSET, none for server commands."""
    if not args:
        raise ValueError("empty Redis command")
    name = _text(args[0]).upper()
    rest = [_text(a) for a in args[1:]]
    if name in _KEYLESS or name in _BROADCAST:
        return []
    if name in _ALL_KEYS:
        return rest
    if name in ("MSET", "MSETNX"):
        return rest[0::2]
    if name in _NUMKEYS:
        if len(rest) < 2 or not rest[1].isdigit():
            raise ValueError(f"{name} needs a script and a number of keys")
        return rest[2:2 + int(rest[1])]
    return rest[:1]


def _redirect(message: str, asked_host: str) -> tuple[int, Address] | None:
    """Slot and address of ``MOVED 3999 127.0.0.1:6381`` / ``ASK ...``; None when the
    reply is not one (a slot or port out of range included). A node that does not
    know its endpoint (``cluster-preferred-endpoint-type unknown-endpoint``) leaves
    the host out (``MOVED 3999 :6381``) or writes ``?``: the host is then the one
    the command was sent to, ``asked_host``."""
    fields = message.split()
    if len(fields) < 3 or not fields[1].isdigit() or int(fields[1]) >= SLOTS:
        return None
    host, _, port = fields[2].rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        return None
    host = host.strip("[]")
    return int(fields[1]), (host if host not in ("", "?") else asked_host, int(port))


def slot_range(entry: object, asked_host: str) -> tuple[int, int, Address]:
    """First slot, last slot and master address of one ``CLUSTER SLOTS`` entry
    (``[start, end, [host, port, ...], replicas...]``; the host may be nil, "" or
    "?" for an endpoint the node does not know). ``ValueError`` naming the
    entry for anything Redis would not send (slots outside 0..16383 or reversed,
    a port outside 0..65535, a missing field), so a bad map is refused whole and
    the next node is asked, instead of a slice of it being installed. Port 0 is
    kept: a node reports it for an endpoint it does not serve, and a connection
    to it is refused like any unreachable master's."""
    try:
        if not isinstance(entry, list | tuple) or len(entry) < 3:
            raise ValueError("not [start, end, master, ...]")
        start, end, primary = int(entry[0]), int(entry[1]), entry[2]
        if not 0 <= start <= end < SLOTS:
            raise ValueError(f"slots {start}-{end} are not a range within 0-{SLOTS - 1}")
        if not isinstance(primary, list | tuple) or len(primary) < 2:
            raise ValueError("the master is not [host, port, ...]")
        raw_host, port = primary[0], int(primary[1])
        if not isinstance(raw_host, bytes | str | None) or not 0 <= port < 65536:
            raise ValueError("the master's host or port is out of range")
        host = raw_host.decode() if isinstance(raw_host, bytes) else raw_host
    except (ValueError, TypeError) as exc:
        raise ValueError(f"CLUSTER SLOTS entry {entry!r:.80}: {exc}") from None
    # An endpoint the node does not know (cluster-preferred-endpoint-type
    # unknown-endpoint: nil; a hostname not set: "?"; its own IP unknown: ""):
    # the client uses the host it asked, with the port given.
    return start, end, (host if host not in (None, "", "?") else asked_host, port)
