"""Flags that each have an environment variable: kinds of values, table rows, resolution.

A command describes its settings as a table of ``Setting`` rows (flag, variable,
built-in default, kind, help). ``add_settings`` adds the flags to a parser and
reads nothing from the environment (argparse defaults are ``None``);
``resolve`` runs when the command runs: the flag if given, else its deprecated
spelling, else the variable, else the deprecated variable, else the default.
A bad value raises ``SettingsError`` naming the flag and the variable. The
tables themselves live with their commands (keel_pdp.settings for ``serve``,
keel_pdp.ledger.commands for the ledger writer).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from keel_pdp.errors import SettingsError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class Bad(ValueError):
    """A value a kind refuses: ``template`` names it as ``{name}`` and shows ``{raw}``."""

    def __init__(self, template: str) -> None:
        super().__init__(template)
        self.template = template


# ------------------------------------------------------------------ kinds
class Kind:
    """Text in, value out; ``check`` also runs on values given in code."""

    def convert(self, text: str) -> Any:
        return text

    def check(self, value: Any) -> None:
        return None

    def parse(self, text: str) -> Any:
        value = self.convert(text)
        self.check(value)
        return value


class Text(Kind):
    pass


@dataclass(frozen=True)
class Integer(Kind):
    lo: int
    hi: int
    what: str = ""

    def convert(self, text: str) -> int:
        try:
            return int(text.strip())
        except ValueError:
            raise Bad("{name} {raw!r} is not an integer") from None

    def check(self, value: Any) -> None:
        if not self.lo <= value <= self.hi:
            raise Bad(f"{{name}} must be between {self.lo} and {self.hi}{self.what}, "
                      "not {raw}")


class Port(Integer):
    def __init__(self) -> None:
        super().__init__(0, 65535)

    def check(self, value: Any) -> None:
        if not 0 <= value <= 65535:
            raise Bad("{name} {raw} is not a port (0 disables)")


@dataclass(frozen=True)
class Seconds(Kind):
    """A duration in seconds, decimals allowed; ``zero_off``: 0 switches the thing off."""

    lo: float
    hi: float
    zero_off: bool = False

    def convert(self, text: str) -> float:
        try:
            d = Decimal(text.strip())
        except InvalidOperation:
            raise Bad("{name} {raw!r} is not a number of seconds (decimals allowed, "
                      "e.g. 0.025)") from None
        if not d.is_finite():
            raise Bad("{name} {raw!r} is not a number of seconds")
        return float(d)

    def check(self, value: Any) -> None:
        if (self.zero_off and value == 0) or self.lo <= value <= self.hi:
            return
        why = " (0 disables)" if self.zero_off else (
            " (a shorter pause would spin)" if isinstance(self, Loop) else "")
        raise Bad(f"{{name}} must be between {_num(self.lo)} and {_num(self.hi)} "
                  f"seconds{why}, not {{raw}}")


class Loop(Seconds):
    """The pause of a background loop: 0 or less would busy-loop."""


@dataclass(frozen=True)
class Choice(Kind):
    options: tuple[str, ...]
    upper: bool = False

    def convert(self, text: str) -> str:
        return text.strip().upper() if self.upper else text.strip().lower()

    def check(self, value: Any) -> None:
        if value not in self.options:
            shown = [o for o in self.options if o]
            raise Bad(f"{{name}} {{raw!r}} must be {', '.join(shown[:-1])} or {shown[-1]}")


class Switch(Kind):
    def convert(self, text: str) -> bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("", "0", "false", "no", "off"):
            return False
        raise Bad("{name} {raw!r} is not a boolean (true/false)")


class RedisUrl(Kind):
    def check(self, value: Any) -> None:
        scheme = urlsplit(value).scheme.lower()
        if scheme in ("redis+cluster", "rediss+cluster"):
            from keel_pdp.budget.cluster import parse_cluster_url
            try:
                parse_cluster_url(value)
            except OSError as exc:  # a TLS file named by an ssl_* parameter
                raise Bad("{name}: cannot read the TLS file(s) its ssl_* parameters name: "
                          + str(exc).replace("{", "{{").replace("}", "}}")) from None
            except ValueError as exc:
                # The parser's message may quote the whole URL: never its secrets.
                text = str(exc).replace(repr(value), repr(redacted_url(value)))
                text = text.replace(value, redacted_url(value))
                raise Bad("{name}: " + text.replace("{", "{{").replace("}", "}}")) from None
            return
        if scheme not in ("redis", "rediss", "unix"):
            raise Bad("{name} {safe!r}: scheme must be redis://, rediss://, unix:// or "
                      "redis+cluster://host:port,host:port/ (Redis Cluster seed nodes)")
        if "," in urlsplit(value).netloc:
            raise Bad("{name} {safe!r} names several hosts: a Redis Cluster is written "
                      "redis+cluster://h1:p1,h2:p2/")


class HostPort(Kind):
    def check(self, value: Any) -> None:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise Bad("{name} {raw!r} must be HOST:PORT")


def _num(x: float) -> str:
    return format(Decimal(repr(x)).normalize(), "f")


# ------------------------------------------------------------------ table
@dataclass(frozen=True)
class Alias:
    """A deprecated spelling: its own flag/variable and kind, converted to the new value."""

    flag: str
    env: str
    kind: Kind
    to_new: Callable[[Any], Any]


@dataclass(frozen=True)
class Setting:
    name: str
    flag: str
    env: str
    default: str
    kind: Kind = field(default_factory=Text)
    help: str = ""
    metavar: str | None = None
    alias: Alias | None = None
    show_default: bool = True

    def message(self, bad: Bad, raw: object, from_env: str = "") -> str:
        shown = redacted_url(str(raw)) if isinstance(self.kind, RedisUrl) else raw
        if from_env:
            text = bad.template.format(name=from_env, raw=shown, safe=shown)
            return f"{text} (flag {self.flag})"
        text = bad.template.format(name=self.flag, raw=shown, safe=shown)
        return f"{text} (env {self.env})"


def ms_to_seconds(ms: Any) -> float:
    return float(Decimal(int(ms)) / 1000)


class _Unparsed:
    """A flag value its kind refused; reported when the command's settings resolve."""

    def __init__(self, text: str, bad: Bad) -> None:
        self.text, self.bad = text, bad


