"""Redis Cluster URLs: ``redis+cluster://`` / ``rediss+cluster://`` with a list of
seed nodes -> the cluster client's settings, and the same URL as redis-py's
``RedisCluster`` takes it (for the administrative reads and the ledger writer).

Its own module: the URL grammar is configuration, checked at start-up with a
clear message, and shared by the RESP cluster client and redis-py.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from keel_pdp.budget.cluster_slots import Address
from keel_pdp.budget.redis_url import RespConfig, parse_url

SCHEMES = ("redis+cluster", "rediss+cluster")



@dataclass(frozen=True)
class ClusterConfig:
    """How the cluster client reaches a Redis Cluster: its seed nodes, the
    connection settings every node shares, and how often and how fast the slot
    map is refreshed; ``parse_cluster_url`` builds it from a URL."""

    seeds: tuple[Address, ...]
    # Connection settings every node shares (auth, TLS, timeouts); host/port unused.
    node: RespConfig = field(default_factory=RespConfig)
    # Background refreshes (after MOVED, a lost connection or a timeout) at most
    # this often; a call that cannot reach its master waits for one at once.
    refresh_interval_s: float = 0.1
    # How long one node may take to answer CLUSTER SLOTS during a refresh.
    refresh_timeout_s: float = 0.5
    max_redirects: int = 5
    # A node that a complete slot map no longer names is closed once its calls
    # in flight are answered; at the latest after this long (a silent node).
    retire_grace_s: float = 10.0


def is_cluster_url(url: str) -> bool:
    return urlsplit(url).scheme.lower() in SCHEMES


_KNOWN_QUERY = frozenset({"password", "username", "ssl_cert_reqs", "ssl_ca_certs",
                          "ssl_certfile", "ssl_keyfile", "ssl_check_hostname"})


def _seed(text: str, url: str) -> Address:
    if not text:
        raise ValueError(f"Redis Cluster URL {url!r} has an empty seed node "
                         f"(seeds are host:port, separated by commas)")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"Redis Cluster seed {text!r}: an IPv6 address is written "
                             f"[address]:port")
        port_text = rest[1:]
    else:
        host, _, port_text = text.partition(":")
        if ":" in port_text:
            raise ValueError(f"Redis Cluster seed {text!r}: an IPv6 address is written "
                             f"[address]:port")
    if not host:
        raise ValueError(f"Redis Cluster seed {text!r} has no host")
    if not port_text:
        return host, 6379
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"Redis Cluster seed {text!r}: port {port_text!r} is not a "
                         f"number from 1 to 65535")
    return host, int(port_text)


def describe_cluster_url(url: str) -> str:
    """Where a cluster URL points, without its credentials (for logs)."""
    seeds = parse_cluster_url(url).seeds
    return "cluster " + ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in seeds)


def parse_cluster_url(url: str, **overrides: Any) -> ClusterConfig:
    """``redis+cluster://[[user]:password@]host[:port][,host[:port]...][/]``, or
    ``rediss+cluster://`` for TLS (the ``ssl_*`` query parameters of ``parse_url``).
    ``overrides`` set fields of the per-node ``RespConfig`` (``connect_timeout_s``,
    ``stall_s``, ...)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        hint = (" (several hosts name a cluster: write redis+cluster://h1:p1,h2:p2/)"
                if "," in parts.netloc else "")
        raise ValueError(f"a Redis Cluster URL starts with redis+cluster:// or "
                         f"rediss+cluster://, not {scheme + '://' if scheme else url!r}{hint}")
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if not at:
        userinfo, hosts = "", parts.netloc
    if not hosts:
        raise ValueError(f"Redis Cluster URL {url!r} names no seed node")
    seeds: list[Address] = []
    for text in hosts.split(","):
        seed = _seed(text.strip(), url)
        if seed not in seeds:
            seeds.append(seed)
    path = parts.path.strip("/")
    if path not in ("", "0"):
        raise ValueError(f"Redis Cluster has only database 0; the URL names database "
                         f"{path!r}")
    query = parse_qs(parts.query, keep_blank_values=True)
    if "db" in query and query["db"][-1] not in ("", "0"):
        raise ValueError(f"Redis Cluster has only database 0; the URL names database "
                         f"{query['db'][-1]!r}")
    unknown = sorted(set(query) - _KNOWN_QUERY - {"db"})
    if unknown:
        raise ValueError(f"Redis Cluster URL: unknown parameter(s) {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(_KNOWN_QUERY))})")
    # The auth and TLS settings are those of a single-node URL: parse them the same way.
    host, port = seeds[0]
    shown = f"[{host}]" if ":" in host else quote(host, safe=".-_")
    single = f"{scheme.split('+')[0]}://{userinfo + '@' if at else ''}{shown}:{port}/"
    if parts.query:
        single += "?" + parts.query
    node = replace(parse_url(single), connections=1, db=0)
    cluster_fields = {k: overrides.pop(k) for k in list(overrides)
                      if k in ("refresh_interval_s", "refresh_timeout_s", "max_redirects",
                               "retire_grace_s")}
    if overrides:
        node = replace(node, **overrides)
    return ClusterConfig(tuple(seeds), node, **cluster_fields)


def redis_py_options(url: str) -> tuple[list[Address], dict[str, Any]]:
    """The seeds and connection options of a cluster URL as redis-py's
    ``RedisCluster`` takes them (``startup_nodes`` and keyword arguments), for
    the administrative reads and the ledger writer."""
    config = parse_cluster_url(url)
    options: dict[str, Any] = {"username": config.node.username,
                               "password": config.node.password}
    if urlsplit(url).scheme.lower() == "rediss+cluster":
        query = {k: v[-1] for k, v in parse_qs(urlsplit(url).query).items()}
        options["ssl"] = True
        for name in ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
            if name in query:
                options[name] = query[name]
        if "ssl_check_hostname" in query:
            options["ssl_check_hostname"] = query["ssl_check_hostname"].lower() not in (
                "0", "false", "no", "off", "")
    return list(config.seeds), options