def _lenient(kind: Kind) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return kind.parse(text)
        except Bad as bad:
            return _Unparsed(text, bad)

    return convert


def add_settings(p: argparse.ArgumentParser, table: Sequence[Setting]) -> None:
    """Add each setting's flag (and its hidden deprecated spelling) to ``p``.

    Nothing is read from the environment here: defaults are ``None``."""
    for s in table:
        default = f", default {s.default}" if s.show_default and s.default else ""
        text = f"{s.help} (env {s.env}{default})" if s.help else f"env {s.env}{default}"
        if s.alias is not None:
            text += f"; formerly {s.alias.flag}"
        if isinstance(s.kind, Switch):
            p.add_argument(s.flag, dest=s.name, action="store_const", const=True, default=None,
                           help=text)
        else:
            p.add_argument(s.flag, dest=s.name, type=_lenient(s.kind), default=None,
                           metavar=s.metavar, help=text)
        if s.alias is not None:
            p.add_argument(s.alias.flag, dest=f"{s.name}__alias", type=_lenient(s.alias.kind),
                           default=None, help=argparse.SUPPRESS)


@dataclass(frozen=True)
class Resolved:
    values: dict[str, Any]
    notes: tuple[str, ...]


def resolve(ns: argparse.Namespace, table: Sequence[Setting],
            env: Mapping[str, str] | None = None) -> Resolved:
    """Each setting's value: flag, deprecated flag, variable, deprecated variable, default.

    Raises ``SettingsError`` naming the flag and the variable of the first bad value."""
    e = os.environ if env is None else env
    values: dict[str, Any] = {}
    notes: list[str] = []
    for s in table:
        given = getattr(ns, s.name, None)
        old = getattr(ns, f"{s.name}__alias", None)
        if given is not None and old is not None and s.alias is not None:
            raise SettingsError(f"{s.flag} and its old spelling {s.alias.flag} are both "
                                "given; keep " + s.flag)
        if isinstance(given, _Unparsed):
            raise SettingsError(s.message(given.bad, given.text))
        if given is not None:
            values[s.name] = given
            continue
        if old is not None and s.alias is not None:
            if isinstance(old, _Unparsed):
                raise SettingsError(_alias_message(s, s.alias.flag, old.bad, old.text))
            values[s.name] = _checked(s, s.alias.to_new(old), s.alias.flag)
            notes.append(f"{s.alias.flag} is deprecated: use {s.flag} "
                         f"{_shown(values[s.name])}")
            continue
        raw = e.get(s.env)
        if raw:  # set and not empty (an empty value in a manifest means unset)
            try:
                values[s.name] = s.kind.parse(raw)
            except Bad as bad:
                raise SettingsError(s.message(bad, raw, from_env=s.env)) from None
            continue
        raw = e.get(s.alias.env) if s.alias is not None else None
        if s.alias is not None and raw:
            try:
                values[s.name] = _checked(s, s.alias.to_new(s.alias.kind.parse(raw)),
                                          s.alias.env)
            except Bad as bad:
                raise SettingsError(_alias_message(s, s.alias.env, bad, raw)) from None
            notes.append(f"{s.alias.env} is deprecated: use {s.env}="
                         f"{_shown(values[s.name])}")
            continue
        values[s.name] = s.kind.parse(s.default)
    return Resolved(values, tuple(notes))


def _alias_message(s: Setting, old: str, bad: Bad, raw: object) -> str:
    text = bad.template.format(name=old, raw=raw, safe=raw)
    return f"{text} (deprecated spelling of {s.flag}, env {s.env})"


def _checked(s: Setting, value: Any, old: str) -> Any:
    try:
        s.kind.check(value)
    except Bad as bad:
        raise SettingsError(f"{old} (deprecated spelling of {s.flag}): "
                            + s.message(bad, _shown(value))) from None
    return value


def _shown(value: Any) -> str:
    return _num(value) if isinstance(value, float) else str(value)


# Query parameters whose values are secrets (redis-py and our RESP client read
# ``password``; the others are there for URLs written for other clients).
_SECRET_PARAMS = ("pass", "secret", "token", "auth")


def redacted_url(url: str) -> str:
    """``url`` fit for logs and errors: the password of ``user:password@`` and any
    secret query parameter (``?password=``) replaced by ``***``."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            user, colon, _ = userinfo.partition(":")
            # A lone userinfo may be a password written without its colon.
            netloc = f"{user}:***@{hostport}" if colon else f"***@{hostport}"
        query = "&".join(
            f"{k}=***" if any(s in k.lower() for s in _SECRET_PARAMS) else f"{k}={v}"
            for k, v in parse_qsl(parts.query, keep_blank_values=True))
        return f"{parts.scheme}://{netloc}{parts.path}{'?' if query else ''}{query}"
    except ValueError:
        return f"{url.partition(':')[0]}://***"
