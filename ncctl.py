#!/usr/bin/env python3
"""nc — the LiteKube network controller as one program.

A private layer-3 overlay network (a VPN) between edge nodes and a cloud server:
TUN devices joined by mutual-TLS tunnels, stable overlay IPs kept in sqlite, a
gRPC control plane with bootstrap tokens, and an admin CLI.

    nc server [--config server.yml]     the cloud side
    nc client --join J --work-dir D     an edge node
    nc adm ...                          administration
    nc version

The file reads top-down; each section uses only the sections above it:

     1. Constants and errors          ports, states, status codes; NcError is what stderr says
     2. Config                        dataclasses whose defaults are nc's; one duration parser
     3. Process plumbing              locks, sd_notify, watchdog, supervision, the unit, packages
     4. Store                         the Datastore contract and its rules; sqlite and etcd
     5. Address pools and networks    the pools over the store, LRU reclaim, the overlays
     6. PKI                           CAs, certificates, serials, revocation, pins
     7. Control plane                 the one owner of the rules: identity, tokens, admission
     8. TUN and routes                the kernel side: ioctls, `ip`, NAT, undone on the way out
     9. Wire protocol                 frame and datagram formats, handshake messages
    10. Transport                     a secured path to a peer: TLS stream, UDP datagrams
    11. Network server                event loop, session lifecycle, switching
    12. Network client                replica following, the session, the node's TUN and routes
    13. gRPC services and clients     thin servicers; join, renewal and admin calls
    14. High availability             replicas on etcd: election, fencing, the standby's port
    15. Server and client assembly    one server with a role (single or replica); the client
    16. Admin commands, logging and main   `nc adm`, one printer, logs, argparse, exit codes
"""

from __future__ import annotations

import _thread
import argparse
import base64
import collections
import contextlib
import dataclasses
import datetime
import difflib
import errno
import fcntl
import functools
import hashlib
import hmac
import io
import ipaddress
import itertools
import json
import logging
import logging.handlers
import operator
import os
import queue
import random
import re
import secrets
import select
import shlex
import signal
import socket
import sqlite3
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NoReturn, Protocol

log = logging.getLogger("nc")

# nc forks only to exec a tool (`ip`, `iptables`), so gRPC's fork handlers have nothing to
# keep alive in the child. On 3.9, whose subprocess forks (3.10 on uses vfork, which runs no
# handlers), they restart gRPC's pollers in the child and may abort it before the exec.
# Read when grpc is first imported, which nc does only inside functions.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")


# ============================================================================
# 1. Constants and errors
#    Ports, states, status codes, and the NcError family whose message is
#    exactly what the user reads on stderr.
# ============================================================================


VERSION = "0.3.0"


DEFAULT_BOOTSTRAP_PORT = 6439


DEFAULT_GRPC_PORT = 6440


DEFAULT_NETWORK_PORT = 6441


DEFAULT_NETWORK_ADDR = "10.1.1.1/24"


DEFAULT_MTU = 1400


TRANSPORTS = ("auto", "udp", "tcp")  # the data path: UDP with TLS/TCP as fallback, UDP only, TLS/TCP only


DEFAULT_TOKEN_LIFE_MIN = 10


DEFAULT_SERVER_WORK_DIR = "/var/lib/nc"


DEFAULT_CLIENT_WORK_DIR = "/var/lib/nc-client"


DEFAULT_METRICS_ADDR = "127.0.0.1:9441"


NODE_TUN_NAME = "nc0"  # the node's TUN device: one nc client per host


MAX_JOIN_REPLICAS = 16  # replica addresses one join string lists at most: a node tries each in turn


# The server's own identity: bound to its overlay IP, held by the admin cert.
# Nine characters on purpose, so no generated 16-character node-token collides.
RESERVED_NODE_TOKEN = "reserverd"


DEFAULT_NETWORK = "default"  # the networkAddr network; nodes that know no net-token belong to it


NETWORK_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")


# Never a node's overlay address or a route into the tunnel: "this network", loopback,
# link-local, multicast, and reserved (with the limited broadcast address).
SPECIAL_IPV4 = tuple(
    ipaddress.IPv4Network(n) for n in ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4")
)


NODE_TOKEN_LEN = 16


TOKEN_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


# network_mgr.state values, as the original defines them.
STATE_IDLE = -1


STATE_INIT = 1


STATE_CONNECTED = 3


STATE_NAMES = {STATE_IDLE: "idle", STATE_INIT: "init", STATE_CONNECTED: "connected"}


# gRPC response codes are strings in the original contract.
CODE_OK = "200"


CODE_BAD_REQUEST = "400"


CODE_SERVER_ERROR = "500"


ORIGINAL_OK = "ok"  # the original's message with every code 200; scripts compare it


# Every server certificate carries this DNS name, so clients verify the server
# by name and keep working when its underlay address changes.
SERVER_TLS_NAME = "nc-server"


NEVER_EXPIRES = "9999-12-31 23:59:59"


TOKEN_SWEEP_INTERVAL_S = 600.0


# Bounds on what a caller may ask for (minutes); negative lives ("never") are the admin's only.
MAX_NODE_TOKEN_LIFE_MIN = 365 * 24 * 60


MAX_ADMIN_TOKEN_LIFE_MIN = 10 * 365 * 24 * 60


DEFAULT_NODE_CERT_LIFE_S = 365 * 86400


ADMIN_RENEW_BEFORE_S = 30 * 86400  # the admin identity is renewed at start when less than this is left


CACHE_SYNC_INTERVAL_S = 30.0


MAX_WELCOME_REPLICAS = 16


REPLICA_CONNECT_TIMEOUT_S = 2.0  # with other replicas to try, a dead one is given up on sooner


REPLICA_BACKOFF_CAP_S = 2.0  # between rounds over every replica (a single server's cap is BACKOFF_CAP_S)


MIN_CLUSTER_TOKEN_LEN = 16


RPC_TIMEOUT_S = 10.0


# nc's exit codes, as `nc --help` and the README list them.
EXIT_OK = 0


EXIT_FAILURE = 1  # a failure that may pass: the server unreachable, a full disk, a bug


EXIT_USAGE = 2  # the command line or a config file is wrong: fix it before trying again


EXIT_REFUSED = 3  # the server refused this node for good (unregistered, a bad token): join again


EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT), as a shell reports it


class NcError(Exception):
    """An error the user can act on; str(error) is the one line printed on stderr."""

    exit_code = EXIT_FAILURE


class ConfigError(NcError):
    exit_code = EXIT_USAGE


class UsageError(NcError):
    exit_code = EXIT_USAGE


class StoreError(NcError):
    pass


class NotLeader(StoreError):
    """A leader-only write by a replica that is not (or no longer) the leader."""


class Conflict(StoreError):
    """A write that would make a unique key twice (a bootstrap token, a node-token, an
    address): the key was taken, possibly by another writer since it was read."""


class AddressTaken(Conflict):
    """Another writer (a replica sharing the store) bound this address first: the pool is stale."""


class StoreFull(StoreError):
    """The store cannot be written: a full or read-only disk. Reads still work."""


def os_error_line(e: OSError, fix: str) -> str:
    """One line for a failed file operation: the path, the cause, and what to do."""
    causes = {
        errno.EROFS: "read-only file system",
        errno.ENOSPC: "no space left on the device",
        errno.EDQUOT: "disk quota exceeded",
        errno.EACCES: "permission denied",
    }
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{causes.get(e.errno or 0, e.strerror or str(e))}; {fix}"


class PkiError(NcError):
    pass


class BadRequest(NcError):
    """A request the server refuses as asked (gRPC code 400): the message says what to change."""


class NetworkFull(BadRequest):
    """A join into a network whose every address belongs to a connected node."""


class PermissionDenied(BadRequest):
    """The caller is a live identity, but the permission table does not allow this call."""


class Unauthenticated(NcError):
    """The caller's certificate names no live identity: revoked, unregistered, or never issued here."""


class RemoteError(NcError):
    """The server could not be reached or answered with an error."""


class TunError(NcError):
    pass


class ProtocolError(NcError):
    """Bytes on the wire that do not follow the nc frame protocol."""


def loggable(value: object, limit: int = 200) -> str:
    """A peer-supplied string as it may appear in a log line: control characters (a
    newline would start a forged line), backslashes and other unprintables escaped the
    way repr() does, and cut to `limit` characters."""
    text = str(value)
    return repr(text[:limit])[1:-1] + ("..." if len(text) > limit else "")


def one_line(text: str, most: int | None = None) -> str:
    """Text that may span lines (sqlite's integrity report, a library's message) as one
    line: its lines joined by '; ', past the first `most` only counted."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    kept = lines if most is None else lines[:most]
    return "; ".join(kept) + (f" (+{len(lines) - len(kept)} more)" if len(lines) > len(kept) else "")


# ============================================================================
# 2. Config
#    Dataclasses whose defaults are the embedded defaults, loaded from the
#    original YAML layout (camelCase keys) and validated field by field.
# ============================================================================


CAMEL_EXCEPTIONS = {"datastore_ca_file": "datastoreCAFile"}


def camel(name: str) -> str:
    """grpc_port -> grpcPort: the YAML key of a config attribute."""
    if name in CAMEL_EXCEPTIONS:
        return CAMEL_EXCEPTIONS[name]
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


@dataclasses.dataclass(frozen=True)
class NetworkSpec:
    """An overlay network besides the default one: server.yml `networks:` or `nc adm network create`."""

    name: str
    cidr: str
    interconnection: bool = True
    allow_public: bool = False  # a public (not private, not CGNAT) range was asked for on purpose

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Interface(self.cidr).network


def check_network_spec(
    name: Any, cidr: Any, interconnection: Any, where: str, allow_public: Any = False
) -> NetworkSpec:
    """Validate one network definition; errors name `where` and the fix."""
    if not isinstance(name, str) or not NETWORK_NAME_RE.match(name) or name == DEFAULT_NETWORK:
        raise ConfigError(
            f"{where}.name: {name!r} is not a usable network name; use 1-32 of a-z, 0-9, '-' (not 'default')"
        )
    try:
        network = ipaddress.IPv4Interface(str(cidr)).network
    except ValueError:
        raise ConfigError(f"{where}.cidr: {cidr!r} is not an IPv4 CIDR; write it like 10.2.0.1/24") from None
    if not 8 <= network.prefixlen <= 30:
        raise ConfigError(f"{where}.cidr: prefix /{network.prefixlen} is unsupported; use /8 to /30")
    if special := special_range(network):
        raise ConfigError(f"{where}.cidr: {network} overlaps the special-purpose range {special}; use a private range")
    if not isinstance(interconnection, bool):
        raise ConfigError(f"{where}.interconnection: expected true or false, got {interconnection!r}")
    if not isinstance(allow_public, bool):
        raise ConfigError(f"{where}.allowPublic: expected true or false, got {allow_public!r}")
    return NetworkSpec(name, str(cidr), interconnection, allow_public)


def special_range(network: ipaddress.IPv4Network) -> ipaddress.IPv4Network | None:
    """The special-purpose range network overlaps, if any: no overlay may use one."""
    return next((special for special in SPECIAL_IPV4 if network.overlaps(special)), None)


def overlapping(network: ipaddress.IPv4Network, others: dict[str, ipaddress.IPv4Network]) -> str | None:
    """The name of the first network in others that overlaps network, if any."""
    for name, other in others.items():
        if network.overlaps(other):
            return name
    return None


DEFAULT_SOURCE_PREFIX6 = 64  # one IPv6 host is routinely handed a whole /64


MIN_SOURCE_PREFIX6 = 32  # shorter would make whole providers one source


@dataclasses.dataclass
class ServerConfig:
    ip: str = ""  # advertised underlay address; empty: detected at start
    port: int = DEFAULT_NETWORK_PORT
    grpc_port: int = DEFAULT_GRPC_PORT
    bootstrap_port: int = DEFAULT_BOOTSTRAP_PORT
    network_addr: str = DEFAULT_NETWORK_ADDR
    network_cert_dir: str = ""  # empty: <tlsDir>/network
    grpc_cert_dir: str = ""  # empty: <tlsDir>/grpc
    work_dir: str = DEFAULT_SERVER_WORK_DIR
    db_path: str = ""  # empty: <workDir>/nc.db
    log_dir: str = ""  # empty: <workDir>/logs
    tls_dir: str = ""  # empty: <workDir>/tls
    debug: bool = False
    mtu: int = DEFAULT_MTU
    interconnection: bool = True
    gateway: bool = False  # forward and NAT node traffic out of the uplink
    offload: bool = True  # TSO/GSO on the TUN and 64 KiB frames with peers that agree
    transport: str = "auto"  # auto or udp: offer nodes the UDP data path; tcp: TLS only
    udp_port: int = DEFAULT_NETWORK_PORT  # where the UDP data path listens (TCP keeps `port`)
    keepalive: int = 10  # seconds between keepalives; a peer silent 3x this is dropped
    source_prefix6: int = DEFAULT_SOURCE_PREFIX6  # per-source limits count an IPv6 /N as one source
    networks: list[NetworkSpec] = dataclasses.field(default_factory=list)  # more overlays, by net-token
    nodes_may_mint: bool = True  # a node may mint bootstrap tokens into its own network (the "trusted node" flow)
    node_mint_rate: int = 10  # bootstrap tokens one node may mint per hour
    node_token_max_life: int = 60  # minutes; a node-minted token lives at most this long
    node_cert_life: int = DEFAULT_NODE_CERT_LIFE_S  # seconds (YAML: 30s, 90m, 12h, 365d); renewed at 2/3 of it
    metrics_addr: str = DEFAULT_METRICS_ADDR  # Prometheus /metrics (host:port); empty: off
    datastore_endpoint: str = ""  # comma list of etcd URLs: replicas share that store; empty: sqlite in dbPath
    datastore_ca_file: str = ""  # TLS to etcd (https endpoints)
    datastore_cert_file: str = ""
    datastore_key_file: str = ""
    cluster_token: str = ""  # the secret every replica shares; the PKI in etcd is encrypted with a key derived from it

    def resolve(self) -> ServerConfig:
        """Fill derived paths from workDir/tlsDir."""
        work = Path(self.work_dir)
        self.tls_dir = self.tls_dir or str(work / "tls")
        self.grpc_cert_dir = self.grpc_cert_dir or str(Path(self.tls_dir) / "grpc")
        self.network_cert_dir = self.network_cert_dir or str(Path(self.tls_dir) / "network")
        self.db_path = self.db_path or str(work / "nc.db")
        self.log_dir = self.log_dir or str(work / "logs")
        return self

    @property
    def admin_dir(self) -> Path:
        return Path(self.tls_dir) / "admin"

    @property
    def overlay(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Interface(self.network_addr).network

    @property
    def server_overlay_ip(self) -> ipaddress.IPv4Address:
        return self.overlay.network_address + 1


@dataclasses.dataclass
class ClientConfig:
    server_addr: str = ""  # the server's underlay address
    port: int = DEFAULT_NETWORK_PORT
    grpc_port: int = DEFAULT_GRPC_PORT  # the control port, where the node renews its certificates
    token: str = ""  # this node's node-token
    net_token: str = ""  # the overlay network this node belongs to; empty: the default one
    network_cert_dir: str = ""  # empty: <workDir>/tls/network
    work_dir: str = DEFAULT_CLIENT_WORK_DIR
    log_dir: str = ""  # empty: <workDir>/logs
    debug: bool = False
    mtu: int = DEFAULT_MTU
    redirect_gateway: bool = False  # send all traffic through the tunnel
    offload: bool = True  # offer 64 KiB TSO/GSO frames to the server
    transport: str = "auto"  # auto: UDP when it works, else TLS/TCP; udp: UDP for data; tcp: TLS only
    udp_port: int = DEFAULT_NETWORK_PORT  # the server's UDP port; at the default, the one its welcome names
    name: str = ""  # the name this node asks for at its first session (--name); empty: its host name
    direct_paths: bool = True  # offer "direct": datagrams straight to peers the server introduces

    def resolve(self) -> ClientConfig:
        work = Path(self.work_dir)
        self.network_cert_dir = self.network_cert_dir or str(work / "tls" / "network")
        self.log_dir = self.log_dir or str(work / "logs")
        return self

    @property
    def grpc_cert_dir(self) -> Path:
        return Path(self.work_dir) / "tls" / "grpc"


PORT_FIELDS = {"port", "grpc_port", "bootstrap_port", "udp_port"}


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


MAX_DURATION_S = 20 * 365 * 86400  # 7300d: longer than anything nc keeps, and a date every store can write


MIN_CERT_LIFE_S = 10  # a node certificate is renewed at two thirds of its life: it needs a few seconds


@dataclasses.dataclass(frozen=True)
class DurationField:
    """A config field that takes a duration (30s, 10m, 2h, 7d): the shortest it allows, what
    a bare number counts in, and the unit the config keeps it in (all in seconds)."""

    shortest: int
    number_unit: int = 1
    kept_in: int = 1


DURATION_FIELDS = {  # every duration of server.yml; a bare number keeps the unit the field always had
    "node_cert_life": DurationField(MIN_CERT_LIFE_S),
    "keepalive": DurationField(1),
    "node_token_max_life": DurationField(60, number_unit=60, kept_in=60),  # minutes, as the original's lives
}


PATH_FIELDS = {
    "network_cert_dir",
    "grpc_cert_dir",
    "work_dir",
    "db_path",
    "log_dir",
    "tls_dir",
    "datastore_ca_file",
    "datastore_cert_file",
    "datastore_key_file",
}


def load_config(path: str | None, mode: str) -> Any:
    """Read a server.yml / client.yml; None gives the embedded defaults."""
    cls = ServerConfig if mode == "server" else ClientConfig
    if path is None:
        return cls().resolve()
    import yaml

    where = Path(path)
    try:
        doc = yaml.safe_load(where.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; pass an existing --config or omit it") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{at}; fix the syntax") from None
    return config_from_doc(doc, path, mode, where.parent)


def config_from_doc(doc: Any, path: str, mode: str, base: Path) -> Any:
    cls = ServerConfig if mode == "server" else ClientConfig
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping with 'mode: {mode}' and a '{mode}:' map")
    for key in doc:
        if key not in ("mode", mode):
            raise ConfigError(f"{path}: unknown top-level field '{key}'; expected only 'mode' and '{mode}'")
    if doc.get("mode", mode) != mode:
        raise ConfigError(f"{path}: mode is '{doc.get('mode')}', expected '{mode}'; use a {mode}.yml here")
    section = doc.get(mode) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: '{mode}' must be a map of fields")
    fields = {camel(f.name): f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in section.items():
        field = fields.get(key)
        if field is None:
            closest = difflib.get_close_matches(str(key), fields, n=1, cutoff=0.6)
            fix = f"did you mean {closest[0]}?" if closest else f"known fields are {', '.join(sorted(fields))}"
            raise ConfigError(f"{path}: {mode}.{key}: unknown field; {fix}")
        if value is None:
            continue  # an empty value means "use the default"
        values[field.name] = check_field(path, mode, key, field, value, base)
    config = cls(**values)
    check_config(config, path, mode)
    return config.resolve()


def check_field(path: str, mode: str, key: str, field: dataclasses.Field, value: Any, base: Path) -> Any:
    where = f"{path}: {mode}.{key}"
    if field.name == "networks":
        return check_networks_field(value, where)
    if field.name in DURATION_FIELDS:
        return duration_field(value, where, DURATION_FIELDS[field.name])
    default = field.default
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected a whole number, got {value!r}; the default is {default}")
        if field.name in PORT_FIELDS and not 1 <= value <= 65535:
            raise ConfigError(f"{where}: port {value} is out of range; use 1-65535 (default {default})")
        return value
    if field.name == "server_addr" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = ",".join(value)  # several replicas
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    text = str(value)
    if field.name in PATH_FIELDS and text and not os.path.isabs(text):
        text = str((base / text).resolve())  # relative paths are relative to the config file
    return text


def parse_duration(
    value: Any, where: str, shortest: int = 1, error: type[NcError] = ConfigError, number_unit: int | None = None
) -> int:
    """Seconds from text such as 30s, 90m, 12h, 365d, or from a whole number of seconds
    (a YAML int, a gRPC field): the one duration parser of server.yml, the command line
    and the control plane. With number_unit, a bare number (also as text) counts in that
    many seconds (60: the original's minutes). Errors are `error` (ConfigError,
    UsageError, BadRequest) and start with `where`, the field or flag."""
    if isinstance(value, int) and not isinstance(value, bool):
        seconds = value * (number_unit or 1)
    else:
        match = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", str(value))
        if match is None or (not match[2] and number_unit is None):
            raise error(f"{where}: {value!r} is not a duration; write it like 30s, 90m, 12h or 365d")
        seconds = int(match[1]) * (DURATION_UNITS[match[2]] if match[2] else number_unit or 1)
    if not shortest <= seconds <= MAX_DURATION_S:
        span = f"{format_duration(shortest)} to {format_duration(MAX_DURATION_S)}"
        raise error(f"{where}: {value!r} is out of range; use {span}")
    return seconds


def duration_field(value: Any, where: str, spec: DurationField) -> int:
    """A server.yml duration, in the unit the config keeps it in."""
    seconds = parse_duration(value, where, shortest=spec.shortest, number_unit=spec.number_unit)
    if seconds % spec.kept_in:
        raise ConfigError(f"{where}: {value!r} is not whole minutes; write it like 90m or 2h")
    return seconds // spec.kept_in


def format_duration(seconds: int) -> str:
    """The largest whole unit: 31536000 -> 365d, 90 -> 90s."""
    for unit in "dhm":
        if seconds % DURATION_UNITS[unit] == 0:
            return f"{seconds // DURATION_UNITS[unit]}{unit}"
    return f"{seconds}s"


def check_networks_field(value: Any, where: str) -> list[NetworkSpec]:
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list of networks (- name: N, cidr: C, interconnection: true)")
    specs = []
    for index, item in enumerate(value):
        at = f"{where}[{index}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{at}: expected a map with name, cidr and optionally interconnection")
        unknown = set(item) - {"name", "cidr", "interconnection", "allowPublic"}
        if unknown:
            raise ConfigError(
                f"{at}.{sorted(unknown)[0]}: unknown field; a network has name, cidr, interconnection, allowPublic"
            )
        specs.append(
            check_network_spec(
                item.get("name"),
                item.get("cidr"),
                item.get("interconnection", True),
                at,
                item.get("allowPublic", False),
            )
        )
    return specs


def check_config(config: Any, path: str, mode: str) -> None:
    """Cross-field and format checks; the message names the field and the fix."""
    where = f"{path}: {mode}"
    if not 576 <= config.mtu <= 65535:
        raise ConfigError(f"{where}.mtu: {config.mtu} is out of range; use 576-65535 (default {DEFAULT_MTU})")
    if config.transport not in TRANSPORTS:
        raise ConfigError(
            f"{where}.transport: {config.transport!r} is not one of {', '.join(TRANSPORTS)} (default auto)"
        )
    if isinstance(config, ServerConfig):
        try:
            iface = ipaddress.IPv4Interface(config.network_addr)
        except ValueError:
            raise ConfigError(
                f"{where}.networkAddr: {config.network_addr!r} is not an IPv4 CIDR; write it like {DEFAULT_NETWORK_ADDR}"
            ) from None
        if not 8 <= iface.network.prefixlen <= 30:
            raise ConfigError(f"{where}.networkAddr: prefix /{iface.network.prefixlen} is unsupported; use /8 to /30")
        if special := special_range(iface.network):
            raise ConfigError(
                f"{where}.networkAddr: {iface.network} overlaps the special-purpose range {special}; use a private range"
            )
        if config.ip:
            check_host(config.ip, f"{where}.ip")
        if config.metrics_addr:
            split_host_port(config.metrics_addr, f"{where}.metricsAddr")
        ports = [config.port, config.grpc_port, config.bootstrap_port]
        if len(set(ports)) != 3:
            raise ConfigError(f"{where}: port, grpcPort and bootstrapPort must differ, got {ports}")
        if not 1 <= config.keepalive <= 3600:
            raise ConfigError(f"{where}.keepalive: use 1-3600 seconds (default 10)")
        if not MIN_SOURCE_PREFIX6 <= config.source_prefix6 <= 128:
            raise ConfigError(
                f"{where}.sourcePrefix6: use {MIN_SOURCE_PREFIX6}-128 (the IPv6 prefix one source holds; default "
                f"{DEFAULT_SOURCE_PREFIX6})"
            )
        if not 0 <= config.node_mint_rate <= 10000:
            raise ConfigError(f"{where}.nodeMintRate: use 0-10000 tokens per node per hour (default 10)")
        if not 1 <= config.node_token_max_life <= MAX_NODE_TOKEN_LIFE_MIN:
            raise ConfigError(f"{where}.nodeTokenMaxLife: use 1-{MAX_NODE_TOKEN_LIFE_MIN} minutes (default 60)")
        if config.datastore_endpoint and len(config.cluster_token) < MIN_CLUSTER_TOKEN_LEN:
            raise ConfigError(
                f"{where}.clusterToken: replicas on etcd (datastoreEndpoint) need a shared secret of at least "
                f"{MIN_CLUSTER_TOKEN_LEN} characters; set the same one on every replica"
            )
        seen = {DEFAULT_NETWORK: iface.network}
        for spec in config.networks:
            if spec.name in seen:
                raise ConfigError(f"{where}.networks: network {spec.name!r} is listed twice; names must be unique")
            other = overlapping(spec.network, seen)
            if other is not None:
                raise ConfigError(
                    f"{where}.networks: {spec.name} ({spec.network}) overlaps network {other!r} ({seen[other]}); pick a disjoint CIDR"
                )
            seen[spec.name] = spec.network
    else:
        for address in server_addresses(config.server_addr):
            check_host(address, f"{where}.serverAddr")
        if config.token and not valid_node_token(config.token):
            raise ConfigError(f"{where}.token: {config.token!r} is not a node-token; use the one `nc adm join` saved")
        if config.name and node_name_from(config.name) != config.name:
            raise ConfigError(
                f"{where}.name: {config.name!r} cannot name a node; use a-z, 0-9 and '-' (or leave it empty)"
            )
        if config.net_token and not valid_net_token(config.net_token):
            raise ConfigError(f"{where}.netToken: {config.net_token!r} is not a net-token; use the one the join saved")


def split_host_port(text: str, where: str) -> tuple[str, int]:
    """host:port or [v6]:port, as metricsAddr is written; errors name the field."""
    host, _, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{where}: {text!r} is not host:port; write it like {DEFAULT_METRICS_ADDR}, or empty for off")
    return host, int(port)


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def unmapped(ip: str) -> str:
    """An IPv4 peer of a dual-stack socket as plain IPv4 (::ffff:198.18.0.2 -> 198.18.0.2)."""
    return ip[7:] if ip.startswith("::ffff:") and "." in ip else ip


def source_key(ip: str, prefix6: int = DEFAULT_SOURCE_PREFIX6) -> str:
    """What a per-source limit counts as one source: an IPv4 address as it is, an IPv6
    address as the /prefix6 it lies in (198.18.0.2; 2001:2:0:1::/64). The one mapping
    from a peer's address to its key, for every port's limits and their log lines."""
    ip = unmapped(ip)
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if address.version == 4 or prefix6 >= 128:
        return str(address)
    return str(ipaddress.IPv6Network((address, prefix6), strict=False))


HOST_NAME_RE = re.compile(
    r"^(?=.{1,253}$)([a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)(\.[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)*\.?$"
)


def is_host_name(text: str) -> bool:
    """A DNS name (RFC 1123 labels), not an address."""
    return bool(HOST_NAME_RE.match(text)) and not text.replace(".", "").isdigit()


def check_host(text: str, where: str) -> None:
    """An IP address or a DNS name (resolved at each connect, so a moved server is found again)."""
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(text)
        return
    if not is_host_name(text):
        raise ConfigError(f"{where}: {text!r} is neither an IP address nor a DNS name")


class ResolveError(NcError, OSError):
    """A name that does not resolve: one line for a start-up, and an OSError the client's
    reconnect loop retries (the name may resolve again later)."""


def resolve_host(host: str, port: int = 0) -> str:
    """The first address host resolves to (itself when it is one); NcError when it does not."""
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(host))
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ResolveError(f"cannot resolve {host!r}: {e.strerror}; check the name or use an IP address") from None
    return unmapped(str(infos[0][4][0]))


def server_addresses(server_addr: str) -> list[str]:
    """client.serverAddr: one address, or the replicas' addresses (a YAML list, kept comma-joined)."""
    return [a.strip() for a in server_addr.split(",") if a.strip()]


def check_ip(text: str, where: str) -> None:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not an IP address") from None


def random_token(length: int = NODE_TOKEN_LEN) -> str:
    """Node-tokens, net-tokens and both halves of bootstrap tokens: a-z0-9, from secrets."""
    return "".join(secrets.choice(TOKEN_ALPHABET) for _ in range(length))


def valid_net_token(token: str) -> bool:
    return len(token) == NODE_TOKEN_LEN and all(c in TOKEN_ALPHABET for c in token)


def valid_node_token(token: str) -> bool:
    return token == RESERVED_NODE_TOKEN or (len(token) == NODE_TOKEN_LEN and all(c in TOKEN_ALPHABET for c in token))


NODE_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def node_name_from(text: str) -> str:
    """A usable node name from what a node says of itself (its host name, or --name):
    lowercase, the first DNS label, anything else as '-'; "" when nothing is left."""
    label = re.sub(r"[^a-z0-9-]+", "-", text.strip().lower().split(".")[0])
    return label.strip("-")[:63].strip("-")


def check_node_name(name: str) -> None:
    """BadRequest unless name can name a node: a DNS label that cannot be read as a node-token."""
    if not NODE_NAME_RE.match(name) or valid_node_token(name):
        raise BadRequest(
            f"{name!r} cannot name a node; use 1-63 of a-z, 0-9 and '-' (not first or last), "
            "and not 16 letters and digits (that reads as a node-token)"
        )


def free_node_name(wanted: str, taken: set[str]) -> str:
    """wanted, or the first of wanted-2, wanted-3, ... that no other node of the network
    has: a name clash at a join gets a suffix (an admin's rename is refused instead)."""
    if wanted not in taken and not valid_node_token(wanted):
        return wanted
    for n in itertools.count(2):
        candidate = f"{wanted[: 62 - len(str(n))]}-{n}"
        if candidate not in taken:
            return candidate
    raise AssertionError("unreachable")


def client_yaml(config: ClientConfig) -> str:
    """The client.yml a join writes: the original layout, every field present."""
    import yaml

    body = {camel(f.name): getattr(config, f.name) for f in dataclasses.fields(config)}
    if len(server_addresses(config.server_addr)) > 1:
        body["serverAddr"] = server_addresses(config.server_addr)  # the replicas, as a YAML list
    return yaml.safe_dump({"mode": "client", "client": body}, sort_keys=False)


# ============================================================================
# 3. Process plumbing
#    What every mode needs from the host: the work-dir lock, sd_notify and the
#    watchdog, supervision, limits, the systemd unit, the bundled packages.
# ============================================================================


def sd_notify(message: str) -> bool:
    """Tell the service manager (systemd's NOTIFY_SOCKET protocol, one datagram); False
    when nc does not run under one."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), address)
    except OSError as e:
        log.warning("cannot notify the service manager at %s: %s", loggable(address), e.strerror or e)
        return False
    return True


@contextlib.contextmanager
def work_dir_lock(work_dir: Path, mode: str = "server") -> Iterator[None]:
    """One server (or client) per workDir: a second start fails fast, naming the first,
    instead of sharing its database or TUN. The kernel drops the lock with the process."""
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(work_dir / f"nc-{mode}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise NcError(os_error_line(e, f"give nc a writable {mode}.workDir")) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise NcError(
                f"another nc {mode} (pid {holder}) is running with workDir {work_dir}; stop it first"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:
            e.filename = str(work_dir)
            raise NcError(os_error_line(e, f"free space there or set another {mode}.workDir")) from None
        yield
    finally:
        os.close(fd)


# The interpreter's own thread-exception hook, to defer to and to put back. 3.10 names it
# threading.__excepthook__; on 3.9 only _thread does (the same function on every version).
THREAD_EXCEPTHOOK = threading.__excepthook__ if sys.version_info >= (3, 10) else _thread._excepthook


class Supervisor:
    """Watches the server's long-lived parts (threads and gRPC servers). When one ends
    while nobody asked it to, the server must not go on half alive (gRPC answering, no
    data plane): wait() logs one line naming the part and the server exits non-zero, so
    a service manager restarts all of it."""

    def __init__(self) -> None:
        self.parts: dict[str, Callable[[], bool]] = {}
        self.causes: dict[str, str] = {}  # thread name -> the exception that ended it

    def watch(self, name: str, alive: Callable[[], bool]) -> None:
        self.parts[name] = alive

    def watch_thread(self, thread: threading.Thread) -> None:
        self.watch(f"thread {thread.name}", thread.is_alive)

    def on_thread_exception(self, args: Any) -> None:
        """threading.excepthook: keep the cause for wait()'s one line; the traceback goes
        to the debug log instead of stderr."""
        name = f"thread {args.thread.name}" if args.thread is not None else "a thread"
        if name not in self.parts:  # not one of ours (a library's): its traceback as usual
            THREAD_EXCEPTHOOK(args)
            return
        self.causes[name] = loggable(f"{args.exc_type.__name__}: {args.exc_value}")
        log.debug("%s failed", name, exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    def dead(self) -> str | None:
        return next((name for name, alive in self.parts.items() if not alive()), None)

    def wait(self, stop: threading.Event, tick: Callable[[], None] = lambda: None) -> int:
        """Until a signal sets stop (0) or a part ends on its own (1); tick() once a second
        while all parts live (the service manager's watchdog, a pending reload)."""
        while not stop.wait(1.0):
            if (name := self.dead()) is not None:
                cause = self.causes.get(name, "it ended")
                log.critical("%s stopped unexpectedly (%s); exiting so nc can be restarted whole", name, cause)
                return 1
            tick()
        return 0


def wait_for_stop_signal(stop: threading.Event, supervisor: Supervisor, tick: Callable[[], None] = lambda: None) -> int:
    """0 after SIGTERM (a service stopped), 130 after Ctrl-C, 1 when a part died."""
    received: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        received.append(signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = supervisor.wait(stop, tick)
    return EXIT_INTERRUPTED if code == EXIT_OK and signal.SIGINT in received else code


class Watchdog:
    """systemd's WatchdogSec: WATCHDOG=1 at half the interval, and only while the server
    is healthy, so a stuck data plane gets the service restarted."""

    def __init__(self) -> None:
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        meant = not pid or pid == str(os.getpid())
        self.interval = int(usec) / 2e6 if usec.isdigit() and meant else 0.0
        self.next = 0.0

    def ping(self, healthy: bool) -> None:
        now = time.monotonic()
        if self.interval and healthy and now >= self.next:
            sd_notify("WATCHDOG=1")
            self.next = now + self.interval


def raise_open_file_limit() -> int:
    """Every node holds a socket: take the hard limit, not the default 1024. Returns the
    limit now in force, which the gRPC servers' connection caps are cut from."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


FD_RESERVE_DATA = 64  # descriptors a new data-plane connection must leave free (gRPC, nc adm, store, logs)


FD_RESERVE_GRPC = 16  # and a new gRPC connection (three descriptors each, through the guard)


def reset_close(sock: socket.socket) -> None:
    """Close at once, with a reset: no FIN_WAIT lingers, the peer knows at once."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class FdBudget:
    """Accepts that keep a reserve of file descriptors. A connection whose descriptor
    falls in the reserve is refused at once (a reset), so the process never runs out:
    `nc adm`, the store and the logs get theirs, and no peer waits in a backlog. Out of
    descriptors anyway (another part took them), a spare one makes room to accept the
    connection and refuse it. The limit is read at every accept (prlimit changes it
    under a running process)."""

    def __init__(self, reserve: int) -> None:
        self.reserve = reserve
        self.spare = self._open_spare()

    @staticmethod
    def _open_spare() -> int:
        try:
            return os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return -1

    def ceiling(self) -> int:
        """The lowest descriptor a new connection may not have (one cheap syscall)."""
        import resource

        return resource.getrlimit(resource.RLIMIT_NOFILE)[0] - self.reserve

    def accept(self, listener: socket.socket) -> tuple[socket.socket, Any] | None:
        """listener.accept(), or None for a connection refused for descriptors.
        BlockingIOError when none is waiting; other OSErrors as accept() raises them."""
        try:
            sock, address = listener.accept()
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE) or self.spare < 0:
                raise
            os.close(self.spare)
            try:
                sock, _ = listener.accept()
                reset_close(sock)
            finally:
                self.spare = self._open_spare()
            return None
        if sock.fileno() >= self.ceiling():
            reset_close(sock)
            return None
        return sock, address

    def close(self) -> None:
        if self.spare >= 0:
            os.close(self.spare)
            self.spare = -1


MALLINFO2_FIELDS = (
    "arena",
    "ordblks",
    "smblks",
    "hblks",
    "hblkhd",
    "usmblks",
    "fsmblks",
    "uordblks",
    "fordblks",
    "keepcost",
)


M_ARENA_MAX = -8  # mallopt parameter (glibc malloc.h)


def limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each thread that allocates under contention its own arena, up to
    8 per core, and memory freed in one arena is not reused by the others: gRPC's
    threads churning through a flood of connections then grow the heap cycle after
    cycle. Two arenas keep it reusable (a no-op off glibc)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, arenas)


class MemoryTrimmer(threading.Thread):
    """Gives freed heap back to the kernel after a flood. glibc keeps what tens of
    thousands of connections freed in its arenas for reuse, so RSS never falls by
    itself; malloc_trim returns the free pages. It runs only when the free heap has
    grown by TRIM_AFTER since the last trim, so a steady server never pays for it."""

    TRIM_AFTER = 16 * 1024 * 1024

    def __init__(self, stop: threading.Event, interval: float = 5.0) -> None:
        super().__init__(name="memory-trimmer", daemon=True)
        self.stop = stop
        self.interval = interval

    def run(self) -> None:
        import ctypes

        try:
            libc = ctypes.CDLL("libc.so.6")
            trim, info = libc.malloc_trim, libc.mallinfo2
        except (OSError, AttributeError):  # not glibc (or older than 2.33): nothing to do
            return
        info.restype = type(
            "mallinfo2", (ctypes.Structure,), {"_fields_": [(name, ctypes.c_size_t) for name in MALLINFO2_FIELDS]}
        )
        trim.argtypes = [ctypes.c_size_t]
        low = info().fordblks
        while not self.stop.wait(self.interval):
            free = info().fordblks
            if free > low + self.TRIM_AFTER:
                trim(0)
                log.debug("returned free heap to the kernel (%d MiB free in the arenas)", free >> 20)
                low = free
            low = min(low, free)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block is done (a set of files written as one);
    one that came meanwhile acts as the block ends. Handlers, not a signal mask: with
    other threads running, the kernel hands a masked signal to one of them."""
    came: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda signum, _frame: came.append(signum)) for sig in held}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if came:
            signal.raise_signal(came[0])


def reload_once_running(mode: str) -> None:
    """SIGHUP before the server or client runs (starting, joining) is not the end of it,
    as its default action would be: nothing is read yet that could be read again."""

    def early(_signum: int, _frame: Any) -> None:
        log.info("SIGHUP: nc %s is still starting; nothing re-read (send it again once it runs)", mode)

    signal.signal(signal.SIGHUP, early)


def check_root(mode: str) -> None:
    if os.geteuid() != 0:
        raise NcError(f"nc {mode} must run as root (it creates a TUN device and routes); run it with sudo or as root")


SYSTEMD_DIR = Path("/etc/systemd/system")


SERVICE_EXECUTABLE = Path("/usr/local/lib/nc/nc")  # off PATH: `nc` there is netcat on many hosts


SERVICE_CACHE = "/var/cache/nc"  # where the unit's nc unpacks its libraries (ProtectHome hides ~/.shiv)


def unit_path_problem(what: str, path: str) -> str | None:
    """Why `path` cannot go into a unit file, or None: a control character there (a line
    break adds a directive of its own, others reach systemd's parser and the journal as is)."""
    bad = sorted({ch for ch in path if ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0})
    if not bad:
        return None
    kind = "a line break" if any(ch in "\n\r" for ch in bad) else "a control character"
    shown = ", ".join(repr(ch)[1:-1] for ch in bad)
    return f"{what}: a path with {kind} ({shown}) cannot go into a unit file"


def service_unit(
    mode: str, executable: Path, config: Path | None, work_dir: str, interpreter: tuple[str, ...] = ()
) -> str:
    """A systemd unit for `nc server` or `nc client`: Type=notify (nc says READY=1 once it
    serves), a watchdog nc feeds only while healthy, restart on failure, reload by SIGHUP,
    and the hardening that still lets it make TUN devices, routes and NAT rules."""
    command = [*interpreter, str(executable), mode] + (["--config", str(config)] if config else [])
    what = "server (cloud side)" if mode == "server" else "client (edge node)"
    lines = [
        "[Unit]",
        f"Description=nc {what}: LiteKube network controller",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={shlex.join(command)}",
        "SyslogIdentifier=nc",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        # exit 2 (a config or usage error) and 3 (refused by the server) stay so until a
        # person acts: restarting would only repeat them every RestartSec
        f"RestartPreventExitStatus={EXIT_USAGE} {EXIT_REFUSED}",
        "RestartSec=2s",
        "TimeoutStartSec=90s",
        "WatchdogSec=30s",
        "LimitNOFILE=1048576",
        f"Environment=SHIV_ROOT={SERVICE_CACHE}",
        "CacheDirectory=nc",
        # root, but only the capabilities a VPN needs: TUN devices, addresses, routes, iptables
        "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_BIND_SERVICE CAP_NET_RAW",
        "AmbientCapabilities=CAP_NET_ADMIN CAP_NET_BIND_SERVICE CAP_NET_RAW",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        f"ReadWritePaths={work_dir}",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "LockPersonality=yes",
        "SystemCallArchitectures=native",
        "DevicePolicy=closed",
        "DeviceAllow=/dev/net/tun rw",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(lines)


def hidden_from_services(path: Path) -> str | None:
    """The directory that hides path from the unit's sandbox (PrivateTmp, ProtectHome), if any."""
    for hidden in ("/tmp", "/var/tmp", "/home", "/root", "/run/user"):
        if path == Path(hidden) or Path(hidden) in path.parents:
            return hidden
    return None


SERVICE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # systemd's PATH for services


def service_interpreter() -> tuple[tuple[str, ...], str | None]:
    """How the unit starts the file, and a warning. Through its `#!/usr/bin/env python3`
    when that finds this very interpreter on systemd's PATH (the unit then follows the
    host's upgrades); else with this interpreter named (a python3.9 next to an older
    python3); else, when the sandbox would hide this one, python3 from PATH, said aloud."""
    import shutil

    found = shutil.which("python3", path=SERVICE_PATH)
    if found and Path(found).resolve() == Path(sys.executable).resolve():
        return (), None
    hidden = hidden_from_services(Path(sys.executable).resolve()) or hidden_from_services(Path(sys.executable))
    if hidden is None:
        return (sys.executable,), None
    instead = f"{found} ({os.path.realpath(found)})" if found else "no python3 on systemd's PATH"
    return (), f"this Python ({sys.executable}) is under {hidden}, hidden from the service; it runs {instead}"


def install_executable(source: Path, target: Path) -> None:
    """Copy the running nc to target in one step: a service that restarts meanwhile runs
    the old file or the new one, never half of one."""
    import shutil

    if source == target.resolve():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(source, scratch)
        scratch.chmod(0o755)
        os.replace(scratch, target)
    finally:
        scratch.unlink(missing_ok=True)


# The file carries one set of packages per CPython (sets.tar.xz: one xz stream for them all,
# indexed by nc-bundle.json; build.sh writes both). Its launcher has already refused an
# interpreter without a set, so here the running interpreter's set is put on sys.path,
# unpacked beside shiv's site-packages the first time this build runs under it.
BUNDLE_INDEX = "nc-bundle.json"


BUNDLE_SETS = "sets.tar.xz"


def interpreter_tag() -> str:
    """The bundle's name for the running interpreter's set: cp39, cp310, ..."""
    return f"cp{sys.version_info[0]}{sys.version_info[1]}"


def running_archive() -> Path | None:
    """The nc file this process was started from; None when ncctl.py runs from source."""
    if shiv_extraction() is None:
        return None
    path = Path(sys.argv[0]).resolve()
    return path if path.is_file() else None


def bundle_index(archive: Path) -> dict[str, Any]:
    """What the file carries: its architecture, glibc floor, and each interpreter's wheels."""
    import zipfile

    with zipfile.ZipFile(archive) as zipapp:
        return json.loads(zipapp.read(BUNDLE_INDEX))


def use_bundled_set() -> Path | None:
    """Put this interpreter's packages on sys.path, after shiv's site-packages (ncctl.py and
    proto/), before the host's own. Returns their directory; None when run from source."""
    extraction, archive = shiv_extraction(), running_archive()
    if extraction is None or archive is None:
        return None
    target = extraction / interpreter_tag()
    if not target.is_dir():
        unpack_bundled_set(archive, target)
    site = str(extraction / "site-packages")
    sys.path.insert(sys.path.index(site) + 1 if site in sys.path else 0, str(target))
    return target


def unpack_bundled_set(archive: Path, target: Path) -> None:
    """Unpack this interpreter's wheels from the archive into target: into a scratch
    directory renamed when complete, under a lock, so nc processes starting together
    unpack it once and none ever sees half of it. A damaged file is one NcError, and
    what a start killed halfway (or this one) left is removed."""
    import lzma
    import shutil
    import tarfile
    import zipfile

    lock = os.open(target.parent / f".{target.name}_lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_dir():
            return  # another nc unpacked it while this one waited
        wanted = set(bundle_index(archive)["sets"].get(interpreter_tag(), ()))
        if not wanted:
            raise NcError(f"{archive} carries no packages for Python {sys.version.split()[0]}")
        if sys.stderr.isatty():
            print(f"nc: first start of this build on Python {sys.version.split()[0]}: unpacking", file=sys.stderr)
        for stale in target.parent.glob(f"{target.name}.*.tmp"):  # under the lock: nobody unpacks there now
            shutil.rmtree(stale, ignore_errors=True)
        scratch = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        try:
            extract_wheels(archive, wanted, scratch)
            compile_for_this_interpreter(scratch, shown_as=target)
            scratch.rename(target)
        except (tarfile.TarError, lzma.LZMAError, zipfile.BadZipFile, EOFError) as e:
            raise NcError(f"{archive} is damaged ({e}); copy the file again") from None
        finally:
            shutil.rmtree(scratch, ignore_errors=True)  # gone already when it became target
        compile_for_this_interpreter(target.parent / "site-packages")  # another interpreter may have unpacked it
    finally:
        os.close(lock)


def extract_wheels(archive: Path, wanted: set[str], into: Path) -> None:
    """Write the files of the wanted wheels from the archive's xz stream under into."""
    import shutil
    import tarfile
    import zipfile

    with zipfile.ZipFile(archive) as zipapp, zipapp.open(BUNDLE_SETS) as stream:
        with tarfile.open(fileobj=stream, mode="r|xz") as tar:
            for member in tar:  # grouped by wheel, in name order: stop after the last wanted
                wheel, _, name = member.name.partition("/")
                if wheel not in wanted:
                    if all(other < wheel for other in wanted):
                        break
                    continue
                if not member.isfile() or name.startswith("/") or ".." in Path(name).parts:
                    raise NcError(f"{archive}: a damaged package entry {member.name!r}; copy the file again")
                path = into / name
                path.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                assert source is not None  # a regular file, checked above
                with source, open(path, "wb") as out:
                    shutil.copyfileobj(source, out)
                path.chmod(member.mode & 0o755)


def compile_for_this_interpreter(directory: Path, shown_as: Path | None = None) -> None:
    """Byte-compile once, at unpacking, what later starts import, even where
    PYTHONDONTWRITEBYTECODE keeps the import system from writing it (compiling ncctl.py
    alone takes longer than the rest of a start)."""
    import compileall

    compileall.compile_dir(str(directory), ddir=str(shown_as) if shown_as else None, quiet=2, workers=1)


PR_SET_NAME = 15  # prctl(2): the thread's name, as top, ps -e and the journal (_COMM) show it


def name_process(name: str = "nc") -> None:
    """Show this process as nc rather than as the python3 that runs the file: its name
    (threads started later inherit it) and, for ps, its command line without the
    interpreter, rewritten in place in the memory the kernel reads it from."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()), 0, 0, 0)
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = Path("/proc/self/stat").read_text().rpartition(")")[2].split()
        start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end: fields 48 and 49 of proc(5)
        words = "\0".join(sys.argv).encode() + b"\0"
        if len(words) <= end - start:
            with open("/proc/self/mem", "r+b", buffering=0) as memory:
                memory.seek(start)
                memory.write(words.ljust(end - start, b"\0"))


OLD_EXTRACTION_AGE_S = 3600  # unused this long (by its in-use marker, else since extraction): removable


def shiv_extraction() -> Path | None:
    """The ~/.shiv/<name>_<build-id> directory this nc runs from, if it runs from one."""
    site = Path(__file__).resolve().parent
    return (
        site.parent
        if site.name == "site-packages" and (site.parent.parent / f".{site.parent.name}_lock").exists()
        else None
    )


def mark_extraction_in_use(extraction: Path) -> int | None:
    """Hold a shared lock on <root>/.<extraction>_inuse for this process's life, so another
    build's clean-up leaves this extraction alone (not shiv's own _lock: it takes that one
    exclusively while extracting, and a shared hold would make the next start wait)."""
    marker = extraction.parent / f".{extraction.name}_inuse"
    try:
        fd = os.open(marker, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        os.utime(marker)  # last used: now
    except OSError:
        return None
    return fd


def extractions_in_use(name: str) -> str:
    """What live processes use, as one text to search: the files they map (their libraries)
    and the build ids of the zipapps named `name` they run (one still starting has mapped
    nothing yet)."""
    import zipfile

    used = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError, KeyError, ValueError, zipfile.BadZipFile):
            used.append((proc / "maps").read_text())
            for arg in (proc / "cmdline").read_bytes().split(b"\0")[1:3]:
                path = proc / "cwd" / os.fsdecode(arg)  # relative to that process's directory
                if path.name == name and zipfile.is_zipfile(path):
                    with zipfile.ZipFile(path) as archive:
                        build = json.loads(archive.read("environment.json")).get("build_id", "")
                    used.append(f"/{name}_{build}/")
    return "".join(used)


def last_used(extraction: Path) -> float:
    """When an nc last started from this extraction: its in-use marker's time, or (a build
    that kept no marker) when it was extracted."""
    marker = extraction.parent / f".{extraction.name}_inuse"
    try:
        return max(marker.stat().st_mtime, extraction.stat().st_mtime)
    except OSError:
        return extraction.stat().st_mtime


def remove_old_extractions(extraction: Path) -> list[Path]:
    """Delete the extractions earlier builds of this nc left beside ours (about 40 MB each)
    and nobody used for an hour, except those a running nc uses: locked by it, its
    libraries mapped, or its zipapp running. Returns them."""
    root, prefix = extraction.parent, extraction.name.rsplit("_", 1)[0] + "_"
    now = time.time()
    candidates = []
    for other in root.glob(prefix + "*"):
        with contextlib.suppress(OSError):
            old = now - last_used(other) > OLD_EXTRACTION_AGE_S
            if other != extraction and other.is_dir() and not other.name.endswith((".tmp", ".removing")) and old:
                candidates.append(other)
    if not candidates:
        return []
    import shutil

    in_use = extractions_in_use(prefix[:-1])
    removed = []
    for other in candidates:
        marker = root / f".{other.name}_inuse"
        try:
            fd = os.open(marker, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while an nc of that build runs
            if f"/{other.name}/" in in_use:
                continue
            # Out of the way in one step (an nc starting from now on extracts it again), then
            # look once more for one that started since the first look, before deleting.
            parked = other.with_name(f"{other.name}.{os.getpid()}.removing")
            other.rename(parked)
            now_used = extractions_in_use(prefix[:-1])  # maps name the moved files by their new path
            if f"/{other.name}/" in now_used or f"/{parked.name}/" in now_used:
                with contextlib.suppress(OSError):
                    parked.rename(other)  # unless it was extracted again meanwhile
                if parked.exists():
                    shutil.rmtree(parked, ignore_errors=True)
                continue
            shutil.rmtree(parked, ignore_errors=True)
            for leftover in (root / f".{other.name}_lock", marker):
                leftover.unlink(missing_ok=True)
            removed.append(other)
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


def tidy_shiv_root() -> None:
    """Mark our extraction in use and remove the ones older builds left."""
    extraction = shiv_extraction()
    if extraction is None or mark_extraction_in_use(extraction) is None:
        return
    with contextlib.suppress(OSError):
        remove_old_extractions(extraction)


# ============================================================================
# 4. Store
#    One contract of atomic operations (Datastore) and the rules it keeps
#    (token lives, expiry, single use, the mint rate), two implementations:
#    sqlite (the design document's tables and triggers verbatim, then
#    versioned migrations) and etcd v3 (one Txn per operation). Every SQL
#    statement and etcd key of nc lives in this section.
# ============================================================================


DESIGN_SCHEMA = """
create table if not exists "network_mgr" (
		"id" integer primary key autoincrement,
		"token" text not null unique,
		"state" integer not null,
		"bind_ip" text not null default "",
		"create_time" timestamp default (datetime(CURRENT_TIMESTAMP, 'localtime')),
    "update_time"    timestamp default (datetime(CURRENT_TIMESTAMP, 'localtime'))
);

create table if not exists "token_mgr" (
		"id" integer primary key autoincrement,
		"token" text not null unique,
		"expire_time" timestamp default (datetime(CURRENT_TIMESTAMP, 'localtime')),
		"create_time" timestamp default (datetime(CURRENT_TIMESTAMP, 'localtime')),
    "update_time"    timestamp default (datetime(CURRENT_TIMESTAMP, 'localtime'))
);

CREATE TRIGGER if not exists update_time_trigger UPDATE OF id,token,state,bind_ip,create_time ON network_mgr
BEGIN
	UPDATE network_mgr SET update_time=datetime(CURRENT_TIMESTAMP, 'localtime') WHERE id=OLD.id;
END;

CREATE TRIGGER if not exists update_time_trigger2 UPDATE OF id,token,create_time,expire_time ON token_mgr
BEGIN
  UPDATE token_mgr SET update_time=datetime(CURRENT_TIMESTAMP, 'localtime') WHERE id=OLD.id;
END;
"""


# Migration N brings PRAGMA user_version from N-1 to N. Append only.
MIGRATIONS: list[list[str]] = [
    [  # 1: single-use bootstrap tokens; one address per node; LRU lookups by update_time
        "ALTER TABLE token_mgr ADD COLUMN single_use integer not null default 0",
        "ALTER TABLE token_mgr ADD COLUMN uses integer not null default 0",
        "CREATE UNIQUE INDEX IF NOT EXISTS network_mgr_bind_ip ON network_mgr(bind_ip) WHERE bind_ip != ''",
        "CREATE INDEX IF NOT EXISTS network_mgr_idle ON network_mgr(state, update_time, id)",
    ],
    [  # 2: several overlay networks; a node and a bootstrap token belong to one (existing rows: default)
        """CREATE TABLE IF NOT EXISTS "nc_network" (
            "id" integer primary key autoincrement,
            "name" text not null unique,
            "cidr" text not null,
            "interconnection" integer not null default 1,
            "net_token" text not null unique,
            "from_config" integer not null default 0,
            "create_time" timestamp default (datetime(CURRENT_TIMESTAMP, 'localtime'))
        )""",
        "ALTER TABLE network_mgr ADD COLUMN network text not null default 'default'",
        "ALTER TABLE token_mgr ADD COLUMN network text not null default 'default'",
        "DROP INDEX IF EXISTS network_mgr_bind_ip",
        "CREATE UNIQUE INDEX network_mgr_bind_ip ON network_mgr(network, bind_ip) WHERE bind_ip != ''",
    ],
    [  # 3: identities by certificate serial; who minted each token and node; the mint log for rate limits
        """CREATE TABLE IF NOT EXISTS "nc_cert" (
            "serial" text primary key,
            "node_token" text not null,
            "kind" text not null,
            "not_after" text not null,
            "revoked" integer not null default 0,
            "create_time" timestamp default (datetime(CURRENT_TIMESTAMP, 'localtime'))
        )""",
        "CREATE INDEX IF NOT EXISTS nc_cert_node ON nc_cert(node_token)",
        # Nodes that joined before serials were recorded: their certificates are accepted by
        # name until they renew (the row is then deleted) or the node is removed.
        'CREATE TABLE IF NOT EXISTS "nc_legacy_node" ("token" text primary key)',
        f"INSERT OR IGNORE INTO nc_legacy_node (token) SELECT token FROM network_mgr WHERE token != '{RESERVED_NODE_TOKEN}'",
        "ALTER TABLE token_mgr ADD COLUMN minted_by text not null default ''",
        "ALTER TABLE network_mgr ADD COLUMN minted_by text not null default ''",
        """CREATE TABLE IF NOT EXISTS "nc_mint" (
            "id" integer primary key autoincrement,
            "minted_by" text not null,
            "create_time" timestamp default (datetime(CURRENT_TIMESTAMP, 'localtime'))
        )""",
        "CREATE INDEX IF NOT EXISTS nc_mint_by ON nc_mint(minted_by, create_time)",
    ],
    [  # 4: what a node's last session showed, for `nc adm node list` (update_time's trigger ignores these)
        "ALTER TABLE network_mgr ADD COLUMN host_name text not null default ''",
        "ALTER TABLE network_mgr ADD COLUMN endpoint text not null default ''",
        "ALTER TABLE network_mgr ADD COLUMN transport text not null default ''",
        "ALTER TABLE network_mgr ADD COLUMN node_version text not null default ''",
        "ALTER TABLE network_mgr ADD COLUMN last_seen text not null default ''",
    ],
    [  # 5: a node's human name, unique within its network (existing nodes take theirs at their next hello)
        "ALTER TABLE network_mgr ADD COLUMN name text not null default ''",
        "CREATE UNIQUE INDEX IF NOT EXISTS network_mgr_name ON network_mgr(network, name) WHERE name != ''",
    ],
    [  # 6: a join counts once its node is first heard from; until then join_token names its token
        # (existing nodes joined under an older build: '' = confirmed)
        "ALTER TABLE network_mgr ADD COLUMN join_token text not null default ''",
    ],
]


NOW_SQL = "datetime(CURRENT_TIMESTAMP, 'localtime')"


SESSION_FIELDS = ("host_name", "endpoint", "transport", "node_version", "last_seen")  # NodeRow's last, in order


@dataclasses.dataclass(frozen=True)
class NodeRow:
    token: str
    state: int
    bind_ip: str
    create_time: str
    update_time: str
    network: str = DEFAULT_NETWORK
    minted_by: str = ""  # node-token of the node that minted its bootstrap token; empty: the admin
    host_name: str = ""  # what its last session's hello said
    endpoint: str = ""  # underlay address:port of its last session
    transport: str = ""
    node_version: str = ""
    last_seen: str = ""  # local time its last session started or ended; empty: never connected
    name: str = ""  # its human name, unique within its network; empty: not named yet
    pending: bool = False  # joined, but never heard from since: its credentials may not have arrived


NODE_COLUMNS = (
    "token, state, bind_ip, create_time, update_time, network, minted_by,"
    " host_name, endpoint, transport, node_version, last_seen, name, join_token != ''"
)

# A join whose node never makes an authenticated call (its reply lost, or its host gone
# before it connected) is forgotten after this long; it never held an address or a use.
UNCONFIRMED_JOIN_TTL_S = 24 * 3600


@dataclasses.dataclass(frozen=True)
class NetworkRow:
    id: int
    name: str
    cidr: str
    interconnection: bool
    net_token: str
    from_config: bool


@dataclasses.dataclass(frozen=True)
class BootstrapTokenRow:
    token: str
    expire_time: str
    create_time: str
    single_use: bool
    uses: int
    network: str = DEFAULT_NETWORK
    minted_by: str = ""


TOKEN_COLUMNS = "token, expire_time, create_time, single_use, uses, network, minted_by"


@dataclasses.dataclass(frozen=True)
class CertRecord:
    """An issued client certificate, as the store remembers it to recognize its holder."""

    serial: int
    kind: str  # "grpc" or "network": which CA issued it
    not_after: str  # UTC, ISO 8601

    @property
    def key(self) -> str:
        return serial_key(self.serial)


def serial_key(serial: int) -> str:
    return format(serial, "x")


class Datastore(Protocol):
    """What nc keeps (nodes and their addresses, bootstrap tokens, networks, certificate
    records), as every layer above this section sees it: Store (sqlite) and EtcdStore.

    Every operation is atomic: it takes effect whole or not at all, also against other
    handles on the same data (another connection to the sqlite file, another replica on
    etcd). Besides what its line says, any operation may raise StoreError (StoreFull when
    the disk refuses a write); a refusal the user can act on is BadRequest. Times are
    local "YYYY-MM-DD HH:MM:SS" strings, as the design document's columns hold them."""

    @property
    def shared(self) -> bool:
        """Whether other processes (replicas) write this store too, so a cache over it may be behind."""
        ...

    @property
    def leads(self) -> bool:
        """Whether leader-only work (the token sweep, the reserved node) is this handle's:
        true from opening until follow(), and again after lead()."""
        ...

    def lead(self, fence: tuple[bytes, int]) -> None:
        """Leader-only writes commit from now on, and only while fence (the campaign key and
        its create revision) is the one in the store; afterwards they raise NotLeader."""

    def follow(self) -> None:
        """Leader-only writes (ensure_reserved_node, delete_expired_bootstrap_tokens) raise
        NotLeader from now on, until lead()."""

    def close(self) -> None:
        """Release the connection; the handle is unusable afterwards."""

    # -- bootstrap tokens

    def add_bootstrap_token(
        self,
        token: str,
        life_minutes: int,
        single_use: bool,
        network: str = DEFAULT_NETWORK,
        minted_by: str = "",
        hourly_limit: int | None = None,
    ) -> str:
        """Add a token for joining network (a negative life: never expires); returns its
        expire_time. A node's mint (minted_by) is counted in the same step against
        hourly_limit (refuse_over_mint_rate). BadRequest: a life over ten years, an unknown
        network, the limit reached; Conflict: the token exists."""
        ...

    def bootstrap_tokens_with_id(self, token_id: str) -> list[BootstrapTokenRow]:
        """The tokens whose public part (before the dot) is token_id, oldest first."""
        ...

    def list_bootstrap_tokens(self) -> list[BootstrapTokenRow]:
        """Every bootstrap token, oldest first."""
        ...

    def delete_bootstrap_token(self, token: str) -> bool:
        """Delete a token; False when there was none."""
        ...

    def delete_expired_bootstrap_tokens(self) -> int:
        """Leader-only. Delete expired tokens and mint records past the rate window; returns
        how many tokens went."""
        ...

    def admit_node(self, bootstrap_token: str, node_token: str, certs: tuple[CertRecord, ...] = ()) -> str:
        """Re-check the token (refuse_unusable_token), add the node pending (idle, unbound,
        its token's use not yet counted) to the token's network (returned) and record its
        certificates, in one step. A single-use token's earlier pending node is purged:
        a retried join supersedes one whose reply was lost, so at most one can confirm.
        BadRequest: the token is unknown, expired or used up; Conflict: the node-token exists."""
        ...

    def confirm_node(self, token: str) -> bool:
        """The node was heard from (its first authenticated call): count its token's use
        and make it a node like any other, in one step. True for a node already confirmed;
        False when it is not registered (or was superseded, and is purged)."""
        ...

    def reclaim_unconfirmed_nodes(self, older_than_s: int) -> list[str]:
        """Leader-only. Purge the pending nodes that joined longer than older_than_s ago; their node-tokens."""
        ...

    # -- certificates

    def record_certs(self, node_token: str, certs: tuple[CertRecord, ...]) -> None:
        """Remember issued certificates as the node's; one already recorded is left as it is."""

    def record_renewal(self, node_token: str, certs: tuple[CertRecord, ...]) -> int:
        """record_certs for a renewal, having first revoked, of each kind, every live
        certificate but the oldest (the one the node uses: using a newer one revokes the
        older): renewals it never used. So a node holds at most two live certificates per
        kind. Returns how many were revoked."""
        ...

    def cert_owner(self, serial: int) -> tuple[str, bool] | None:
        """(node-token, revoked) of a recorded certificate; None for one never recorded."""
        ...

    def is_legacy_node(self, token: str) -> bool:
        """Whether the node is still accepted by certificate name (it joined before serials were kept)."""
        ...

    def has_older_live_certs(self, node_token: str, kind: str, serial: int) -> bool:
        """Whether certificates of this kind issued before this one (or the legacy acceptance) still count."""
        ...

    def switch_to_cert(self, node_token: str, kind: str, serial: int) -> int:
        """Revoke the node's older live certificates of this kind (and its legacy acceptance,
        once renewed ones of both kinds are in use); returns how many were revoked."""
        ...

    def prune_expired_certs(self, now_iso: str) -> int:
        """Forget certificate records that expired before now_iso (UTC, ISO 8601); returns how many."""
        ...

    # -- nodes and their addresses

    def node(self, token: str) -> NodeRow | None:
        """The node, or None when it is not registered."""
        ...

    def nodes(self) -> list[NodeRow]:
        """Every node (the reserved one too), in joining order."""
        ...

    def node_token_exists(self, token: str) -> bool:
        """Whether a node has this node-token."""
        ...

    def node_tokens_in(self, network: str) -> list[str]:
        """The node-tokens of a network, in joining order."""
        ...

    def bindings_oldest_first(self, network: str = DEFAULT_NETWORK) -> list[NodeRow]:
        """The network's nodes that have an address, least recently updated first (the LRU order)."""
        ...

    def bind(self, token: str, ip: str, evict: str | None, state: int | None = None) -> None:
        """Bind ip ("": none) to the node and set its state, first purging the evicted node
        whole. BadRequest: the node is not registered; AddressTaken: another node holds ip."""

    def set_state(self, token: str, state: int) -> bool:
        """Set a node's connection state; False when it is not registered."""
        ...

    def reset_states(self, reserved_state: int) -> int:
        """Every node idle, the reserved one reserved_state; returns how many nodes changed."""
        ...

    def record_session(self, token: str, host_name: str, endpoint: str, transport: str, version: str) -> None:
        """What the node's session showed and when (all empty: the session ended); no node, no change."""

    def idle_nodes(self, idle_for_s: int) -> list[str]:
        """Nodes (not the reserved one) not connected for longer than idle_for_s, in joining order."""
        ...

    def claim_node_name(self, token: str, wanted: str) -> str:
        """The node's name: the one it has, else wanted made unique in its network
        (free_node_name), kept from now on; "" when the node is not registered or wanted is ""."""
        ...

    def rename_node(self, token: str, name: str) -> None:
        """Give the node this name (check_node_name first). BadRequest: the node is not
        registered, or another node of its network has the name."""

    def ensure_reserved_node(self, server_ip: str) -> bool:
        """Leader-only. Bind the reserved node-token to server_ip, taking it from any node
        that holds it; True when something changed."""
        ...

    def delete_node(self, token: str) -> bool:
        """Unregister: the node, its address, certificates and unused minted tokens; False when absent."""
        ...

    # -- networks

    def networks(self) -> list[NetworkRow]:
        """Every overlay network (the default one too, once a server started), by id."""
        ...

    def put_config_network(self, spec: NetworkSpec, net_token: str) -> None:
        """Create (with net_token) or update a network server.yml defines, marked as from the config."""

    def add_network(self, spec: NetworkSpec, net_token: str) -> None:
        """Create a network at run time. BadRequest: the name exists."""

    def forget_config_network(self, name: str) -> None:
        """A network gone from server.yml stays, as one created at run time."""

    def delete_network(self, name: str) -> list[str]:
        """Delete a network with its nodes (purged whole) and tokens; returns the node-tokens
        removed. BadRequest: no such network."""
        ...


# -- the rules both stores keep -------------------------------------------------------
#
# Each store reads and writes in its own way, but what a token's life, expiry and
# single use mean, and how many tokens a node may mint, is decided here, once.

MINT_WINDOW_S = 3600  # server.nodeMintRate counts a node's mints over the last hour


def local_time(offset_s: float = 0.0) -> str:
    """Now (plus offset_s) as the stores write times: sqlite's datetime(CURRENT_TIMESTAMP, 'localtime')."""
    return (datetime.datetime.now() + datetime.timedelta(seconds=offset_s)).strftime("%Y-%m-%d %H:%M:%S")


def check_token_life(life_minutes: int) -> None:
    """The bound on every token life, whoever asks: at most ten years (a negative life never
    expires). Both stores and the control plane refuse with this one sentence."""
    if life_minutes > MAX_ADMIN_TOKEN_LIFE_MIN:
        raise BadRequest(f"a token life of {life_minutes} minutes is over ten years; use a negative life for never")


def requested_token_life(life_minutes: int, by_node: bool, node_cap: int) -> int:
    """The life a mint asked for, as the control plane grants it: 0 is refused (the original
    read it as "the default"); a node's is refused when never-expiring or over a year and
    capped at node_cap (server.nodeTokenMaxLife); the admin's is bounded by check_token_life."""
    if life_minutes == 0:
        raise BadRequest("a token life of 0 minutes is not allowed; ask for minutes > 0, or a negative life for never")
    if not by_node:
        check_token_life(life_minutes)
        return life_minutes
    if life_minutes < 0:
        raise BadRequest(f"a node may not mint a never-expiring token; ask for at most {node_cap} minutes")
    if life_minutes > MAX_NODE_TOKEN_LIFE_MIN:
        raise BadRequest(f"a token life of {life_minutes} minutes is over a year; ask for at most {node_cap} minutes")
    return min(life_minutes, node_cap)


def token_expire_time(life_minutes: int) -> str:
    """When a token minted now with this life expires: NEVER_EXPIRES for a negative life."""
    check_token_life(life_minutes)
    return NEVER_EXPIRES if life_minutes < 0 else local_time(int(life_minutes) * 60)


def rfc3339(local: str) -> str:
    """A time as the stores write it (local "YYYY-MM-DD HH:MM:SS") as RFC 3339 with this
    host's offset; one that already is, or that is no time ("", "never"), as it is."""
    try:
        moment = datetime.datetime.strptime(local, "%Y-%m-%d %H:%M:%S")
    except ValueError:
        return local
    return moment.astimezone().isoformat(timespec="seconds")


def token_state(expire_time: str, single_use: bool, uses: int) -> str:
    """What `nc adm token list` shows of a bootstrap token: valid, used (spent) or expired."""
    if token_expired(expire_time):
        return "expired"
    return "used" if single_use and uses > 0 else "valid"


def token_expired(expire_time: str, now: str | None = None) -> bool:
    """Whether a token expiring at expire_time is expired now (at its expire_time already)."""
    return expire_time <= (now or local_time())


def refuse_unusable_token(expire_time: str, single_use: bool, uses: int) -> None:
    """BadRequest when a bootstrap token may not admit a node now: expired, or single-use and used."""
    if token_expired(expire_time):
        raise BadRequest("bootstrap token has expired; ask the administrator for a new one")
    if single_use and uses > 0:
        raise BadRequest("bootstrap token was single-use and has already been used")


def refuse_taken_name(name: str, holder: str | None, token: str) -> None:
    if holder is not None and holder != token:
        raise BadRequest(f"another node of its network ({holder}) is named {name!r}; rename that one first")


def refuse_over_mint_rate(minted: int, hourly_limit: int | None) -> None:
    """BadRequest when a node that minted `minted` tokens in the last MINT_WINDOW_S may mint no more."""
    if hourly_limit is not None and minted >= hourly_limit:
        raise BadRequest(
            f"this node already minted {minted} bootstrap token(s) in the last hour, its limit "
            "(server.nodeMintRate); ask the administrator"
        )


def unique_conflict(what: str) -> Conflict:
    """The error both stores raise when a write would make a unique key twice."""
    return Conflict(f"this {what} exists already (written meanwhile by another request); retry")


# What a UNIQUE constraint of the schema protects, as a Conflict names it.
SQLITE_UNIQUE_KEYS = {
    "token_mgr.token": "bootstrap token",
    "network_mgr.token": "node-token",
    "network_mgr.network, network_mgr.bind_ip": "address",
    "network_mgr.network, network_mgr.name": "node name",
    "nc_network.name": "network name",
    "nc_network.net_token": "net-token",
}


def sqlite_conflict(e: sqlite3.IntegrityError) -> Conflict | None:
    """The Conflict a UNIQUE violation is; None for any other integrity error (a bug, not a race)."""
    text = str(e)
    if not text.startswith("UNIQUE constraint failed: "):
        return None
    columns = text.partition(": ")[2]
    return unique_conflict(SQLITE_UNIQUE_KEYS.get(columns, columns))


class Store:
    """The Datastore in one sqlite file: one connection shared by the server's threads,
    serialized by a lock. A single server is its only writer, so it leads from the start.

    WAL lets `sqlite3` readers in and survives a killed process; synchronous=FULL
    makes a committed join survive power loss too.
    """

    shared = False

    def __init__(self, path: str) -> None:
        self.path = path
        Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(OSError):  # it holds live bootstrap tokens: owner only
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            os.chmod(path, 0o600)
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
            self._db.execute("PRAGMA busy_timeout = 10000")
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.execute("PRAGMA foreign_keys = ON")
            damage = self._db.execute("PRAGMA quick_check").fetchone()[0]
        except sqlite3.Error as e:
            raise store_error(path, e) from None
        if damage != "ok":  # found now, not by the first join that reads the broken page
            raise store_error(path, sqlite3.DatabaseError(damage))
        self._lock = threading.RLock()
        self._leads = True
        self.migrate()

    @property
    def leads(self) -> bool:
        return self._leads

    def lead(self, fence: tuple[bytes, int]) -> None:
        self._leads = True  # nobody else writes this file: no fence to check

    def follow(self) -> None:
        self._leads = False

    def _leader_only(self) -> None:
        if not self._leads:
            raise NotLeader("this server is not the leader; a leader-only write was dropped")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def transaction(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back whole on any error.

        durable=False skips the fsync: for connection states, which are reset at
        every start anyway and change on every connect and disconnect."""
        with self._lock:
            try:
                if not durable:
                    self._db.execute("PRAGMA synchronous = NORMAL")
                try:
                    self._db.execute("BEGIN IMMEDIATE")
                    try:
                        yield self._db
                    except BaseException:
                        if self._db.in_transaction:  # sqlite may have rolled back already (a full disk)
                            self._db.execute("ROLLBACK")
                        raise
                    self._db.execute("COMMIT")
                finally:
                    if not durable:
                        self._db.execute("PRAGMA synchronous = FULL")
            except sqlite3.DatabaseError as e:
                raise self._translate(e) from None

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.DatabaseError as e:
                raise self._translate(e) from None

    def _translate(self, e: sqlite3.DatabaseError) -> Exception:
        """The store's error for a driver's: a UNIQUE violation is a Conflict (the caller's
        business, as on etcd), a fault of the file a StoreError naming it; anything else
        (a wrong statement, another integrity error) is a bug and stays as it is."""
        if isinstance(e, sqlite3.IntegrityError):
            return sqlite_conflict(e) or e
        if isinstance(e, sqlite3.ProgrammingError):
            return e
        return store_error(self.path, e)

    # -- schema ---------------------------------------------------------------

    def migrate(self) -> None:
        with self.transaction() as db:
            for statement in split_sql(DESIGN_SCHEMA):
                db.execute(statement)
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise StoreError(
                    f"{self.path}: schema version {version} is newer than this nc knows ({len(MIGRATIONS)}); "
                    "run a newer nc"
                )
            for number in range(version + 1, len(MIGRATIONS) + 1):
                for statement in MIGRATIONS[number - 1]:
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {number}")
                log.info("database %s migrated to schema version %d", self.path, number)

    def schema_version(self) -> int:
        return self._query("PRAGMA user_version")[0][0]

    # -- bootstrap tokens -------------------------------------------------------

    def add_bootstrap_token(
        self,
        token: str,
        life_minutes: int,
        single_use: bool,
        network: str = DEFAULT_NETWORK,
        minted_by: str = "",
        hourly_limit: int | None = None,
    ) -> str:
        """A node's mint (minted_by) is logged and counted in the same transaction,
        so concurrent calls cannot pass hourly_limit together."""
        expire = token_expire_time(life_minutes)
        with self.transaction() as db:
            if minted_by:
                minted = db.execute(
                    "SELECT count(*) FROM nc_mint WHERE minted_by = ? AND create_time > ?",
                    (minted_by, local_time(-MINT_WINDOW_S)),
                ).fetchone()[0]
                refuse_over_mint_rate(minted, hourly_limit)
                db.execute("INSERT INTO nc_mint (minted_by) VALUES (?)", (minted_by,))
            if (
                network != DEFAULT_NETWORK
                and not db.execute("SELECT 1 FROM nc_network WHERE name = ?", (network,)).fetchone()
            ):
                raise BadRequest(f"no network named {network!r}")
            db.execute(
                "INSERT INTO token_mgr (token, expire_time, single_use, network, minted_by) VALUES (?, ?, ?, ?, ?)",
                (token, expire, int(single_use), network, minted_by),
            )
        return expire

    def bootstrap_tokens_with_id(self, token_id: str) -> list[BootstrapTokenRow]:
        """Rows whose token starts with '<id>.' (lookup by the public part only)."""
        rows = self._query(
            f"SELECT {TOKEN_COLUMNS} FROM token_mgr WHERE substr(token, 1, ?) = ?",
            (len(token_id) + 1, token_id + "."),
        )
        return [BootstrapTokenRow(r[0], r[1], r[2], bool(r[3]), r[4], r[5], r[6]) for r in rows]

    def list_bootstrap_tokens(self) -> list[BootstrapTokenRow]:
        rows = self._query(f"SELECT {TOKEN_COLUMNS} FROM token_mgr ORDER BY id")
        return [BootstrapTokenRow(r[0], r[1], r[2], bool(r[3]), r[4], r[5], r[6]) for r in rows]

    def delete_bootstrap_token(self, token: str) -> bool:
        with self.transaction() as db:
            return db.execute("DELETE FROM token_mgr WHERE token = ?", (token,)).rowcount > 0

    def delete_expired_bootstrap_tokens(self) -> int:
        """The periodic sweep: expired tokens, and mint-log entries past the rate window."""
        self._leader_only()
        with self.transaction() as db:
            db.execute("DELETE FROM nc_mint WHERE create_time <= ?", (local_time(-MINT_WINDOW_S),))
            return db.execute("DELETE FROM token_mgr WHERE expire_time <= ?", (local_time(),)).rowcount

    def admit_node(self, bootstrap_token: str, node_token: str, certs: tuple[CertRecord, ...] = ()) -> str:
        """Atomically re-check the bootstrap token, count its use, add the node to the
        token's network (returned) and record the serials of its certificates.

        Raises BadRequest when the token stopped being valid since it was checked.
        """
        with self.transaction() as db:
            row = db.execute(
                "SELECT single_use, uses, expire_time, network, minted_by FROM token_mgr WHERE token = ?",
                (bootstrap_token,),
            ).fetchone()
            if row is None:
                raise BadRequest("bootstrap token is unknown or was deleted")
            single_use, uses, expire_time, network, minted_by = row
            refuse_unusable_token(expire_time, bool(single_use), uses)
            if single_use:
                superseded = db.execute("SELECT token FROM network_mgr WHERE join_token = ?", (bootstrap_token,))
                for (stale,) in superseded.fetchall():
                    self._purge_node(db, stale)
            db.execute(
                "INSERT INTO network_mgr (token, state, bind_ip, network, minted_by, join_token) VALUES (?, ?, '', ?, ?, ?)",
                (node_token, STATE_IDLE, network, minted_by, bootstrap_token),
            )
            self._record_certs(db, node_token, certs)
        return network

    def confirm_node(self, token: str) -> bool:
        with self.transaction() as db:
            row = db.execute("SELECT join_token FROM network_mgr WHERE token = ?", (token,)).fetchone()
            if row is None or not row[0]:
                return row is not None
            used = db.execute("SELECT single_use, uses FROM token_mgr WHERE token = ?", (row[0],)).fetchone()
            if used is not None and used[0] and used[1] > 0:  # admit_node supersedes: a safeguard
                self._purge_node(db, token)
                return False
            db.execute("UPDATE token_mgr SET uses = uses + 1 WHERE token = ?", (row[0],))
            db.execute("UPDATE network_mgr SET join_token = '' WHERE token = ?", (token,))
            return True

    def reclaim_unconfirmed_nodes(self, older_than_s: int) -> list[str]:
        self._leader_only()
        with self.transaction() as db:
            rows = db.execute(
                "SELECT token FROM network_mgr WHERE join_token != '' AND create_time <= ? ORDER BY id",
                (local_time(-older_than_s),),
            ).fetchall()
            for (token,) in rows:
                self._purge_node(db, token)
            return [token for (token,) in rows]

    # -- certificates -----------------------------------------------------------

    def record_certs(self, node_token: str, certs: tuple[CertRecord, ...]) -> None:
        with self.transaction() as db:
            self._record_certs(db, node_token, certs)

    def record_renewal(self, node_token: str, certs: tuple[CertRecord, ...]) -> int:
        with self.transaction() as db:
            revoked = 0
            for kind in sorted({cert.kind for cert in certs}):
                revoked += db.execute(
                    "UPDATE nc_cert SET revoked = 1 WHERE node_token = ? AND kind = ? AND revoked = 0 AND rowid > "
                    "(SELECT min(rowid) FROM nc_cert WHERE node_token = ? AND kind = ? AND revoked = 0)",
                    (node_token, kind, node_token, kind),
                ).rowcount
            self._record_certs(db, node_token, certs)
            return revoked

    @staticmethod
    def _record_certs(db: sqlite3.Connection, node_token: str, certs: tuple[CertRecord, ...]) -> None:
        for cert in certs:
            db.execute(
                "INSERT OR IGNORE INTO nc_cert (serial, node_token, kind, not_after) VALUES (?, ?, ?, ?)",
                (cert.key, node_token, cert.kind, cert.not_after),
            )

    def cert_owner(self, serial: int) -> tuple[str, bool] | None:
        """(node-token, revoked) of a recorded certificate; None for one never recorded."""
        rows = self._query("SELECT node_token, revoked FROM nc_cert WHERE serial = ?", (serial_key(serial),))
        return (rows[0][0], bool(rows[0][1])) if rows else None

    def is_legacy_node(self, token: str) -> bool:
        return bool(self._query("SELECT 1 FROM nc_legacy_node WHERE token = ?", (token,)))

    OLDER_LIVE_CERTS = (
        "node_token = ? AND kind = ? AND revoked = 0 AND rowid < (SELECT rowid FROM nc_cert WHERE serial = ?)"
    )

    def has_older_live_certs(self, node_token: str, kind: str, serial: int) -> bool:
        """Whether certificates issued before this one are still live (a renewal not yet switched to)."""
        return bool(
            self._query(f"SELECT 1 FROM nc_cert WHERE {self.OLDER_LIVE_CERTS}", (node_token, kind, serial_key(serial)))
        ) or self.is_legacy_node(node_token)

    def switch_to_cert(self, node_token: str, kind: str, serial: int) -> int:
        """The node now uses this certificate: revoke the ones of the same kind issued
        before it (and its by-name legacy acceptance, once it uses renewed ones of
        both kinds). Returns how many were revoked."""
        with self.transaction() as db:
            revoked = db.execute(
                f"UPDATE nc_cert SET revoked = 1 WHERE {self.OLDER_LIVE_CERTS}", (node_token, kind, serial_key(serial))
            ).rowcount
            kinds = db.execute(
                "SELECT count(DISTINCT kind) FROM nc_cert WHERE node_token = ? AND revoked = 0", (node_token,)
            ).fetchone()[0]
            if kinds == 2:
                db.execute("DELETE FROM nc_legacy_node WHERE token = ?", (node_token,))
            return revoked

    def prune_expired_certs(self, now_iso: str) -> int:
        """Records of certificates past their expiry: TLS refuses those already."""
        with self.transaction() as db:
            return db.execute("DELETE FROM nc_cert WHERE not_after < ?", (now_iso,)).rowcount

    @staticmethod
    def _purge_node(db: sqlite3.Connection, token: str) -> bool:
        """Remove a node and everything that speaks for it: its certificates (revoked
        by being forgotten) and the bootstrap tokens it minted that nobody used yet."""
        db.execute("DELETE FROM nc_cert WHERE node_token = ?", (token,))
        db.execute("DELETE FROM nc_legacy_node WHERE token = ?", (token,))
        db.execute("DELETE FROM token_mgr WHERE minted_by = ? AND uses = 0", (token,))
        return db.execute("DELETE FROM network_mgr WHERE token = ?", (token,)).rowcount > 0

    # -- nodes ------------------------------------------------------------------

    def node(self, token: str) -> NodeRow | None:
        rows = self._query(f"SELECT {NODE_COLUMNS} FROM network_mgr WHERE token = ?", (token,))
        return NodeRow(*rows[0]) if rows else None

    def nodes(self) -> list[NodeRow]:
        rows = self._query(f"SELECT {NODE_COLUMNS} FROM network_mgr ORDER BY id")
        return [NodeRow(*r) for r in rows]

    def bindings_oldest_first(self, network: str = DEFAULT_NETWORK) -> list[NodeRow]:
        """Every node of the network with an address, least recently updated first (LRU order)."""
        rows = self._query(
            f"SELECT {NODE_COLUMNS} FROM network_mgr WHERE bind_ip != '' AND network = ? ORDER BY update_time, id",
            (network,),
        )
        return [NodeRow(*r) for r in rows]

    def node_tokens_in(self, network: str) -> list[str]:
        return [r[0] for r in self._query("SELECT token FROM network_mgr WHERE network = ? ORDER BY id", (network,))]

    # -- networks ---------------------------------------------------------------

    def networks(self) -> list[NetworkRow]:
        rows = self._query("SELECT id, name, cidr, interconnection, net_token, from_config FROM nc_network ORDER BY id")
        return [NetworkRow(r[0], r[1], r[2], bool(r[3]), r[4], bool(r[5])) for r in rows]

    def put_config_network(self, spec: NetworkSpec, net_token: str) -> None:
        """Create or update a network that server.yml defines (net_token is used only when creating)."""
        with self.transaction() as db:
            updated = db.execute(
                "UPDATE nc_network SET cidr = ?, interconnection = ?, from_config = 1 WHERE name = ?",
                (spec.cidr, int(spec.interconnection), spec.name),
            ).rowcount
            if not updated:
                db.execute(
                    "INSERT INTO nc_network (name, cidr, interconnection, net_token, from_config) VALUES (?, ?, ?, ?, 1)",
                    (spec.name, spec.cidr, int(spec.interconnection), net_token),
                )

    def add_network(self, spec: NetworkSpec, net_token: str) -> None:
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM nc_network WHERE name = ?", (spec.name,)).fetchone():
                raise BadRequest(f"a network named {spec.name!r} already exists")
            db.execute(
                "INSERT INTO nc_network (name, cidr, interconnection, net_token) VALUES (?, ?, ?, ?)",
                (spec.name, spec.cidr, int(spec.interconnection), net_token),
            )

    def forget_config_network(self, name: str) -> None:
        """A network no longer in server.yml stays, as one managed at run time."""
        with self.transaction() as db:
            db.execute("UPDATE nc_network SET from_config = 0 WHERE name = ?", (name,))

    def delete_network(self, name: str) -> list[str]:
        """Delete a network with its nodes and bootstrap tokens; returns the node-tokens removed."""
        with self.transaction() as db:
            tokens = [r[0] for r in db.execute("SELECT token FROM network_mgr WHERE network = ?", (name,))]
            for token in tokens:
                self._purge_node(db, token)
            db.execute("DELETE FROM token_mgr WHERE network = ?", (name,))
            if db.execute("DELETE FROM nc_network WHERE name = ?", (name,)).rowcount != 1:
                raise BadRequest(f"no network named {name!r}")
            return tokens

    def node_token_exists(self, token: str) -> bool:
        return bool(self._query("SELECT 1 FROM network_mgr WHERE token = ?", (token,)))

    def ensure_reserved_node(self, server_ip: str) -> bool:
        """Insert or re-bind the reserved node-token; True when the row changed."""
        self._leader_only()
        with self.transaction() as db:
            row = db.execute("SELECT bind_ip FROM network_mgr WHERE token = ?", (RESERVED_NODE_TOKEN,)).fetchone()
            if row is not None and row[0] == server_ip:
                return False
            # Whoever held the server's address under an older networkAddr gives it up.
            db.execute(
                "UPDATE network_mgr SET bind_ip = '' WHERE bind_ip = ? AND token != ? AND network = ?",
                (server_ip, RESERVED_NODE_TOKEN, DEFAULT_NETWORK),
            )
            if row is None:
                db.execute(
                    "INSERT INTO network_mgr (token, state, bind_ip) VALUES (?, ?, ?)",
                    (RESERVED_NODE_TOKEN, STATE_CONNECTED, server_ip),
                )
            else:
                db.execute("UPDATE network_mgr SET bind_ip = ? WHERE token = ?", (server_ip, RESERVED_NODE_TOKEN))
            return True

    def reset_states(self, reserved_state: int) -> int:
        """At start (and stop) nothing is connected until the data plane says so."""
        with self.transaction() as db:
            db.execute(
                "UPDATE network_mgr SET state = ? WHERE token = ? AND state != ?",
                (reserved_state, RESERVED_NODE_TOKEN, reserved_state),
            )
            return db.execute(
                "UPDATE network_mgr SET state = ? WHERE token != ? AND state != ?",
                (STATE_IDLE, RESERVED_NODE_TOKEN, STATE_IDLE),
            ).rowcount

    def set_state(self, token: str, state: int) -> bool:
        with self.transaction(durable=False) as db:
            return db.execute("UPDATE network_mgr SET state = ? WHERE token = ?", (state, token)).rowcount > 0

    def record_session(self, token: str, host_name: str, endpoint: str, transport: str, version: str) -> None:
        """What a node's session showed, and when: the start of a session, or (all empty) its end."""
        with self.transaction(durable=False) as db:
            if endpoint:
                db.execute(
                    f"UPDATE network_mgr SET host_name = ?, endpoint = ?, transport = ?, node_version = ?,"
                    f" last_seen = {NOW_SQL} WHERE token = ?",
                    (host_name, endpoint, transport, version, token),
                )
            else:
                db.execute(f"UPDATE network_mgr SET last_seen = {NOW_SQL} WHERE token = ?", (token,))

    def claim_node_name(self, token: str, wanted: str) -> str:
        named = self._query("SELECT name FROM network_mgr WHERE token = ? AND name != ''", (token,))
        if named:  # every session but a node's first: a read, no write lock
            return named[0][0]
        with self.transaction() as db:
            row = db.execute("SELECT name, network FROM network_mgr WHERE token = ?", (token,)).fetchone()
            if row is None or row[0] or not wanted:
                return row[0] if row else ""
            taken = {r[0] for r in db.execute("SELECT name FROM network_mgr WHERE network = ?", (row[1],))}
            name = free_node_name(wanted, taken)
            db.execute("UPDATE network_mgr SET name = ? WHERE token = ?", (name, token))
            return name

    def rename_node(self, token: str, name: str) -> None:
        check_node_name(name)
        with self.transaction() as db:
            row = db.execute("SELECT network FROM network_mgr WHERE token = ?", (token,)).fetchone()
            if row is None:
                raise BadRequest("node-token is not registered")
            holder = db.execute(
                "SELECT token FROM network_mgr WHERE network = ? AND name = ?", (row[0], name)
            ).fetchone()
            refuse_taken_name(name, holder[0] if holder else None, token)
            db.execute("UPDATE network_mgr SET name = ? WHERE token = ?", (name, token))

    def idle_nodes(self, idle_for_s: int) -> list[str]:
        """Nodes not connected for longer than idle_for_s (by their last state change)."""
        rows = self._query(
            f"SELECT token FROM network_mgr WHERE state != ? AND token != ?"
            f" AND update_time < datetime(CURRENT_TIMESTAMP, 'localtime', '-{int(idle_for_s)} seconds') ORDER BY id",
            (STATE_CONNECTED, RESERVED_NODE_TOKEN),
        )
        return [row[0] for row in rows]

    def bind(self, token: str, ip: str, evict: str | None, state: int | None = None) -> None:
        """Bind ip to token (and set its state) in one transaction, first removing the
        evicted node whole: its row, certificates and unused minted tokens."""
        try:
            with self.transaction() as db:
                if evict is not None:
                    self._purge_node(db, evict)
                if state is None:
                    changed = db.execute("UPDATE network_mgr SET bind_ip = ? WHERE token = ?", (ip, token)).rowcount
                else:
                    changed = db.execute(
                        "UPDATE network_mgr SET bind_ip = ?, state = ? WHERE token = ?", (ip, state, token)
                    ).rowcount
                if changed != 1:
                    raise BadRequest("node-token is not registered")
        except Conflict:  # the unique index on (network, bind_ip)
            raise AddressTaken(f"{ip} is bound to another node") from None

    def delete_node(self, token: str) -> bool:
        """Unregister: the node, its certificates and its unused minted tokens, at once."""
        with self.transaction() as db:
            return self._purge_node(db, token)

    def export_certs(self) -> list[tuple[str, str, str, str, bool]]:
        """(serial key, node-token, kind, not_after, revoked) of every recorded certificate, oldest first:
        what `nc adm datastore migrate` copies."""
        rows = self._query("SELECT serial, node_token, kind, not_after, revoked FROM nc_cert ORDER BY rowid")
        return [(r[0], r[1], r[2], r[3], bool(r[4])) for r in rows]

    def export_legacy_nodes(self) -> list[str]:
        return [r[0] for r in self._query("SELECT token FROM nc_legacy_node ORDER BY token")]

    def export_pending_joins(self) -> dict[str, str]:
        """node-token -> bootstrap token of every node not yet heard from."""
        return dict(self._query("SELECT token, join_token FROM network_mgr WHERE join_token != ''"))


SQLITE_READONLY, SQLITE_IOERR, SQLITE_CORRUPT, SQLITE_CANTOPEN, SQLITE_FULL, SQLITE_NOTADB = 8, 10, 11, 14, 13, 26


SQLITE_ERROR = 1  # sqlite's generic code


# sqlite's own words for those codes (sqlite3_errstr), which is all an error carries
# before Python 3.11 gave it sqlite_errorcode.
SQLITE_MESSAGE_CODES = {
    "attempt to write a readonly database": SQLITE_READONLY,
    "disk I/O error": SQLITE_IOERR,
    "database disk image is malformed": SQLITE_CORRUPT,
    "unable to open database file": SQLITE_CANTOPEN,
    "database or disk is full": SQLITE_FULL,
    "file is not a database": SQLITE_NOTADB,
}


def sqlite_code(e: sqlite3.Error) -> int:
    """sqlite's primary result code for e; 0 for an error nc made itself (a failed quick_check)."""
    code = getattr(e, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF
    if sys.version_info >= (3, 11):
        return 0
    # Before 3.11: a code by its message; sqlite raises a bare DatabaseError only for
    # the damaged kinds, so one with other words is nc's own, like a 0 above.
    return SQLITE_MESSAGE_CODES.get(str(e), 0 if type(e) is sqlite3.DatabaseError else SQLITE_ERROR)


def store_error(path: str, e: sqlite3.Error) -> StoreError:
    """One line for a failed store operation: which file, why, and how to recover."""
    code = sqlite_code(e)
    folder = Path(path).parent
    if code == SQLITE_FULL:
        return StoreFull(f"{path}: no space left on the device; free space in {folder}")
    if code in (SQLITE_READONLY, SQLITE_CANTOPEN):
        return StoreFull(f"{path}: cannot write the database ({e}); make {folder} writable (read-only file system?)")
    if code in (SQLITE_CORRUPT, SQLITE_NOTADB) or (code == 0 and isinstance(e, sqlite3.DatabaseError)):
        report = [line for line in str(e).splitlines() if not line.startswith("*** in database")]  # quick_check's
        return StoreError(
            f"{path}: the database is damaged ({one_line(chr(10).join(report), most=2)}); stop nc and recover it with "
            "`nc adm restore --from BACKUP`, or move it away to start with an empty one"
        )
    return StoreError(f"{path}: database error: {one_line(str(e))}")


def backup_database(db_path: str, out: Path) -> None:
    """A consistent copy of the store through sqlite's online backup, safe while the
    server runs; written beside `out` and renamed, so `out` is whole or absent."""
    if not Path(db_path).exists():
        raise StoreError(f"{db_path}: no database there; pass the server's --config")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        source = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10.0)
        try:
            target = sqlite3.connect(tmp)
            try:
                source.backup(target)
            finally:
                target.close()
        finally:
            source.close()
        os.chmod(tmp, 0o600)  # it holds live bootstrap tokens
        os.replace(tmp, out)
    except sqlite3.Error as e:
        tmp.unlink(missing_ok=True)
        raise store_error(db_path, e) from None
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise StoreError(os_error_line(e, "choose an --out in a writable directory with free space")) from None


def restore_database(source: Path, db_path: str) -> None:
    """Replace the store with a backup, checked first (whole, and an nc database); the
    server must be stopped (the caller holds its workDir lock)."""
    if not source.is_file():
        raise StoreError(f"{source}: no such backup file")
    tmp = Path(db_path).with_name(f".{Path(db_path).name}.restore.tmp")
    try:
        backup = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
        try:
            if backup.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("database disk image is malformed")
            tables = {row[0] for row in backup.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not {"network_mgr", "token_mgr"} <= tables:
                raise StoreError(f"{source}: not an nc database backup; pick a file `nc adm backup` wrote")
            target = sqlite3.connect(tmp)
            try:
                backup.backup(target)
            finally:
                target.close()
        finally:
            backup.close()
        os.chmod(tmp, 0o600)
        for stale in (f"{db_path}-wal", f"{db_path}-shm"):  # journal pages of the database being replaced
            Path(stale).unlink(missing_ok=True)
        os.replace(tmp, db_path)
    except sqlite3.Error as e:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"{source}: not a usable backup ({e}); pick a file `nc adm backup` wrote") from None
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise StoreError(os_error_line(e, "the database directory must be writable with free space")) from None


def split_sql(script: str) -> list[str]:
    """Split a script into statements, keeping trigger bodies (BEGIN ... END;) whole."""
    statements, current = [], []
    for line in script.splitlines():
        current.append(line)
        text = "\n".join(current).strip()
        if text.endswith(";") and sqlite3.complete_statement(text):
            statements.append(text)
            current = []
    if "\n".join(current).strip():
        statements.append("\n".join(current).strip())
    return statements


# -- what the clusterToken keys ---------------------------------------------------------
#
# Replicas share one secret, server.clusterToken. Every key nc derives from it comes from
# cluster_key (HKDF-SHA256) with its own label, so no two uses share a key: the CAs
# sealed in etcd (section 6), the MACs of the etcd store's records, the keyed hashes that
# name bootstrap tokens there, and the secrets a replica must show again (sealed).

CLUSTER_KEY_SALT = b"litekube-nc"


PKI_SEAL_LABEL = b"nc pki in etcd v1"


def cluster_key(cluster_token: str, label: bytes) -> bytes:
    """The 32-byte key for one use (label) of the clusterToken."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=CLUSTER_KEY_SALT, info=label).derive(cluster_token.encode())


def cluster_cipher(cluster_token: str, label: bytes = PKI_SEAL_LABEL) -> Any:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(cluster_key(cluster_token, label))


def seal(cluster_token: str, name: str, data: bytes) -> bytes:
    """data encrypted and authenticated (AES-GCM) for etcd, bound to name."""
    nonce = secrets.token_bytes(12)
    return nonce + cluster_cipher(cluster_token).encrypt(nonce, data, name.encode())


def unseal(cluster_token: str, name: str, blob: bytes) -> bytes:
    from cryptography.exceptions import InvalidTag

    try:
        return cluster_cipher(cluster_token).decrypt(blob[:12], blob[12:], name.encode())
    except (InvalidTag, ValueError):
        raise ConfigError(
            "server.clusterToken does not open the PKI the other replicas stored in etcd; "
            "set the same clusterToken as they have"
        ) from None


# -- etcd v3 -------------------------------------------------------------------
#
# The same operations on etcd, for replicas that share one store. Key layout
# (all under ETCD_PREFIX; values are JSON unless said otherwise):
#   node/<node-token>               a node: state, bind_ip, times, network, minted_by
#   addr/<network>/<ip>             the node-token bound to ip (created only if absent)
#   token/<id>/<keyed hash>         a bootstrap token <id>.<secret>, named by its HMAC
#   mint/<node-token>/<time>-<rand> one mint by a node, for its hourly limit
#   network/<name>                  an overlay network (its id from seq/network)
#   cert/<serial>                   an issued certificate; certs-of/<node-token>/<serial> indexes it
#   legacy/<node-token>             a node accepted by name until it renews
#   layout                          the layout version of this tree
# Every operation is one Txn: it reads at one revision, and its writes are guarded
# by compares on every key (and prefix) it read, so a concurrent change by another
# replica makes it start over instead of overwriting.
#
# Since layout 2, etcd holds no usable secret and accepts no forged record
# (EtcdRecords): every value above carries "mac", an HMAC-SHA256 under a clusterToken
# key over the key name and the value, so a value written by anyone without the
# clusterToken, or moved to another key, is refused (read as absent) and logged. A
# bootstrap token's key name is an HMAC of the token, and the secrets a replica shows
# again (the bootstrap token in the store's rows, a network's net-token in join strings)
# are sealed in the value. Node-tokens stay in key names: a node-token is a name, not a
# credential (a node proves itself with a certificate the sealed CA signed). Layout 1
# (plain token names, no MACs) is migrated in place by the first replica of this build
# (EtcdLayout).

ETCD_PREFIX = "/nc/"


ETCD_LAYOUT_VERSION = 2


ETCD_RPC_TIMEOUT_S = 5.0


ETCD_ATTEMPT_S = 2.0  # one attempt of a call; a silent member is then tried no longer, a slow one waited for


ETCD_TXN_ATTEMPTS = 100


ETCD_CHUNK = 100  # etcd refuses a Txn of more than 128 operations (or compares) by default


ETCD_NODES_PER_TXN = 10  # purging a node reads and writes about six keys


def prefix_end(prefix: bytes) -> bytes:
    """The range_end that makes a Range cover every key starting with prefix."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


@dataclasses.dataclass(frozen=True)
class EtcdTls:
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""


def etcd_target(endpoints: str) -> tuple[str, bool, str]:
    """(gRPC target, TLS?, TLS name) for a comma list of etcd URLs: one channel over
    every member's address, so gRPC moves to another member when one dies."""
    addresses, schemes, names = [], set(), set()
    for url in (u.strip() for u in endpoints.split(",") if u.strip()):
        scheme, sep, rest = url.partition("://")
        if not sep:
            scheme, rest = "http", url
        host, _, port = rest.rstrip("/").rpartition(":")
        host = host.strip("[]")
        if scheme not in ("http", "https") or not host or not port.isdigit():
            raise ConfigError(f"datastoreEndpoint: {url!r} is not an etcd URL; write it as http(s)://HOST:PORT")
        schemes.add(scheme)
        names.add(host)
        try:
            infos = socket.getaddrinfo(host, int(port), socket.AF_INET, socket.SOCK_STREAM)
        except OSError:
            raise ConfigError(f"datastoreEndpoint: cannot resolve {host!r}; fix the name or use an IP") from None
        addresses.extend(f"{info[4][0]}:{port}" for info in infos[:1])
    if not addresses:
        raise ConfigError("datastoreEndpoint is empty; list the etcd URLs, for example http://10.0.0.1:2379")
    if len(schemes) > 1:
        raise ConfigError("datastoreEndpoint mixes http and https; use one scheme for every member")
    return "ipv4:" + ",".join(addresses), schemes == {"https"}, sorted(names)[0]


class Etcd:
    """A connection to an etcd v3 cluster: the KV, Watch and Lease stubs and the
    error translation. Calls retry on another member while the cluster elects."""

    def __init__(self, endpoints: str, tls: EtcdTls | None = None, prefix: str = ETCD_PREFIX) -> None:
        import grpc

        from proto import etcd_pb2, etcd_pb2_grpc

        self.grpc, self.pb, self.endpoints, self.prefix = grpc, etcd_pb2, endpoints, prefix.encode()
        self.pb_grpc = etcd_pb2_grpc
        tls = tls or EtcdTls()
        target, secure, name = etcd_target(endpoints)
        options = [
            ("grpc.lb_policy_name", "round_robin"),
            ("grpc.enable_retries", 1),
            # A member cut off without a reset (a dead link) is noticed by pings, not left
            # READY forever; etcd accepts a ping every 5 s (--grpc-keepalive-min-time).
            ("grpc.keepalive_time_ms", 5000),
            ("grpc.keepalive_timeout_ms", 2000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]
        if secure:
            try:
                ca = Path(tls.ca_file).read_bytes() if tls.ca_file else None
                key = Path(tls.key_file).read_bytes() if tls.key_file else None
                cert = Path(tls.cert_file).read_bytes() if tls.cert_file else None
            except OSError as e:
                raise ConfigError(os_error_line(e, "fix datastoreCAFile/CertFile/KeyFile")) from None
            creds = grpc.ssl_channel_credentials(ca, key, cert)
            secure_options = [*options, ("grpc.ssl_target_name_override", name)]
            self.open_channel: Callable[[str], Any] = lambda t: grpc.secure_channel(t, creds, secure_options)
        else:
            self.open_channel = lambda t: grpc.insecure_channel(t, options)
        self.channel = self.open_channel(target)
        self.kv = etcd_pb2_grpc.KVStub(self.channel)
        self.watch_stub = etcd_pb2_grpc.WatchStub(self.channel)
        self.lease_stub = etcd_pb2_grpc.LeaseStub(self.channel)
        self.members = target.removeprefix("ipv4:").split(",")
        self._member_stubs: dict[str, tuple[Any, Any]] = {}  # a channel and stub per member, for member_state()

    def close(self) -> None:
        self.channel.close()
        for channel, _ in self._member_stubs.values():
            channel.close()

    def member_state(self, address: str, timeout: float) -> str:
        """One member's own word, asked directly (not round robin): "led" (it has a raft
        leader), "leaderless", "down" (its host refuses the connection: nothing listens)
        or "silent" (no answer: dead link, partition, overload; it may be in a quorum)."""
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=timeout).close()
        except ConnectionRefusedError:
            return "down"
        except OSError:
            return "silent"
        if address not in self._member_stubs:
            channel = self.open_channel(f"ipv4:{address}")
            self._member_stubs[address] = (channel, self.pb_grpc.MaintenanceStub(channel))
        try:
            status = self._member_stubs[address][1].Status(self.pb.StatusRequest(), timeout=timeout)
        except self.grpc.RpcError:
            return "silent"
        return "led" if status.leader else "leaderless"

    def key(self, *parts: str) -> bytes:
        return self.prefix + "/".join(parts).encode()

    def call(self, method: Callable, request: Any, timeout: float = ETCD_RPC_TIMEOUT_S) -> Any:
        """One unary call. An attempt gets at most ETCD_ATTEMPT_S: one sent to a member
        that went silent is retried (round robin: on another member) until timeout, as is
        UNAVAILABLE (a member down, an election)."""
        deadline = time.monotonic() + timeout
        retryable = (self.grpc.StatusCode.UNAVAILABLE, self.grpc.StatusCode.DEADLINE_EXCEEDED)
        while True:
            left = deadline - time.monotonic()
            try:
                return method(request, timeout=max(min(left, ETCD_ATTEMPT_S), 0.05), wait_for_ready=True)
            except self.grpc.RpcError as e:
                code = e.code()
                if code in retryable and time.monotonic() + 0.1 < deadline:
                    if code == self.grpc.StatusCode.UNAVAILABLE:
                        time.sleep(0.1)
                    continue
                raise StoreError(
                    f"etcd at {self.endpoints}: {code.name.lower()} ({e.details()}); "
                    "check that a quorum of etcd members is up and datastoreEndpoint"
                ) from None

    def get(self, key: bytes) -> Any:
        kvs = self.call(self.kv.Range, self.pb.RangeRequest(key=key)).kvs
        return kvs[0] if kvs else None

    def range(self, prefix: bytes, revision: int = 0) -> Any:
        return self.call(
            self.kv.Range, self.pb.RangeRequest(key=prefix, range_end=prefix_end(prefix), revision=revision)
        )

    def txn(self, compares: list, success: list, failure: list = ()) -> Any:
        return self.call(self.kv.Txn, self.pb.TxnRequest(compare=compares, success=success, failure=list(failure)))

    def put_op(self, key: bytes, value: bytes, lease: int = 0) -> Any:
        return self.pb.RequestOp(request_put=self.pb.PutRequest(key=key, value=value, lease=lease))

    def delete_op(self, key: bytes, whole_prefix: bool = False) -> Any:
        end = prefix_end(key) if whole_prefix else b""
        return self.pb.RequestOp(request_delete_range=self.pb.DeleteRangeRequest(key=key, range_end=end))

    # -- leases and watches ---------------------------------------------------------

    def grant(self, ttl: int, timeout: float = ETCD_RPC_TIMEOUT_S) -> int:
        return self.call(self.lease_stub.LeaseGrant, self.pb.LeaseGrantRequest(TTL=ttl), timeout).ID

    def revoke(self, lease: int) -> None:
        with contextlib.suppress(StoreError):
            self.call(self.lease_stub.LeaseRevoke, self.pb.LeaseRevokeRequest(ID=lease), timeout=1.0)

    def keep_alive(self, lease: int, timeout: float) -> int:
        """One renewal, in attempts of a third of timeout (a silent member costs one);
        returns the TTL etcd now gives the lease (0: it is gone)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                request = iter([self.pb.LeaseKeepAliveRequest(ID=lease)])
                for response in self.lease_stub.LeaseKeepAlive(request, timeout=timeout / 3):
                    return response.TTL
                return 0
            except self.grpc.RpcError as e:
                if time.monotonic() + timeout / 3 > deadline:
                    raise StoreError(
                        f"etcd at {self.endpoints}: lease renewal failed ({e.code().name.lower()})"
                    ) from None

    def watch(self, prefix: bytes, start_revision: int, stop: threading.Event) -> Iterator[list]:
        """Batches of events under prefix from start_revision on, until stop is set
        (then the stream is cancelled) or the stream breaks (StoreError)."""
        create = self.pb.WatchRequest(
            create_request=self.pb.WatchCreateRequest(
                key=prefix, range_end=prefix_end(prefix), start_revision=start_revision
            )
        )

        ended = threading.Event()  # this stream is over: its helper threads end too

        def running() -> bool:
            return not ended.wait(0.5) and not stop.is_set()

        def requests() -> Iterator[Any]:
            yield create
            while running():
                pass

        def cancel_on_stop() -> None:
            while running():
                pass
            stream.cancel()

        stream = self.watch_stub.Watch(requests())
        threading.Thread(target=cancel_on_stop, name="etcd-watch-cancel", daemon=True).start()
        try:
            for response in stream:
                if response.canceled or response.compact_revision:
                    raise StoreError(f"etcd watch cancelled: {response.cancel_reason or 'history compacted'}")
                if response.events:
                    yield list(response.events)
        except self.grpc.RpcError as e:
            if not stop.is_set():
                raise StoreError(f"etcd at {self.endpoints}: watch broke ({e.code().name.lower()})") from None
        finally:
            ended.set()

    def compare_mod(self, key: bytes, mod_revision: int, result: str = "EQUAL", range_end: bytes = b"") -> Any:
        return self.pb.Compare(
            result=getattr(self.pb.Compare, result),
            target=self.pb.Compare.MOD,
            key=key,
            mod_revision=mod_revision,
            range_end=range_end,
        )


RECORD_MAC_LABEL = b"nc etcd records v2"


TOKEN_NAME_LABEL = b"nc etcd token names v2"


SECRET_SEAL_LABEL = b"nc etcd secrets v2"


REFUSED_LOG_EVERY_S = 600.0  # one line per refused key and interval


REFUSED_LOG_BURST = 10  # and at most this many lines in a minute, whatever the keys


VERIFIED_CACHE_SIZE = 8192  # values whose MAC was checked, kept whole (about 1 KiB each), emptied when full


class EtcdRecords:
    """How the store's values look in etcd (layout 2): JSON carrying a MAC over the key
    name and the value, under a key derived from the clusterToken; bootstrap tokens named
    by a keyed hash; secrets a replica must show again sealed with AES-GCM, bound to their
    key. A value without a valid MAC is refused: read as absent, its key logged (rate-limited)."""

    def __init__(self, cluster_token: str) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if len(cluster_token) < MIN_CLUSTER_TOKEN_LEN:
            raise ConfigError(
                f"server.clusterToken: replicas on etcd need a shared secret of at least {MIN_CLUSTER_TOKEN_LEN} "
                "characters; set the same one on every replica"
            )
        self._mac_key = cluster_key(cluster_token, RECORD_MAC_LABEL)
        self._name_key = cluster_key(cluster_token, TOKEN_NAME_LABEL)
        self._sealer = AESGCM(cluster_key(cluster_token, SECRET_SEAL_LABEL))
        self._refused_at: dict[bytes, float] = {}
        self._verified: dict[tuple[bytes, bytes], dict] = {}  # (key, raw) checked already: a reload re-reads most
        self._lines: collections.deque[float] = collections.deque(maxlen=REFUSED_LOG_BURST)
        self.refused = 0  # values refused since the start

    def _mac(self, key: bytes, plain: dict) -> str:
        body = json.dumps(plain, sort_keys=True).encode()
        return hmac.new(self._mac_key, key + b"\0" + body, hashlib.sha256).hexdigest()

    def dump(self, key: bytes, value: dict) -> bytes:
        """The bytes etcd holds for value at key: the value with its MAC."""
        plain = {k: v for k, v in value.items() if k != "mac"}
        return json.dumps({**plain, "mac": self._mac(key, plain)}, sort_keys=True).encode()

    def authentic(self, key: bytes, raw: bytes) -> dict | None:
        """The value (without its MAC) when raw carries a valid MAC for key; else None."""
        known = self._verified.get((key, raw))
        if known is not None:
            return dict(known)
        plain = self._check(key, raw)
        if plain is not None:
            if len(self._verified) >= VERIFIED_CACHE_SIZE:
                self._verified.clear()
            self._verified[(key, raw)] = dict(plain)
        return plain

    def _check(self, key: bytes, raw: bytes) -> dict | None:
        try:
            value = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(value, dict) or not isinstance(value.get("mac"), str):
            return None
        plain = {k: v for k, v in value.items() if k != "mac"}
        return plain if hmac.compare_digest(value["mac"], self._mac(key, plain)) else None

    def load(self, key: bytes, raw: bytes) -> dict | None:
        """authentic, logging a refusal."""
        value = self.authentic(key, raw)
        if value is None:
            self.refuse(key)
        return value

    def refuse(self, key: bytes) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._refused_at.get(key, -REFUSED_LOG_EVERY_S) < REFUSED_LOG_EVERY_S:
            return
        if len(self._lines) == REFUSED_LOG_BURST and now - self._lines[0] < 60.0:
            return
        if len(self._refused_at) > 4096:
            self._refused_at.clear()
        self._refused_at[key] = now
        self._lines.append(now)
        log.warning(
            "etcd key %s has no valid MAC (written without the clusterToken, or moved from another key): ignored",
            loggable(key_for_log(key)),
        )

    def token_name(self, token: str) -> str:
        """The keyed hash a bootstrap token is stored under."""
        return hmac.new(self._name_key, token.encode(), hashlib.sha256).hexdigest()

    def seal_secret(self, key: bytes, secret: str) -> str:
        nonce = secrets.token_bytes(12)
        return base64.b64encode(nonce + self._sealer.encrypt(nonce, secret.encode(), key)).decode()

    def open_secret(self, key: bytes, sealed: object) -> str | None:
        from cryptography.exceptions import InvalidTag

        try:
            blob = base64.b64decode(str(sealed), validate=True)
            return self._sealer.decrypt(blob[:12], blob[12:], key).decode()
        except (InvalidTag, ValueError):
            return None


def key_for_log(key: bytes) -> str:
    """An etcd key as a log line may show it: a token key that is not a keyed hash (a
    layout-1 or forged name, maybe a real token) shows only the token's id."""
    text = key.decode(errors="replace")
    head, sep, rest = text.partition("/token/")
    if sep and "/" not in rest:
        return f"{head}/token/{token_id(rest)}"
    return text


class EtcdTxn:
    """The reads and writes of one attempt at an atomic operation. Values are read and
    written through records: one without a valid MAC reads as absent."""

    def __init__(self, etcd: Etcd, records: EtcdRecords) -> None:
        self.etcd, self.records = etcd, records
        self.revision = 0  # every read of the attempt sees this one revision
        self.compares: list = []
        self._written: dict[bytes, dict | None] = {}  # etcd refuses a Txn naming one key twice: last write wins

    @property
    def ops(self) -> list:
        return [
            self.etcd.delete_op(key) if value is None else self.etcd.put_op(key, self.records.dump(key, value))
            for key, value in self._written.items()
        ]

    def _range(self, key: bytes, range_end: bytes = b"") -> list:
        pb = self.etcd.pb
        response = self.etcd.call(
            self.etcd.kv.Range, pb.RangeRequest(key=key, range_end=range_end, revision=self.revision)
        )
        if not self.revision:
            self.revision = response.header.revision
        return list(response.kvs)

    def get(self, key: bytes) -> dict | None:
        if key in self._written:
            return self._written[key]
        kvs = self._range(key)
        self.compares.append(self.etcd.compare_mod(key, kvs[0].mod_revision if kvs else 0))
        return self.records.load(key, kvs[0].value) if kvs else None

    def scan(self, prefix: bytes) -> list[tuple[bytes, dict, int]]:
        """(key, value, create_revision) under prefix, oldest first; a key added or
        changed there before the commit makes it fail."""
        end = prefix_end(prefix)
        kvs = self._range(prefix, end)
        self.compares.append(self.etcd.compare_mod(prefix, self.revision + 1, "LESS", end))
        loaded = ((kv.key, self.records.load(kv.key, kv.value), kv.create_revision) for kv in kvs)
        return sorted(((k, v, r) for k, v, r in loaded if v is not None), key=lambda r: r[2])

    def put(self, key: bytes, value: dict) -> None:
        self._written[key] = value

    def delete(self, key: bytes) -> None:
        self._written[key] = None


ETCD_LOAD_BATCH = 64  # puts per Txn when a backup is loaded (etcd allows 128 operations in one)


def etcd_snapshot(etcd: Etcd) -> list[tuple[bytes, bytes]]:
    """nc's keys as of one revision (a single Range reads them all at once), the sealed
    PKI among them, without those bound to a lease (a replica's heartbeat, the leader's
    campaign), which live only as long as the process that holds them."""
    return [(kv.key, kv.value) for kv in etcd.range(etcd.prefix).kvs if not kv.lease]


def etcd_load(etcd: Etcd, pairs: list[tuple[bytes, bytes]]) -> int:
    """Put a snapshot's keys into an etcd that holds none of nc's yet; returns how many."""
    if etcd.range(etcd.prefix).kvs:
        raise StoreError(
            f"etcd at {etcd.endpoints} already holds nc's keys ({etcd.prefix.decode()}); "
            "restore only into an empty one, with every replica stopped"
        )
    for start in range(0, len(pairs), ETCD_LOAD_BATCH):
        etcd.txn([], [etcd.put_op(key, value) for key, value in pairs[start : start + ETCD_LOAD_BATCH]])
    return len(pairs)


class EtcdStore:
    """The Datastore on an etcd v3 cluster, each operation one Txn. Replicas share it; a
    handle leads (unguarded) until follow(), and after lead() its leader-only writes are
    guarded by the campaign key's revision (the fence)."""

    shared = True  # other replicas write too: a cache over it may be behind

    def __init__(
        self, endpoints: str, cluster_token: str, tls: EtcdTls | None = None, prefix: str = ETCD_PREFIX
    ) -> None:
        self.records = EtcdRecords(cluster_token)
        self.cluster_token = cluster_token  # checked against the sealed PKI before a migration
        self.etcd = Etcd(endpoints, tls, prefix)
        self.path = endpoints  # what error lines name
        self._lock = threading.RLock()
        self._fence: tuple[bytes, int] | None = None  # (campaign key, its create_revision) while leading
        self._following = False
        self.migrate()

    @property
    def leads(self) -> bool:
        return not self._following

    # _commit reads _fence, then _following: these orders let it never see "no fence and
    # not following" (an unguarded write) on the way from leading to following.
    def lead(self, fence: tuple[bytes, int]) -> None:
        self._fence = fence
        self._following = False

    def follow(self) -> None:
        self._following = True
        self._fence = None

    def close(self) -> None:
        self.etcd.close()

    def atomically(self, operation: Callable[[EtcdTxn], Any], leader_only: bool = False) -> Any:
        """Run operation until its writes commit against what it read (optimistic, like
        etcd's STM); what it raises aborts without writing. A leader_only operation
        commits only while this replica's campaign key is the one in etcd."""
        for attempt in range(ETCD_TXN_ATTEMPTS):
            with self._lock:  # this replica's own writers take turns: only other replicas' can conflict
                txn = EtcdTxn(self.etcd, self.records)
                result = operation(txn)
                ops = txn.ops
                if not ops:
                    return result
                if self._commit(txn.compares, ops, leader_only):
                    return result
            time.sleep(random.uniform(0, min(0.1, 0.005 * (attempt + 1))))  # let the other replica finish
        raise StoreError(f"etcd at {self.path}: too much contention on one key; retry")

    def _commit(self, compares: list, ops: list, leader_only: bool) -> bool:
        fence = self._fence
        if leader_only and self._following:
            raise NotLeader("this replica is not the leader; a leader-only write was dropped")
        if not leader_only or fence is None:  # a handle that never followed: alone, unfenced
            return self.etcd.txn(compares, ops).succeeded
        key, revision = fence
        pb = self.etcd.pb
        guard = pb.Compare(result=pb.Compare.EQUAL, target=pb.Compare.CREATE, key=key, create_revision=revision)
        check = pb.RequestOp(request_range=pb.RangeRequest(key=key))
        response = self.etcd.txn([*compares, guard], ops, [check])
        if response.succeeded:
            return True
        kvs = response.responses[0].response_range.kvs
        if not kvs or kvs[0].create_revision != revision:
            raise NotLeader("this replica lost the leadership; a leader-only write was dropped")
        return False

    def _key(self, *parts: str) -> bytes:
        return self.etcd.key(*parts)

    def _get(self, key: bytes) -> dict | None:
        """The value at key, None when absent or not authentic (refused)."""
        kv = self.etcd.get(key)
        return None if kv is None else self.records.load(key, kv.value)

    def _range(self, prefix: bytes) -> list[tuple[Any, dict]]:
        """(kv, value) of the authentic keys under prefix, oldest first."""
        kvs = sorted(self.etcd.range(prefix).kvs, key=lambda kv: kv.create_revision)
        loaded = ((kv, self.records.load(kv.key, kv.value)) for kv in kvs)
        return [(kv, value) for kv, value in loaded if value is not None]

    def _token_key(self, token: str) -> bytes:
        """token/<id>/<keyed hash>: the id alone is public (`nc adm token list` shows it)."""
        public = token.split(".", 1)[0]
        return self._key(
            "token",
            public if public.isascii() and public.isalnum() and "." in token else "-",
            self.records.token_name(token),
        )

    # -- schema -----------------------------------------------------------------

    def migrate(self) -> None:
        EtcdLayout(self).settle()

    def schema_version(self) -> int:
        return ETCD_LAYOUT_VERSION

    # -- bootstrap tokens -------------------------------------------------------

    def add_bootstrap_token(
        self,
        token: str,
        life_minutes: int,
        single_use: bool,
        network: str = DEFAULT_NETWORK,
        minted_by: str = "",
        hourly_limit: int | None = None,
    ) -> str:
        expire = token_expire_time(life_minutes)

        def add(txn: EtcdTxn) -> None:
            if minted_by:
                window_start = local_time(-MINT_WINDOW_S)
                minted = sum(1 for _, v, _ in txn.scan(self._key("mint", minted_by, "")) if v["time"] > window_start)
                refuse_over_mint_rate(minted, hourly_limit)
                txn.put(
                    self._key("mint", minted_by, f"{time.time():.6f}-{secrets.token_hex(4)}"), {"time": local_time()}
                )
            if network != DEFAULT_NETWORK and txn.get(self._key("network", network)) is None:
                raise BadRequest(f"no network named {network!r}")
            key = self._token_key(token)
            if txn.get(key) is not None:
                raise unique_conflict("bootstrap token")
            now = local_time()
            txn.put(
                key,
                {
                    "expire_time": expire,
                    "create_time": now,
                    "update_time": now,
                    "single_use": bool(single_use),
                    "uses": 0,
                    "network": network,
                    "minted_by": minted_by,
                    "sealed": self.records.seal_secret(key, token),
                },
            )

        self.atomically(add)
        return expire

    def _token_row(self, key: bytes, v: dict) -> BootstrapTokenRow | None:
        token = self.records.open_secret(key, v.get("sealed"))
        if token is None:
            self.records.refuse(key)
            return None
        return BootstrapTokenRow(
            token, v["expire_time"], v["create_time"], v["single_use"], v["uses"], v["network"], v["minted_by"]
        )

    def _tokens(self, prefix: bytes) -> list[BootstrapTokenRow]:
        rows = (self._token_row(kv.key, value) for kv, value in self._range(prefix))
        return [row for row in rows if row is not None]

    def bootstrap_tokens_with_id(self, token_id: str) -> list[BootstrapTokenRow]:
        # The range is token/<id>, not token/<id>/ alone: a key forged under the id in any
        # form is read, so refused and logged. Only an exact id matches, as on sqlite.
        return [row for row in self._tokens(self._key("token", token_id)) if row.token.startswith(token_id + ".")]

    def list_bootstrap_tokens(self) -> list[BootstrapTokenRow]:
        return self._tokens(self._key("token", ""))

    def delete_bootstrap_token(self, token: str) -> bool:
        def delete(txn: EtcdTxn) -> bool:
            if txn.get(self._token_key(token)) is None:
                return False
            txn.delete(self._token_key(token))
            return True

        return self.atomically(delete)

    def _delete_where(self, prefix: bytes, doomed: Callable[[dict], bool], leader_only: bool) -> int:
        """Delete the keys under prefix whose value is doomed, ETCD_CHUNK per Txn, each
        guarded by the key's own revision (a key changed meanwhile is looked at again)."""
        deleted = 0
        for _ in range(ETCD_TXN_ATTEMPTS):
            victims = [kv for kv, value in self._range(prefix) if doomed(value)]
            if not victims:
                return deleted
            for start in range(0, len(victims), ETCD_CHUNK):
                chunk = victims[start : start + ETCD_CHUNK]
                compares = [self.etcd.compare_mod(kv.key, kv.mod_revision) for kv in chunk]
                if self._commit(compares, [self.etcd.delete_op(kv.key) for kv in chunk], leader_only):
                    deleted += len(chunk)
        return deleted

    def delete_expired_bootstrap_tokens(self) -> int:
        window_start, now = local_time(-MINT_WINDOW_S), local_time()
        self._delete_where(self._key("mint", ""), lambda v: v["time"] <= window_start, leader_only=True)
        return self._delete_where(
            self._key("token", ""), lambda v: token_expired(v["expire_time"], now), leader_only=True
        )

    def admit_node(self, bootstrap_token: str, node_token: str, certs: tuple[CertRecord, ...] = ()) -> str:
        token_key = self._token_key(bootstrap_token)

        def admit(txn: EtcdTxn) -> str:
            row = txn.get(token_key)
            if row is None:
                raise BadRequest("bootstrap token is unknown or was deleted")
            refuse_unusable_token(row["expire_time"], row["single_use"], row["uses"])
            if txn.get(self._key("node", node_token)) is not None:
                raise unique_conflict("node-token")
            stale = row.get("pending", "")  # a single-use token's pending node: superseded
            stale_node = txn.get(self._key("node", stale)) if stale else None
            if stale_node is not None and stale_node.get("join_token"):
                self._purge_node(txn, stale)
            pending = node_token if row["single_use"] else ""
            txn.put(token_key, {**row, "pending": pending, "update_time": local_time()})  # racing joins conflict here
            now = local_time()
            txn.put(
                self._key("node", node_token),
                {
                    "state": STATE_IDLE,
                    "bind_ip": "",
                    "create_time": now,
                    "update_time": now,
                    "network": row["network"],
                    "minted_by": row["minted_by"],
                    "join_token": token_key.decode(),  # the token's key (a keyed hash), not the token
                },
            )
            self._record_certs(txn, node_token, certs)
            return row["network"]

        return self.atomically(admit)

    def confirm_node(self, token: str) -> bool:
        node_key = self._key("node", token)

        def confirm(txn: EtcdTxn) -> bool:
            node = txn.get(node_key)
            if node is None or not node.get("join_token"):
                return node is not None
            token_key = node["join_token"].encode()
            row = txn.get(token_key)
            if row is not None and row["single_use"] and row["uses"] > 0:  # admit_node supersedes: a safeguard
                self._purge_node(txn, token)
                return False
            if row is not None:
                txn.put(token_key, {**row, "uses": row["uses"] + 1, "pending": "", "update_time": local_time()})
            txn.put(node_key, {k: v for k, v in node.items() if k != "join_token"})
            return True

        return self.atomically(confirm)

    def reclaim_unconfirmed_nodes(self, older_than_s: int) -> list[str]:
        cutoff = local_time(-older_than_s)
        doomed = [r.token for r, _ in self._node_rows() if r.pending and r.create_time <= cutoff]

        def reclaim(txn: EtcdTxn, token: str) -> bool:
            node = txn.get(self._key("node", token))
            return node is not None and bool(node.get("join_token")) and self._purge_node(txn, token)

        return [t for t in doomed if self.atomically(functools.partial(reclaim, token=t), leader_only=True)]

    # -- certificates -----------------------------------------------------------

    def record_certs(self, node_token: str, certs: tuple[CertRecord, ...]) -> None:
        self.atomically(lambda txn: self._record_certs(txn, node_token, certs))

    def record_renewal(self, node_token: str, certs: tuple[CertRecord, ...]) -> int:
        def renewal(txn: EtcdTxn) -> int:
            revoked = 0
            kinds = {cert.kind for cert in certs}
            live = [c for c in self._certs_of(txn, node_token) if c[1]["kind"] in kinds and not c[1]["revoked"]]
            for kind in kinds:
                for key, value, _ in [c for c in live if c[1]["kind"] == kind][1:]:  # oldest first
                    txn.put(self._key("cert", key), {**value, "revoked": True})
                    revoked += 1
            self._record_certs(txn, node_token, certs)
            return revoked

        return self.atomically(renewal)

    def _record_certs(self, txn: EtcdTxn, node_token: str, certs: tuple[CertRecord, ...]) -> None:
        for cert in certs:
            if txn.get(self._key("cert", cert.key)) is None:  # INSERT OR IGNORE
                value = {"node_token": node_token, "kind": cert.kind, "not_after": cert.not_after, "revoked": False}
                txn.put(self._key("cert", cert.key), value)
                txn.put(self._key("certs-of", node_token, cert.key), {})

    def cert_owner(self, serial: int) -> tuple[str, bool] | None:
        value = self._get(self._key("cert", serial_key(serial)))
        return None if value is None else (value["node_token"], value["revoked"])

    def is_legacy_node(self, token: str) -> bool:
        return self._get(self._key("legacy", token)) is not None

    def _certs_of(self, txn: EtcdTxn, node_token: str) -> list[tuple[str, dict, int]]:
        """(serial key, record, issue order) of the node's certificates, oldest first."""
        certs = []
        for key, _, _ in txn.scan(self._key("certs-of", node_token, "")):
            serial = key.decode().rpartition("/")[2]
            kvs = txn._range(self._key("cert", serial))
            if kvs:
                txn.compares.append(self.etcd.compare_mod(kvs[0].key, kvs[0].mod_revision))
                value = self.records.load(kvs[0].key, kvs[0].value)
                if value is not None:
                    certs.append((serial, value, kvs[0].create_revision))
        return sorted(certs, key=lambda c: c[2])

    def _older_live(self, txn: EtcdTxn, node_token: str, kind: str, serial: int) -> list[tuple[str, dict, int]]:
        certs = self._certs_of(txn, node_token)
        mine = next((c[2] for c in certs if c[0] == serial_key(serial)), None)
        if mine is None:
            return []
        return [c for c in certs if c[1]["kind"] == kind and not c[1]["revoked"] and c[2] < mine]

    def has_older_live_certs(self, node_token: str, kind: str, serial: int) -> bool:
        return bool(
            self._older_live(EtcdTxn(self.etcd, self.records), node_token, kind, serial)
        ) or self.is_legacy_node(node_token)

    def switch_to_cert(self, node_token: str, kind: str, serial: int) -> int:
        def switch(txn: EtcdTxn) -> int:
            older = self._older_live(txn, node_token, kind, serial)
            for key, value, _ in older:
                txn.put(self._key("cert", key), {**value, "revoked": True})
            revoked = {c[0] for c in older}
            kinds = {v["kind"] for k, v, _ in self._certs_of(txn, node_token) if not v["revoked"] and k not in revoked}
            if len(kinds) == 2 and txn.get(self._key("legacy", node_token)) is not None:
                txn.delete(self._key("legacy", node_token))
            return len(older)

        return self.atomically(switch)

    def prune_expired_certs(self, now_iso: str) -> int:
        pruned = 0
        for kv, value in self._range(self._key("cert", "")):
            if value["not_after"] < now_iso:
                index = self._key("certs-of", value["node_token"], kv.key.decode().rpartition("/")[2])
                ops = [self.etcd.delete_op(kv.key), self.etcd.delete_op(index)]
                pruned += self.etcd.txn([self.etcd.compare_mod(kv.key, kv.mod_revision)], ops).succeeded
        return pruned

    def _purge_node(self, txn: EtcdTxn, token: str) -> bool:
        """Remove a node and everything that speaks for it (see Store._purge_node)."""
        for serial, _, _ in self._certs_of(txn, token):
            txn.delete(self._key("cert", serial))
            txn.delete(self._key("certs-of", token, serial))
        if txn.get(self._key("legacy", token)) is not None:
            txn.delete(self._key("legacy", token))
        for key, value, _ in txn.scan(self._key("token", "")):
            if value["minted_by"] == token and value["uses"] == 0:
                txn.delete(key)
        node = txn.get(self._key("node", token))
        if node is None:
            return False
        if node["bind_ip"]:
            txn.delete(self._key("addr", node["network"], node["bind_ip"]))
        txn.delete(self._key("node", token))
        return True

    # -- nodes ------------------------------------------------------------------

    @staticmethod
    def _node_row(key: bytes, v: dict) -> NodeRow:
        token = key.decode().rpartition("/")[2]
        return NodeRow(
            token,
            v["state"],
            v["bind_ip"],
            v["create_time"],
            v["update_time"],
            v["network"],
            v["minted_by"],
            *(v.get(f, "") for f in SESSION_FIELDS),
            v.get("name", ""),  # absent on a node stored before names
            bool(v.get("join_token")),  # absent on a node stored before joins were confirmed: confirmed
        )

    def _node_rows(self) -> list[tuple[NodeRow, int]]:
        return [(self._node_row(kv.key, value), kv.create_revision) for kv, value in self._range(self._key("node", ""))]

    def node(self, token: str) -> NodeRow | None:
        key = self._key("node", token)
        value = self._get(key)
        return None if value is None else self._node_row(key, value)

    def nodes(self) -> list[NodeRow]:
        return [row for row, _ in self._node_rows()]

    def bindings_oldest_first(self, network: str = DEFAULT_NETWORK) -> list[NodeRow]:
        rows = [(r.update_time, rev, r) for r, rev in self._node_rows() if r.bind_ip and r.network == network]
        return [r for _, _, r in sorted(rows, key=lambda t: (t[0], t[1]))]

    def node_tokens_in(self, network: str) -> list[str]:
        return [row.token for row, _ in self._node_rows() if row.network == network]

    def node_token_exists(self, token: str) -> bool:
        return self._get(self._key("node", token)) is not None

    # -- networks ---------------------------------------------------------------

    def networks(self) -> list[NetworkRow]:
        rows = []
        for kv, v in self._range(self._key("network", "")):
            net_token = self.records.open_secret(kv.key, v.get("sealed_net_token"))
            if net_token is None:
                self.records.refuse(kv.key)
                continue
            rows.append(NetworkRow(v["id"], v["name"], v["cidr"], v["interconnection"], net_token, v["from_config"]))
        return sorted(rows, key=lambda row: row.id)

    def _insert_network(self, txn: EtcdTxn, spec: NetworkSpec, net_token: str, from_config: bool) -> None:
        seq = txn.get(self._key("seq", "network")) or {"last": 0}
        txn.put(self._key("seq", "network"), {"last": seq["last"] + 1})
        key = self._key("network", spec.name)
        value = {
            "id": seq["last"] + 1,
            "name": spec.name,
            "cidr": spec.cidr,
            "interconnection": bool(spec.interconnection),
            "sealed_net_token": self.records.seal_secret(key, net_token),
            "from_config": from_config,
            "create_time": local_time(),
        }
        txn.put(key, value)

    def put_config_network(self, spec: NetworkSpec, net_token: str) -> None:
        def put(txn: EtcdTxn) -> None:
            row = txn.get(self._key("network", spec.name))
            if row is None:
                self._insert_network(txn, spec, net_token, True)
            else:
                changed = {**row, "cidr": spec.cidr, "interconnection": bool(spec.interconnection), "from_config": True}
                if changed != row:
                    txn.put(self._key("network", spec.name), changed)

        self.atomically(put)

    def add_network(self, spec: NetworkSpec, net_token: str) -> None:
        def add(txn: EtcdTxn) -> None:
            if txn.get(self._key("network", spec.name)) is not None:
                raise BadRequest(f"a network named {spec.name!r} already exists")
            self._insert_network(txn, spec, net_token, False)

        self.atomically(add)

    def forget_config_network(self, name: str) -> None:
        def forget(txn: EtcdTxn) -> None:
            row = txn.get(self._key("network", name))
            if row is not None and row["from_config"]:
                txn.put(self._key("network", name), {**row, "from_config": False})

        self.atomically(forget)

    def delete_network(self, name: str) -> list[str]:
        """Its nodes go first, ETCD_NODES_PER_TXN per Txn (etcd caps the operations of one),
        then its tokens and the network in one; a failure midway leaves the network with
        fewer nodes, and deleting it again finishes the job."""
        if self._get(self._key("network", name)) is None:
            raise BadRequest(f"no network named {name!r}")
        tokens = self.node_tokens_in(name)
        for start in range(0, len(tokens), ETCD_NODES_PER_TXN):
            chunk = tokens[start : start + ETCD_NODES_PER_TXN]
            self.atomically(lambda txn, chunk=chunk: [self._purge_node(txn, token) for token in chunk])

        def delete(txn: EtcdTxn) -> list[str]:
            if txn.get(self._key("network", name)) is None:
                raise BadRequest(f"no network named {name!r}")
            late = [self._node_row(k, v).token for k, v, _ in txn.scan(self._key("node", "")) if v["network"] == name]
            for token in late:  # joined while the others were being deleted
                self._purge_node(txn, token)
            for key, value, _ in txn.scan(self._key("token", "")):
                if value["network"] == name and txn._written.get(key, value) is not None:
                    txn.delete(key)
            txn.delete(self._key("network", name))
            return late

        return tokens + [t for t in self.atomically(delete) if t not in tokens]

    def ensure_reserved_node(self, server_ip: str) -> bool:
        def ensure(txn: EtcdTxn) -> bool:
            node = txn.get(self._key("node", RESERVED_NODE_TOKEN))
            if node is not None and node["bind_ip"] == server_ip:
                return False
            holder = txn.get(self._key("addr", DEFAULT_NETWORK, server_ip))
            if holder is not None and holder["token"] != RESERVED_NODE_TOKEN:
                # Whoever held the server's address under an older networkAddr gives it up.
                other = txn.get(self._key("node", holder["token"]))
                if other is not None:
                    txn.put(self._key("node", holder["token"]), {**other, "bind_ip": "", "update_time": local_time()})
            now = local_time()
            if node is None:
                node = {"state": STATE_CONNECTED, "create_time": now, "network": DEFAULT_NETWORK, "minted_by": ""}
            elif node["bind_ip"]:
                txn.delete(self._key("addr", DEFAULT_NETWORK, node["bind_ip"]))
            txn.put(self._key("node", RESERVED_NODE_TOKEN), {**node, "bind_ip": server_ip, "update_time": now})
            txn.put(self._key("addr", DEFAULT_NETWORK, server_ip), {"token": RESERVED_NODE_TOKEN})
            return True

        return self.atomically(ensure, leader_only=True)

    def record_session(self, token: str, host_name: str, endpoint: str, transport: str, version: str) -> None:
        """What a node's session showed, and when: the start of a session, or (all empty) its end."""
        seen = {"last_seen": local_time()}
        if endpoint:
            seen.update(host_name=host_name, endpoint=endpoint, transport=transport, node_version=version)

        def update(txn: EtcdTxn) -> None:
            node = txn.get(self._key("node", token))
            if node is not None:
                txn.put(self._key("node", token), {**node, **seen})

        self.atomically(update)

    def claim_node_name(self, token: str, wanted: str) -> str:
        node = self.node(token)
        if node is not None and node.name:  # every session but a node's first: one read, no Txn
            return node.name

        def claim(txn: EtcdTxn) -> str:
            node = txn.get(self._key("node", token))
            if node is None or node.get("name") or not wanted:
                return node.get("name", "") if node else ""
            nodes = txn.scan(self._key("node", ""))  # any node changed meanwhile: start over
            name = free_node_name(wanted, {v.get("name", "") for _, v, _ in nodes if v["network"] == node["network"]})
            txn.put(self._key("node", token), {**node, "name": name})
            return name

        return self.atomically(claim)

    def rename_node(self, token: str, name: str) -> None:
        check_node_name(name)

        def rename(txn: EtcdTxn) -> None:
            node = txn.get(self._key("node", token))
            if node is None:
                raise BadRequest("node-token is not registered")
            nodes = txn.scan(self._key("node", ""))
            holders = [k for k, v, _ in nodes if v["network"] == node["network"] and v.get("name") == name]
            refuse_taken_name(name, holders[0].decode().rpartition("/")[2] if holders else None, token)
            txn.put(self._key("node", token), {**node, "name": name})

        self.atomically(rename)

    def idle_nodes(self, idle_for_s: int) -> list[str]:
        """Nodes not connected for longer than idle_for_s (by their last state change)."""
        before = local_time(-idle_for_s)
        return [
            row.token
            for row, _ in self._node_rows()
            if row.state != STATE_CONNECTED and row.token != RESERVED_NODE_TOKEN and row.update_time < before
        ]

    def reset_states(self, reserved_state: int) -> int:
        """Per node, each guarded by its revision: a node another replica changed is read again."""
        reset = 0
        for row, _ in self._node_rows():
            wanted = reserved_state if row.token == RESERVED_NODE_TOKEN else STATE_IDLE
            if row.state != wanted and self.set_state(row.token, wanted) and row.token != RESERVED_NODE_TOKEN:
                reset += 1
        return reset

    def set_state(self, token: str, state: int) -> bool:
        def update(txn: EtcdTxn) -> bool:
            node = txn.get(self._key("node", token))
            if node is None:
                return False
            if node["state"] != state:
                txn.put(self._key("node", token), {**node, "state": state, "update_time": local_time()})
            return True

        return self.atomically(update)

    def bind(self, token: str, ip: str, evict: str | None, state: int | None = None) -> None:
        """Bind ip to token: the address key is created only if absent (or held by the
        evicted node, deleted on its revision in the same Txn), so two replicas never
        bind one address. Raises AddressTaken when another node holds it."""

        def bind_ip(txn: EtcdTxn) -> None:
            node = txn.get(self._key("node", token))
            if node is None:
                raise BadRequest("node-token is not registered")
            network = node["network"]
            if evict is not None:
                self._purge_node(txn, evict)
            if ip:
                holder = txn.get(self._key("addr", network, ip))
                if holder is not None and holder["token"] != token:
                    raise AddressTaken(f"{ip} in network {network} is bound to another node")
            if node["bind_ip"] and node["bind_ip"] != ip:
                txn.delete(self._key("addr", network, node["bind_ip"]))
            if ip:
                txn.put(self._key("addr", network, ip), {"token": token})
            changed = {**node, "bind_ip": ip, "update_time": local_time()}
            if state is not None:
                changed["state"] = state
            txn.put(self._key("node", token), changed)

        self.atomically(bind_ip)

    def delete_node(self, token: str) -> bool:
        return self.atomically(lambda txn: self._purge_node(txn, token))

    # -- migration ------------------------------------------------------------------

    def import_store(self, source: Store) -> dict[str, int]:
        """Copy a single server's sqlite store (stopped) into an empty etcd tree, keeping
        every node-token, address, network id, token and certificate record."""
        if self.etcd.range(self._key("node", "")).kvs or self.etcd.range(self._key("network", "")).kvs:
            raise StoreError(f"etcd at {self.path} already holds an nc store; migrate into an empty one")
        puts: list[tuple[bytes, dict]] = []
        networks = source.networks()
        for row in networks:
            key = self._key("network", row.name)
            value = {**dataclasses.asdict(row), "create_time": local_time()}
            value["sealed_net_token"] = self.records.seal_secret(key, value.pop("net_token"))
            puts.append((key, value))
        puts.append((self._key("seq", "network"), {"last": max((r.id for r in networks), default=0)}))
        tokens, joins = source.list_bootstrap_tokens(), source.export_pending_joins()
        pending = {bootstrap: node for node, bootstrap in joins.items()}  # a single-use token has one at most
        for t in tokens:
            value = {
                "pending": pending.get(t.token, "") if t.single_use else "",
                "expire_time": t.expire_time,
                "create_time": t.create_time,
                "update_time": t.create_time,
                "single_use": t.single_use,
                "uses": t.uses,
                "network": t.network,
                "minted_by": t.minted_by,
                "sealed": self.records.seal_secret(self._token_key(t.token), t.token),
            }
            puts.append((self._token_key(t.token), value))
        nodes = source.nodes()
        for n in nodes:
            value = {
                "state": STATE_IDLE if n.token != RESERVED_NODE_TOKEN else n.state,
                "bind_ip": n.bind_ip,
                "create_time": n.create_time,
                "update_time": n.update_time,
                "network": n.network,
                "minted_by": n.minted_by,
                "name": n.name,
            }
            if n.token in joins:  # still pending: it counts once heard from, as it would have
                value["join_token"] = self._token_key(joins[n.token]).decode()
            puts.append((self._key("node", n.token), value))
            if n.bind_ip:
                puts.append((self._key("addr", n.network, n.bind_ip), {"token": n.token}))
        certs = source.export_certs()
        for serial, node_token, kind, not_after, revoked in certs:
            value = {"node_token": node_token, "kind": kind, "not_after": not_after, "revoked": revoked}
            puts.append((self._key("cert", serial), value))
            puts.append((self._key("certs-of", node_token, serial), {}))
        for token in source.export_legacy_nodes():
            puts.append((self._key("legacy", token), {}))
        for start in range(0, len(puts), ETCD_CHUNK):
            chunk = puts[start : start + ETCD_CHUNK]
            self.etcd.txn([], [self.etcd.put_op(k, self.records.dump(k, v)) for k, v in chunk])
        overlay_nodes = sum(1 for n in nodes if n.token != RESERVED_NODE_TOKEN)
        return {"nodes": overlay_nodes, "tokens": len(tokens), "networks": len(networks), "certificates": len(certs)}


# The key families EtcdLayout rewrites from layout 1: every one the store writes.
LAYOUT_RECORD_FAMILIES = ("node", "addr", "token", "mint", "network", "seq", "cert", "certs-of", "legacy")


OLDER_REPLICAS_WAIT_S = 8.0  # a killed replica's heartbeat key lives on until its lease (TTL 5 s) ends


class EtcdLayout:
    """The layout key of a store's tree, and the move of a layout-1 tree to this layout in place.

    Three steps: the layout key says {"version": 2, "migrating": 1} (with its MAC; older
    builds refuse to start from then on); every record not yet authentic is rewritten, each
    guarded by its revision (a bootstrap token moves to its keyed-hash name, its old key
    deleted in the same Txn; a net-token is sealed; every value gets its MAC); the layout
    key says {"version": 2}. A replica stopped midway leaves the mark, and the next one to
    start finishes the job. Node-tokens, addresses and certificate serials do not change,
    so every node keeps its IP and certificates, and an old bootstrap token still joins."""

    def __init__(self, store: EtcdStore) -> None:
        self.store, self.etcd, self.records = store, store.etcd, store.records
        self.key = store.etcd.key("layout")
        self.where = f"etcd at {store.path}"

    def settle(self) -> None:
        """Return once the tree is of this layout: fresh, as it was, or migrated."""
        for _ in range(ETCD_TXN_ATTEMPTS):
            kv = self.etcd.get(self.key)
            if kv is None:  # a fresh tree
                if self._put({"version": ETCD_LAYOUT_VERSION}, 0):
                    return
                continue
            if self._version(kv.value) == 1:
                self._begin(kv.mod_revision)
                continue
            layout = self.records.authentic(self.key, kv.value)
            if layout is None:
                raise ConfigError(
                    f"{self.where}: server.clusterToken does not authenticate the records the other replicas "
                    "wrote; set the same clusterToken as they have"
                )
            if not layout.get("migrating"):
                return
            rewritten = self._rewrite_all()
            if self._put({"version": ETCD_LAYOUT_VERSION}, kv.mod_revision):
                log.info(
                    "%s: key layout %d reached (%d record(s) rewritten)", self.where, ETCD_LAYOUT_VERSION, rewritten
                )
                return
        raise StoreError(f"{self.where}: too much contention on the layout key; retry")

    def _version(self, raw: bytes) -> int:
        try:
            version = json.loads(raw)["version"]
        except (ValueError, TypeError, KeyError):
            version = None
        if not isinstance(version, int) or version < 1:
            raise StoreError(
                f"{self.where}: {self.key.decode()} holds no layout version; delete that key and start again"
            )
        if version > ETCD_LAYOUT_VERSION:
            raise StoreError(
                f"{self.where}: key layout {version} is newer than this nc knows ({ETCD_LAYOUT_VERSION}); run a newer nc"
            )
        return version

    def _put(self, layout: dict, mod_revision: int) -> bool:
        put = self.etcd.put_op(self.key, self.records.dump(self.key, layout))
        return self.etcd.txn([self.etcd.compare_mod(self.key, mod_revision)], [put]).succeeded

    def _begin(self, mod_revision: int) -> None:
        """Mark the start of the migration, once nothing speaks against it. Another replica
        of this build may start the migration meanwhile (the layout key then changes): this
        one returns and joins in instead of taking that replica's work for an objection."""
        for kv in self.etcd.range(self.etcd.key("pki", "")).kvs:  # the wrong clusterToken would MAC it all
            unseal(self.store.cluster_token, kv.key.decode().rpartition("/")[2], kv.value)
        if self._authentic_records() and not self._moved(mod_revision):
            raise StoreError(
                f"{self.where}: {self.key.decode()} says layout 1, yet records of layout "
                f"{ETCD_LAYOUT_VERSION} are there (the key was rewritten outside nc); delete "
                f"{self.key.decode()} and start again: nc keeps its own records and ignores the others"
            )
        deadline = time.monotonic() + OLDER_REPLICAS_WAIT_S
        while running := self._running_replicas():  # on layout 1: replicas of an older build
            if self._moved(mod_revision):
                return
            if time.monotonic() > deadline:
                raise StoreError(
                    f"{self.where}: replica(s) {loggable(', '.join(running))} of an older nc still run on key "
                    f"layout 1; stop every replica, then start this build (its first replica moves the keys "
                    f"to layout {ETCD_LAYOUT_VERSION})"
                )
            time.sleep(0.5)
        if self._put({"version": ETCD_LAYOUT_VERSION, "migrating": 1}, mod_revision):
            log.info(
                "%s: migrating key layout 1 to %d (bootstrap tokens under keyed hashes, every record authenticated)",
                self.where,
                ETCD_LAYOUT_VERSION,
            )

    def _moved(self, mod_revision: int) -> bool:
        kv = self.etcd.get(self.key)
        return kv is None or kv.mod_revision != mod_revision

    def _authentic_records(self) -> bool:
        """Whether records of this layout are in the tree (a genuine layout-1 tree has none)."""
        for family in ("node", "network", "token"):
            kvs = self.etcd.range(self.etcd.key(family, "")).kvs
            if any(self.records.authentic(kv.key, kv.value) is not None for kv in kvs):
                return True
        return False

    def _running_replicas(self) -> list[str]:
        """The replicas whose heartbeat key is in etcd (on their leases)."""
        prefix = self.etcd.key("replica", "")
        return sorted(kv.key[len(prefix) :].decode(errors="replace") for kv in self.etcd.range(prefix).kvs)

    def _rewrite_all(self) -> int:
        """Rewrite every record of layout 1 left, in Txns of a few records each; a Txn that
        lost a race (another replica migrating too) is retried on what the tree holds then."""
        rewritten = 0
        per_txn = ETCD_CHUNK // 2  # a token's rewrite is two operations
        for _ in range(ETCD_TXN_ATTEMPTS):
            pending = [r for family in LAYOUT_RECORD_FAMILIES for r in self._pending(family)]
            if not pending:
                return rewritten
            for start in range(0, len(pending), per_txn):
                chunk = pending[start : start + per_txn]
                compares = [compare for compare, _ in chunk]
                if self.etcd.txn(compares, [op for _, ops in chunk for op in ops]).succeeded:
                    rewritten += len(chunk)
        raise StoreError(f"{self.where}: the key layout migration did not finish; start the replica again")

    def _pending(self, family: str) -> list[tuple[Any, list]]:
        """(compare, operations) that rewrite each layout-1 record of family."""
        prefix, pending = self.etcd.key(family, ""), []
        for kv in self.etcd.range(prefix).kvs:
            if self.records.authentic(kv.key, kv.value) is not None:
                continue  # rewritten already
            key, value = kv.key, self._layout1_value(kv.value)
            rest = key[len(prefix) :].decode(errors="replace")
            if (
                value is None
                or (family == "token" and "/" in rest)
                or (family == "network" and "net_token" not in value)
            ):
                self.records.refuse(key)  # not something layout 1 wrote: left for the reads to refuse
                continue
            ops = []
            if family == "token":
                key = self.store._token_key(rest)
                value["sealed"] = self.records.seal_secret(key, rest)
                ops.append(self.etcd.delete_op(kv.key))
            if family == "network":
                value["sealed_net_token"] = self.records.seal_secret(key, value.pop("net_token"))
            ops.append(self.etcd.put_op(key, self.records.dump(key, value)))
            pending.append((self.etcd.compare_mod(kv.key, kv.mod_revision), ops))
        return pending

    @staticmethod
    def _layout1_value(raw: bytes) -> dict | None:
        with contextlib.suppress(ValueError):
            value = json.loads(raw)
            if isinstance(value, dict):
                return value
        return None


def token_id(token: str) -> str:
    """What may be logged of a bootstrap token: its public id."""
    return token.split(".", 1)[0] if "." in token else token[:4] + "…"


def open_store(config: ServerConfig) -> Datastore:
    if not config.datastore_endpoint:
        return Store(config.db_path)
    tls = EtcdTls(config.datastore_ca_file, config.datastore_cert_file, config.datastore_key_file)
    return EtcdStore(config.datastore_endpoint, config.cluster_token, tls)


# ============================================================================
# 5. Address pools and networks
#    The in-memory cache over network_mgr bindings: O(1) allocation, LRU
#    reclaim of the longest-idle node; the overlay networks that own the
#    pools; the threads that keep them in sync and sweep expired tokens.
# ============================================================================


class PoolExhausted(NcError):
    pass


class AddressPool:
    """Which overlay addresses are bound to which node-tokens, and in what LRU order.

    Pure bookkeeping, no I/O. Free addresses are found by a cursor over the
    never-used range plus a list of released ones, so a /8 costs no memory up
    front and no allocation scans the table.
    """

    def __init__(self, network: ipaddress.IPv4Network) -> None:
        self.network = network
        self.server_ip = int(network.network_address) + 1
        self._first = self.server_ip + 1
        self._last = int(network.broadcast_address) - 1
        self._cursor = self._first
        self._released: list[int] = []
        self._token_of: dict[int, str] = {}
        self._ip_of: dict[str, int] = {}
        self._idle: collections.OrderedDict[str, None] = collections.OrderedDict()  # oldest first
        # The idle bindings of nodes another node minted, in the same order: the only ones a
        # node-minted newcomer may take over (never one the admin admitted).
        self._minted: set[str] = set()
        self._idle_minted: collections.OrderedDict[str, None] = collections.OrderedDict()

    @property
    def capacity(self) -> int:
        return self._last - self._first + 1

    def __len__(self) -> int:
        return len(self._ip_of)

    def ip_of(self, token: str) -> ipaddress.IPv4Address | None:
        value = self._ip_of.get(token)
        return None if value is None else ipaddress.IPv4Address(value)

    def token_of(self, ip: ipaddress.IPv4Address) -> str | None:
        return self._token_of.get(int(ip))

    def in_range(self, ip: ipaddress.IPv4Address) -> bool:
        return self._first <= int(ip) <= self._last

    def load(self, token: str, ip: ipaddress.IPv4Address, idle: bool, minted: bool = False) -> bool:
        """Record an existing binding (from the store); False if it cannot be kept."""
        value = int(ip)
        if not self.in_range(ip) or value in self._token_of or token in self._ip_of:
            return False
        self._token_of[value] = token
        self._ip_of[token] = value
        if minted:
            self._minted.add(token)
        if idle:
            self.mark_idle(token)
        return True

    def choose(self, minted: bool = False) -> tuple[ipaddress.IPv4Address, str | None]:
        """The address for a new binding, and the node-token that must lose it (LRU) if any:
        for a node another node minted, only a node-minted one may lose it.

        Does not change the pool: the caller persists first, then calls assign().
        """
        while self._released:
            value = self._released[-1]
            if value not in self._token_of and self._first <= value <= self._last:
                return ipaddress.IPv4Address(value), None
            self._released.pop()
        while self._cursor <= self._last:
            if self._cursor not in self._token_of:
                return ipaddress.IPv4Address(self._cursor), None
            self._cursor += 1
        idle = self._idle_minted if minted else self._idle
        if not idle:
            who = (
                "every node is connected or was admitted by the administrator" if minted else "every node is connected"
            )
            raise PoolExhausted(f"overlay {self.network} is full and {who}")
        victim = next(iter(idle))
        return ipaddress.IPv4Address(self._ip_of[victim]), victim

    def has_room(self, minted: bool = False) -> bool:
        try:
            self.choose(minted)
        except PoolExhausted:
            return False
        return True

    def assign(self, token: str, ip: ipaddress.IPv4Address, evicted: str | None, minted: bool = False) -> None:
        if evicted is not None:
            self.release(evicted)
        if minted:
            self._minted.add(token)
        value = int(ip)
        if self._released and self._released[-1] == value:
            self._released.pop()
        if value == self._cursor:
            self._cursor += 1
        self._token_of[value] = token
        self._ip_of[token] = value
        self.mark_idle(token)  # bound but not yet connected

    def release(self, token: str) -> None:
        value = self._ip_of.pop(token, None)
        self._idle.pop(token, None)
        self._idle_minted.pop(token, None)
        self._minted.discard(token)
        if value is not None:
            del self._token_of[value]
            self._released.append(value)

    def mark_connected(self, token: str) -> None:
        self._idle.pop(token, None)
        self._idle_minted.pop(token, None)

    def mark_idle(self, token: str) -> None:
        """The node just went idle: it becomes the most recently used idle binding."""
        if token in self._ip_of:
            self._idle.pop(token, None)
            self._idle[token] = None
            if token in self._minted:
                self._idle_minted.pop(token, None)
                self._idle_minted[token] = None

    def tokens(self) -> set[str]:
        return set(self._ip_of)

    def connected_tokens(self) -> set[str]:
        return set(self._ip_of).difference(self._idle)


class Bindings:
    """Node-token -> overlay IP, kept in the store and mirrored in an AddressPool.

    The lock makes choose/persist/assign one step, so concurrent connects never
    share an address. Everything above this class asks here, never the pool.
    """

    def __init__(self, store: Datastore, network: ipaddress.IPv4Network, name: str = DEFAULT_NETWORK) -> None:
        self.store = store
        self.network = network
        self.name = name
        self._lock = threading.Lock()
        self.pool = AddressPool(network)
        self.reload()

    def reload(self) -> None:
        """Rebuild the pool from the store (at start, and by the periodic sync).

        Holds the lock throughout, so no allocation can slip in between reading
        the store and swapping the pool."""
        with self._lock:
            self._reload_locked()

    def _reload_locked(self) -> None:
        pool = AddressPool(self.network)
        dropped = []
        for row in self.store.bindings_oldest_first(self.name):
            if row.token == RESERVED_NODE_TOKEN:
                continue
            try:
                ip = ipaddress.IPv4Address(row.bind_ip)
            except ValueError:
                ip = None
            if ip is None or not pool.load(
                row.token, ip, idle=row.state != STATE_CONNECTED, minted=bool(row.minted_by)
            ):
                dropped.append(row)
        for token in self.pool.connected_tokens() & pool.tokens():
            pool.mark_connected(token)  # the data plane knows better than a stale state column
        self.pool = pool
        for row in dropped:
            log.warning(
                "node %s: stored address %r is not usable in %s; it gets a new one",
                row.token,
                row.bind_ip,
                self.network,
            )
            self.store.bind(row.token, "", None)

    def claim(self, token: str) -> ipaddress.IPv4Address:
        """The address for the node's session starting now: its own binding, a free
        one, or the longest-idle node's.

        Choosing, persisting (address and state "init" in one transaction) and
        taking the node out of the LRU happen under one lock, so no concurrent
        claim can pick an address twice or a starting node as its victim."""
        with self._lock:
            ip = self.pool.ip_of(token)
            if ip is None and self.store.shared:
                ip = self._adopt_stored_binding(token)
            if ip is not None:
                with contextlib.suppress(StoreFull):  # a state the disk cannot take keeps no node out
                    self.store.set_state(token, STATE_INIT)
                self.pool.mark_connected(token)
                return ip
            row = self.store.node(token)
            minted = row is not None and bool(row.minted_by)  # such a node never evicts one the admin admitted
            for attempt in itertools.count():
                ip, victim = self.pool.choose(minted)
                try:
                    self.store.bind(token, str(ip), victim, STATE_INIT)
                    break
                except AddressTaken:  # another replica bound it since this pool was read
                    if attempt >= 8:
                        raise
                    self._reload_locked()
            self.pool.assign(token, ip, victim, minted)
            self.pool.mark_connected(token)
        if victim is not None:
            log.warning(
                "overlay %s is full: node %s lost %s (idle longest) to node %s", self.network, victim, ip, token
            )
        log.info("node %s bound to %s", token, ip)
        return ip

    def _adopt_stored_binding(self, token: str) -> ipaddress.IPv4Address | None:
        """A shared store may know a binding this pool has not seen yet (made by another
        replica): the node keeps that address instead of getting a second one."""
        row = self.store.node(token)
        if row is None or not row.bind_ip or row.network != self.name:
            return None
        with contextlib.suppress(ValueError):
            ip = ipaddress.IPv4Address(row.bind_ip)
            if self.pool.load(token, ip, idle=False):
                return ip
        return None

    def has_room(self, minted: bool = False) -> bool:
        """Whether a new node could get an address: a free one, or an idle node's (for a
        node another node minted: a node-minted idle node's)."""
        with self._lock:
            return self.pool.has_room(minted)

    def forget(self, token: str) -> bool:
        """Unregister: delete the row and free the address."""
        with self._lock:
            self.pool.release(token)
            return self.store.delete_node(token)

    def connected(self, token: str) -> None:
        with self._lock:
            self.pool.mark_connected(token)

    def idle(self, token: str) -> None:
        with self._lock:
            self.pool.mark_idle(token)


@dataclasses.dataclass
class Overlay:
    """One overlay network: its settings, its net-token and its address bindings."""

    name: str
    network: ipaddress.IPv4Network
    interconnection: bool
    net_token: str
    from_config: bool
    index: int  # the server's TUN device for it is ncsrv<index>; the default network's is ncsrv0
    bindings: Bindings

    @property
    def server_ip(self) -> ipaddress.IPv4Address:
        return self.network.network_address + 1

    @property
    def tun_name(self) -> str:
        return f"ncsrv{self.index}"


class Overlays:
    """Every overlay network of the server, by name: the default one (networkAddr),
    those server.yml lists, and those `nc adm network create` added at run time."""

    def __init__(self, store: Datastore, config: ServerConfig) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._by_name: dict[str, Overlay] = {}
        self._sync_config(config)
        for row in store.networks():
            self._by_name[row.name] = self._build(row)

    def _sync_config(self, config: ServerConfig) -> None:
        specs = [NetworkSpec(DEFAULT_NETWORK, config.network_addr, config.interconnection), *config.networks]
        names = {spec.name for spec in specs}
        runtime = {
            r.name: ipaddress.IPv4Interface(r.cidr).network for r in self.store.networks() if r.name not in names
        }
        for spec in specs:
            other = overlapping(spec.network, runtime)
            if other is not None:
                raise ConfigError(
                    f"network {spec.name} ({spec.network}) in the config overlaps network {other!r} "
                    f"({runtime[other]}) created with `nc adm network create`; delete that one or pick another CIDR"
                )
            self.store.put_config_network(spec, random_token())
        for row in self.store.networks():
            if row.from_config and row.name not in names:
                self.store.forget_config_network(row.name)
                log.warning("network %s is no longer in the config; it stays until `nc adm network delete`", row.name)

    def _build(self, row: NetworkRow) -> Overlay:
        network = ipaddress.IPv4Interface(row.cidr).network
        return Overlay(
            name=row.name,
            network=network,
            interconnection=row.interconnection,
            net_token=row.net_token,
            from_config=row.from_config,
            index=0 if row.name == DEFAULT_NETWORK else row.id,
            bindings=Bindings(self.store, network, row.name),
        )

    def get(self, name: str) -> Overlay | None:
        with self._lock:
            return self._by_name.get(name)

    def all(self) -> list[Overlay]:
        with self._lock:
            return list(self._by_name.values())

    def create(self, spec: NetworkSpec) -> Overlay:
        with self._lock:
            existing = {o.name: o.network for o in self._by_name.values()}
            if spec.name in existing:
                raise BadRequest(f"a network named {spec.name!r} already exists")
            other = overlapping(spec.network, existing)
            if other is not None:
                raise BadRequest(f"{spec.network} overlaps network {other!r} ({existing[other]}); pick a disjoint CIDR")
            self.store.add_network(spec, random_token())
            row = next(r for r in self.store.networks() if r.name == spec.name)
            overlay = self._by_name[spec.name] = self._build(row)
            return overlay

    def remove(self, name: str) -> None:
        with self._lock:
            self._by_name.pop(name, None)

    def adopt(self, row: NetworkRow) -> Overlay | None:
        """A network another replica created (a shared store): served here too. None
        when it is known already (created here)."""
        with self._lock:
            if row.name in self._by_name:
                return None
            overlay = self._by_name[row.name] = self._build(row)
            return overlay


class CacheSync(threading.Thread):
    """Re-reads the store into the pools periodically, so edits made with the
    sqlite3 shell (or a crashed transaction) cannot leave the cache stale."""

    def __init__(self, overlays: Overlays, stop: threading.Event, interval: float = CACHE_SYNC_INTERVAL_S) -> None:
        super().__init__(name="cache-sync", daemon=True)
        self.overlays, self.stop, self.interval = overlays, stop, interval

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                for overlay in self.overlays.all():
                    overlay.bindings.reload()
            except Exception:
                log.exception("cache sync failed; retrying in %.0f s", self.interval)


class TokenSweeper(threading.Thread):
    """Deletes expired bootstrap tokens every ten minutes (GetToken also checks expiry);
    on replicas only the leader does."""

    def __init__(self, store: Datastore, stop: threading.Event, interval: float = TOKEN_SWEEP_INTERVAL_S) -> None:
        super().__init__(name="token-sweeper", daemon=True)
        self.store, self.stop, self.interval = store, stop, interval

    def run(self) -> None:
        while True:
            try:
                swept, reclaimed = 0, []
                with contextlib.suppress(NotLeader):  # the leadership went since leads said yes
                    swept = self.store.delete_expired_bootstrap_tokens() if self.store.leads else 0
                    if self.store.leads:
                        reclaimed = self.store.reclaim_unconfirmed_nodes(UNCONFIRMED_JOIN_TTL_S)
                if swept:
                    log.info("deleted %d expired bootstrap token(s)", swept)
                if reclaimed:
                    log.info(
                        "forgot %d join(s) never confirmed in %s",
                        len(reclaimed),
                        format_duration(UNCONFIRMED_JOIN_TTL_S),
                    )
                self.store.prune_expired_certs(datetime.datetime.now(datetime.timezone.utc).isoformat())
            except Exception:
                log.exception("expired-token sweep failed")
            if self.stop.wait(self.interval):
                return


# ============================================================================
# 6. PKI
#    Two CAs (gRPC and network), server certificates, the admin identity and
#    per-node client certificates; EC P-256, files written 0600 atomically.
# ============================================================================


CA_LIFE = datetime.timedelta(days=365 * 20)


SERVER_CERT_LIFE = datetime.timedelta(days=365 * 10)


ADMIN_CERT_LIFE = datetime.timedelta(days=365)


CLOCK_SKEW = datetime.timedelta(minutes=5)


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write a file atomically (temp file, fsync, rename) with the given mode. The temp
    file is always a new one (O_EXCL, O_NOFOLLOW): whatever lies at its name, a link
    planted there above all, is removed, never written through."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, mode)
    except FileExistsError:  # left by a crash, or planted: the name only, not its target
        tmp.unlink()
        fd = os.open(tmp, flags, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)


@dataclasses.dataclass(frozen=True)
class CertPair:
    cert_pem: bytes
    key_pem: bytes


@dataclasses.dataclass(frozen=True)
class NodeCredentials:
    grpc_ca: bytes
    grpc: CertPair
    network_ca: bytes
    network: CertPair
    records: tuple[CertRecord, ...] = ()  # the serials the store must know them by


@dataclasses.dataclass(frozen=True)
class PeerCert:
    """Who a certificate names and which one it is: all that identity resolution reads."""

    common_name: str
    serial: int
    not_after: datetime.datetime


def peer_cert(der_or_pem: bytes) -> PeerCert:
    """The one place a certificate's holder is read from its bytes (TLS peers, files)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    if der_or_pem.startswith(b"-----"):
        cert = x509.load_pem_x509_certificate(der_or_pem)
    else:
        cert = x509.load_der_x509_certificate(der_or_pem)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return PeerCert(str(names[0].value) if names else "", cert.serial_number, cert.not_valid_after_utc)


def cert_record(cert: Any, kind: str) -> CertRecord:
    return CertRecord(cert.serial_number, kind, cert.not_valid_after_utc.isoformat())


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def renewal_due(not_before: datetime.datetime, not_after: datetime.datetime, now: datetime.datetime) -> bool:
    """Two thirds of the certificate's life have passed."""
    return now >= not_before + (not_after - not_before) * 2 / 3


def new_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_pem(cert: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def spki_pin(cert: Any) -> str:
    """sha256:<hex> of the certificate's SubjectPublicKeyInfo (kubeadm's CA hash idea)."""
    from cryptography.hazmat.primitives import serialization

    der = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def build_cert(
    subject_cn: str,
    key: Any,
    issuer: Any | None,
    issuer_key: Any,
    *,
    ca: bool = False,
    server: bool = False,
    client: bool = False,
    ips: tuple[str, ...] = (),
    life: datetime.timedelta | None = None,
) -> Any:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = utc_now()
    life = life or (CA_LIFE if ca else SERVER_CERT_LIFE)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "litekube-nc"),
            x509.NameAttribute(NameOID.COMMON_NAME, subject_cn),
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer is not None else name)
        .public_key(public_key(key))
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - min(CLOCK_SKEW, life / 4))  # peers whose clocks lag a little accept it
        .not_valid_after(now + life)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key(key)), critical=False)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )
        usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
            [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
        )
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    if server:
        sans: list[Any] = [x509.DNSName(SERVER_TLS_NAME), x509.DNSName("localhost")]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in dict.fromkeys(ips)]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def public_key(key: Any) -> Any:
    """A private key's public half; a public key (from a node's CSR) as it is."""
    return key.public_key() if hasattr(key, "public_key") else key


def load_cert_file(path: Path) -> Any:
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError:
        raise PkiError(
            f"{path}: not a PEM certificate (corrupt?); restore it or remove the whole directory to start over"
        ) from None
    except OSError as e:
        raise PkiError(f"{path}: cannot read: {e.strerror}") from None


def load_key_file(path: Path) -> Any:
    from cryptography.hazmat.primitives import serialization

    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise PkiError(f"{path}: not an unencrypted PEM private key (corrupt?); restore it") from None
    except OSError as e:
        raise PkiError(f"{path}: cannot read: {e.strerror}") from None


def same_public_key(cert: Any, key: Any) -> bool:
    from cryptography.hazmat.primitives import serialization

    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt)


class CertAuthority:
    """One CA directory: ca.crt/ca.key plus the server's server.crt/server.key."""

    def __init__(self, directory: Path, label: str) -> None:
        self.dir = directory
        self.label = label
        self.cert: Any = None
        self.key: Any = None

    @property
    def ca_path(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def server_cert_path(self) -> Path:
        return self.dir / "server.crt"

    @property
    def server_key_path(self) -> Path:
        return self.dir / "server.key"

    def load_or_create(self) -> None:
        cert_path, key_path = self.ca_path, self.dir / "ca.key"
        if cert_path.exists() or key_path.exists():
            if not (cert_path.exists() and key_path.exists()):
                missing = key_path if cert_path.exists() else cert_path
                raise PkiError(
                    f"{missing}: missing while its pair exists; restore it (a new CA would lock out every node)"
                )
            self.cert, self.key = load_cert_file(cert_path), load_key_file(key_path)
            if not same_public_key(self.cert, self.key):
                raise PkiError(f"{key_path} does not match {cert_path}; restore the matching pair")
            return
        self.key = new_key()
        self.cert = build_cert(f"litekube-nc {self.label} CA", self.key, None, self.key, ca=True)
        write_private(key_path, key_pem(self.key))
        write_private(cert_path, cert_pem(self.cert), 0o644)
        log.info("created %s CA in %s", self.label, self.dir)

    def issue(
        self,
        cn: str,
        *,
        server: bool = False,
        client: bool = False,
        ips: tuple[str, ...] = (),
        life: datetime.timedelta | None = None,
    ) -> tuple[CertPair, Any]:
        """A new key and certificate for cn; returns the PEM pair and the certificate."""
        key = new_key()
        cert = build_cert(cn, key, self.cert, self.key, server=server, client=client, ips=ips, life=life)
        return CertPair(cert_pem(cert), key_pem(key)), cert

    def sign_for(self, cn: str, key: Any, life: datetime.timedelta) -> Any:
        """A client certificate for cn over a public key the holder kept to itself (renewal)."""
        return build_cert(cn, key, self.cert, self.key, client=True, life=life)

    def ensure_server_cert(self, ips: tuple[str, ...]) -> None:
        """Reuse server.crt when it matches this CA and covers ips, else issue one."""
        from cryptography import x509

        cert_path, key_path = self.server_cert_path, self.server_key_path
        if cert_path.exists() and key_path.exists():
            cert, key = load_cert_file(cert_path), load_key_file(key_path)
            if not same_public_key(cert, key):
                raise PkiError(f"{key_path} does not match {cert_path}; restore the pair or remove both")
            if cert.issuer != self.cert.subject:
                raise PkiError(f"{cert_path} was not issued by {self.ca_path}; remove server.crt/server.key to reissue")
            try:
                san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                covered = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
            except x509.ExtensionNotFound:
                covered = set()
            if set(ips) <= covered:
                return
            for old in (cert_path, key_path):
                os.replace(old, old.with_name(old.name + ".old"))
            log.warning(
                "%s did not cover %s; issued a new one (old kept as *.old)",
                cert_path,
                ", ".join(sorted(set(ips) - covered)),
            )
        elif cert_path.exists() or key_path.exists():
            raise PkiError(f"{cert_path} and {key_path} must both exist; restore the missing one or remove both")
        pair, _ = self.issue(SERVER_TLS_NAME, server=True, ips=ips)
        write_private(key_path, pair.key_pem)
        write_private(cert_path, pair.cert_pem, 0o644)

    def server_chain_pem(self) -> bytes:
        """Server certificate followed by the CA, so a joining node can check the pin."""
        return self.server_cert_path.read_bytes() + self.ca_path.read_bytes()


class Pki:
    """The server's certificate material."""

    def __init__(self, config: ServerConfig) -> None:
        self.grpc = CertAuthority(Path(config.grpc_cert_dir), "gRPC")
        self.network = CertAuthority(Path(config.network_cert_dir), "network")
        self.admin_dir = config.admin_dir
        self.node_cert_life = datetime.timedelta(seconds=config.node_cert_life)

    @property
    def admin_cert_path(self) -> Path:
        return self.admin_dir / "client.crt"

    def ensure(self, server_ips: tuple[str, ...]) -> CertRecord:
        """Load or create everything; returns the admin certificate's record."""
        for authority in (self.grpc, self.network):
            authority.load_or_create()
            authority.ensure_server_cert(server_ips)
        return self.ensure_admin()

    def ensure_admin(self) -> CertRecord:
        """The admin identity (node-token `reserverd`) that `nc adm` uses on this host,
        reissued when it is about to expire (the old one is revoked by the caller)."""
        cert_path, key_path, ca_path = self.admin_cert_path, self.admin_dir / "client.key", self.admin_dir / "ca.crt"
        if cert_path.exists() and key_path.exists():
            cert, key = load_cert_file(cert_path), load_key_file(key_path)
            if not same_public_key(cert, key):
                raise PkiError(f"{key_path} does not match {cert_path}; restore the pair or remove both")
            if cert.issuer != self.grpc.cert.subject:
                raise PkiError(
                    f"{cert_path} was not issued by {self.grpc.ca_path}; remove the admin directory to reissue"
                )
            if not ca_path.exists():
                write_private(ca_path, cert_pem(self.grpc.cert), 0o644)
            if not self._admin_renewal_due(cert):
                return cert_record(cert, "grpc")
            log.info("admin certificate expires %s; renewing it", cert.not_valid_after_utc.isoformat())
        pair, cert = self.grpc.issue(RESERVED_NODE_TOKEN, client=True, life=ADMIN_CERT_LIFE)
        write_private(key_path, pair.key_pem)
        write_private(cert_path, pair.cert_pem)
        write_private(ca_path, cert_pem(self.grpc.cert), 0o644)
        log.info("admin credentials in %s valid until %s", self.admin_dir, cert.not_valid_after_utc.isoformat())
        return cert_record(cert, "grpc")

    def _admin_renewal_due(self, cert: Any) -> bool:
        return (cert.not_valid_after_utc - utc_now()).total_seconds() < ADMIN_RENEW_BEFORE_S

    def ca_pin(self) -> str:
        return spki_pin(self.grpc.cert)

    def issue_node(self, node_token: str) -> NodeCredentials:
        grpc_pair, grpc_cert = self.grpc.issue(node_token, client=True, life=self.node_cert_life)
        network_pair, network_cert = self.network.issue(node_token, client=True, life=self.node_cert_life)
        return NodeCredentials(
            grpc_ca=cert_pem(self.grpc.cert),
            grpc=grpc_pair,
            network_ca=cert_pem(self.network.cert),
            network=network_pair,
            records=(cert_record(grpc_cert, "grpc"), cert_record(network_cert, "network")),
        )

    def renew_node(self, node_token: str, grpc_csr_pem: bytes, network_csr_pem: bytes) -> tuple[bytes, bytes, tuple]:
        """New certificates over the keys in the node's CSRs (its keys never leave it).

        Returns both PEM certificates and their records."""
        certs = []
        for authority, csr_pem, kind in ((self.grpc, grpc_csr_pem, "grpc"), (self.network, network_csr_pem, "network")):
            certs.append((authority.sign_for(node_token, csr_public_key(csr_pem, kind), self.node_cert_life), kind))
        return cert_pem(certs[0][0]), cert_pem(certs[1][0]), tuple(cert_record(c, k) for c, k in certs)


# -- the PKI shared by replicas -------------------------------------------------------
#
# Replicas on etcd serve the same two CAs: the CA pairs live in etcd, sealed (section 4's
# seal) under a key derived from the clusterToken every replica has. Each replica issues
# its own server certificates from them.


def share_ca(etcd: Any, authority: CertAuthority, cluster_token: str) -> None:
    """Make authority the cluster's CA: take the one in etcd (replacing a different local
    one and the server certificate it issued), or offer this one if etcd has none yet."""
    key = etcd.key("pki", authority.label)
    for _ in range(3):
        kv = etcd.get(key)
        if kv is not None:
            pair = json.loads(unseal(cluster_token, authority.label, kv.value))
            _install_shared_ca(authority, pair["cert"].encode(), pair["key"].encode())
            return
        authority.load_or_create()
        sealed = seal(
            cluster_token,
            authority.label,
            json.dumps({"cert": cert_pem(authority.cert).decode(), "key": key_pem(authority.key).decode()}).encode(),
        )
        absent = etcd.pb.Compare(
            result=etcd.pb.Compare.EQUAL, target=etcd.pb.Compare.CREATE, key=key, create_revision=0
        )
        if etcd.txn([absent], [etcd.put_op(key, sealed)]).succeeded:
            log.info("stored the %s CA in etcd for the other replicas", authority.label)
            return
    raise PkiError(f"could not agree on the {authority.label} CA in etcd; restart the replica")


def _install_shared_ca(authority: CertAuthority, cert: bytes, key: bytes) -> None:
    ca_path, key_path = authority.ca_path, authority.dir / "ca.key"
    if ca_path.exists() and key_path.exists() and ca_path.read_bytes() == cert and key_path.read_bytes() == key:
        return
    if ca_path.exists():
        log.warning("replacing the local %s CA in %s with the cluster's from etcd", authority.label, authority.dir)
    authority.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for issued in (authority.server_cert_path, authority.server_key_path):
        issued.unlink(missing_ok=True)  # issued by the replaced CA: reissued by ensure_server_cert
    write_private(key_path, key)
    write_private(ca_path, cert, 0o644)


def share_pki(etcd: Any, pki: Pki, cluster_token: str) -> None:
    for authority in (pki.grpc, pki.network):
        share_ca(etcd, authority, cluster_token)
    admin = pki.admin_cert_path
    if admin.exists():
        with contextlib.suppress(PkiError, OSError, ValueError):
            if load_cert_file(admin).issuer != load_cert_file(pki.grpc.ca_path).subject:
                for name in ("client.crt", "client.key", "ca.crt"):  # issued by a replaced CA
                    (pki.admin_dir / name).unlink(missing_ok=True)


def csr_public_key(csr_pem: bytes, kind: str) -> Any:
    """The public key of a node's certificate request, once its self-signature checks out."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        raise BadRequest(f"the {kind} certificate request is not a PEM CSR") from None
    key = csr.public_key()
    curves = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)  # the NIST curves; not secp256k1 nor brainpool
    if (
        not isinstance(key, ec.EllipticCurvePublicKey)
        or not isinstance(key.curve, curves)
        or not csr.is_signature_valid
    ):
        raise BadRequest(f"the {kind} certificate request must be a self-signed EC P-256, P-384 or P-521 CSR")
    return key


# ============================================================================
# 7. Control plane
#    The one owner of the rules: who a caller is (a live identity, found by
#    its certificate's serial), what it may do (the permission table), the
#    bootstrap-token and CIDR rules, and admission on both paths: a join
#    (bootstrap GetToken) and a data-plane HELLO. It knows nothing of gRPC or
#    sockets; the services and the packet loop translate to and from it.
# ============================================================================


ADMIN = "admin"


NODE = "node"


# Who may do what. The scope narrows a node's reach; ControlPlane.authorize is
# the only reader, and the README's permission table is this table.
PERMISSIONS: dict[str, dict[str, str]] = {
    "greet": {ADMIN: "any", NODE: "any"},  # HelloWorld, HealthCheck
    "mint": {ADMIN: "any", NODE: "own network"},  # GetBootStrapToken, CreateBootstrapToken
    "read-node": {ADMIN: "any", NODE: "own network"},  # CheckConnState, GetRegistedIp
    "unregister": {ADMIN: "any", NODE: "itself"},  # UnRegister
    "renew": {NODE: "itself"},  # NcNodeService.RenewCertificates
    "administer": {ADMIN: "any"},  # NcAdminService: token, node and network management
}


NOT_REGISTERED = "node-token is not registered"


BOOTSTRAP_TOKEN_RE = re.compile(r"^[a-z0-9]{6}\.[a-z0-9]{16}$")


CGNAT = ipaddress.IPv4Network("100.64.0.0/10")


@dataclasses.dataclass(frozen=True)
class Identity:
    """A live caller: the admin (node-token reserverd) or a registered node."""

    role: str  # ADMIN or NODE
    node_token: str
    network: str  # a node's overlay network; the admin's is the default one


class Sessions:
    """What the control plane tells the data plane. The network server overrides
    each; this base, with no data plane running, has nothing to do."""

    def disconnect(self, token: str, reason: str) -> None:
        """End the node's live session, telling it not to come back."""

    def add_overlay(self, overlay: Overlay) -> None:
        """Start serving a network created at run time (errors reach the caller)."""

    def remove_overlay(self, name: str) -> None:
        """Cut off a deleted network's nodes and remove its TUN."""

    def running(self) -> bool:
        """The data plane carries packets: health checks report NOT_SERVING while it does not."""
        return False

    def live(self) -> dict[str, dict[str, Any]]:
        """Connected nodes: node-token -> since (epoch seconds), rx_bytes, tx_bytes, direct_peers."""
        return {}

    def transports(self) -> dict[str, str]:
        """The data path ("udp" or "tcp") of each connected node, by node-token."""
        return {}


def new_bootstrap_token() -> str:
    """<6-char id>.<16-char secret>: the id is looked up, the whole token compared in constant time."""
    return f"{random_token(6)}.{random_token(16)}"


def host_routes() -> dict[str, ipaddress.IPv4Network]:
    """The host's IPv4 routes (main table) other than default routes and nc's own TUNs."""
    routes: dict[str, ipaddress.IPv4Network] = {}
    try:
        lines = Path("/proc/net/route").read_text().splitlines()[1:]
    except OSError:
        return routes
    for line in lines:
        fields = line.split()
        if len(fields) < 8 or fields[0].startswith("ncsrv"):
            continue
        dest, mask = (socket.inet_ntoa(struct.pack("<I", int(f, 16))) for f in (fields[1], fields[7]))
        network = ipaddress.IPv4Network(f"{dest}/{mask}", strict=False)
        if network.prefixlen > 0:
            routes[f"route {network} dev {fields[0]}"] = network
    return routes


def cidr_problem(
    network: ipaddress.IPv4Network,
    allow_public: bool,
    underlay_ips: tuple[str, ...],
    routes: dict[str, ipaddress.IPv4Network],
) -> str | None:
    """Why an overlay CIDR cannot be used on this host, or None. Overlaps with other
    overlays are checked by Overlays, under its lock."""
    for ip in underlay_ips:
        address = ipaddress.ip_address(ip)
        if address.version == 4 and address in network:
            return f"{network} contains the server's own address {ip}; pick a range the underlay does not use"
    for where, route in routes.items():
        if network.overlaps(route):
            return f"{network} overlaps this host's {where}; pick a range no interface uses"
    if not (network.is_private or network.subnet_of(CGNAT)) and not allow_public:
        return f"{network} is a public range; use a private or CGNAT range, or allow it on purpose (--allow-public)"
    return None


class OverBudget(NcError):
    """A node did something costly more often than its budget allows; `reason` is the
    nc_refusals_total reason its refusal counts under."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class TokenBucket:
    """Room for `burst` events at once, refilled at `per_s` a second."""

    __slots__ = ("level", "logged_at", "stamp")

    def __init__(self, burst: float, now: float) -> None:
        self.level, self.stamp = float(burst), now
        self.logged_at = -1e9  # when a refusal of this key was last logged

    def take(self, burst: float, per_s: float, now: float, cost: float = 1.0) -> bool:
        """Whether one event fits (cost 0: asks without taking)."""
        self.level = min(float(burst), self.level + max(0.0, now - self.stamp) * per_s)
        self.stamp = now
        if self.level < 1.0:
            return False
        self.level -= cost
        return True

    def full(self, burst: float, per_s: float, now: float) -> bool:
        return self.level + max(0.0, now - self.stamp) * per_s >= burst


class Budget:
    """How often a node (or a session) may do one costly thing: `burst` at once, then
    `per_s` a second. The one owner of such limits (malformed frames, control frames,
    certificate renewals): every path spends from its budget and acts on OverBudget.
    Buckets are kept by key (a node-token, or a session) and forgotten once full again,
    so the table holds only what spent recently; a refusal is logged at most once per
    LOG_EVERY_S per key. Thread-safe (the packet loop and gRPC threads share some)."""

    LOG_EVERY_S = 60.0
    PRUNE_EVERY_S = 60.0

    def __init__(self, reason: str, what: str, burst: int, per_s: float) -> None:
        self.reason, self.what = reason, what  # nc_refusals_total's reason; "control frames" for messages
        self.burst, self.per_s = burst, per_s
        self.refused = 0  # refusals so far (metrics)
        self._buckets: dict[Any, TokenBucket] = {}
        self._lock = threading.Lock()
        self._pruned_at = float("-inf")

    def spend(
        self,
        key: Any,
        name: str,
        per_s: float | None = None,
        now: float | None = None,
        last: object = None,
        cost: float = 1.0,
    ) -> None:
        """Take one from key's bucket, or raise OverBudget (counted; logged at most once
        per LOG_EVERY_S per key). `name` is who, as a log line says it; `per_s`
        overrides the rate (one read from the config at each use); `last` is what the
        refusal says was spent last; cost 0 only asks whether the key has room left."""
        now = time.monotonic() if now is None else now
        rate = self.per_s if per_s is None else per_s
        with self._lock:
            if now - self._pruned_at >= self.PRUNE_EVERY_S:
                self._prune(rate, now)
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = TokenBucket(self.burst, now)
            if bucket.take(self.burst, rate, now, cost):
                return
            self.refused += 1
            log_it = now - bucket.logged_at >= self.LOG_EVERY_S
            if log_it:
                bucket.logged_at = now
        message = f"over {self.burst} {self.what} at once or {format_rate(rate)}"
        message += f" (last: {last})" if last is not None else ""
        if log_it:
            log.warning("%s refused: %s (%s)", name, message, self.reason)
        raise OverBudget(message, self.reason)

    def forget(self, key: Any) -> None:
        with self._lock:
            self._buckets.pop(key, None)

    def _prune(self, rate: float, now: float) -> None:
        self._pruned_at = now
        for key in [k for k, b in self._buckets.items() if b.full(self.burst, rate, now)]:
            del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)


def format_rate(per_s: float) -> str:
    """ "20 per minute", "4 per hour": a budget's refill as a message says it."""
    for unit, seconds in (("second", 1), ("minute", 60), ("hour", 3600)):
        if per_s * seconds >= 1:
            return f"{per_s * seconds:.3g} per {unit}"
    return f"{per_s * 86400:.3g} per day"


# A node that sends more malformed frames than this within the window is cut off: a
# real node sends none, so this only ends floods (each bad frame costs a log check).
# Counted per session: a reconnect starts afresh.
BAD_FRAME_LIMIT = 100


BAD_FRAME_WINDOW_S = 10.0


# REKEY, TRANSPORT and PEERS (endpoints) frames, per node (across its reconnects); the
# first of each kind in a session is free. A well-behaved node rekeys every 120 s (sooner
# only past 2^24 datagrams), and says TRANSPORT when its UDP path comes up or fails or auto
# changes its mind: at most twice per 3 s of silence plus a 20 s wait; about 7 a minute
# at worst.
CONTROL_FRAME_BURST = 20


CONTROL_FRAMES_PER_MINUTE = 20


# Certificate renewals, per node: a few an hour, or three per renewal interval (two
# thirds of nodeCertLife) when certificates live so short that they need more.
RENEWAL_BURST = 4


RENEWALS_PER_HOUR = 4


RENEWALS_PER_INTERVAL = 3


class Budgets:
    """The per-node and per-session budgets the server keeps (each a Budget)."""

    def __init__(self) -> None:
        self.bad_frames = Budget(
            "bad-frames", "malformed frames", BAD_FRAME_LIMIT, BAD_FRAME_LIMIT / BAD_FRAME_WINDOW_S
        )
        self.control_frames = Budget(
            "control-budget",
            "control frames (REKEY, TRANSPORT, PEERS)",
            CONTROL_FRAME_BURST,
            CONTROL_FRAMES_PER_MINUTE / 60,
        )
        self.renewals = Budget("renewal-budget", "certificate renewals", RENEWAL_BURST, RENEWALS_PER_HOUR / 3600)

    def all(self) -> tuple[Budget, ...]:
        return (self.bad_frames, self.control_frames, self.renewals)


def renewals_per_s(node_cert_life: float) -> float:
    """The renewal budget's refill: RENEWALS_PER_HOUR, or more for short-lived certificates."""
    return max(RENEWALS_PER_HOUR / 3600, RENEWALS_PER_INTERVAL / (node_cert_life * 2 / 3))


class ControlPlane:
    """Identity, permissions, token and CIDR rules, and admission: every decision
    about who may join, connect, mint, read or remove is taken here."""

    def __init__(
        self, config: ServerConfig, store: Datastore, pki: Pki, overlays: Overlays, advertised_ip: str
    ) -> None:
        self.config = config
        self.store = store
        self.pki = pki
        self.overlays = overlays
        self.advertised_ip = advertised_ip  # as nodes are told: an IP, or a DNS name they resolve
        self.underlay_ip = advertised_ip  # what it resolves to here (serve() sets it for a name)
        self.sessions = Sessions()  # replaced by the network server once it runs
        self._network_lock = threading.Lock()  # one network create/delete at a time
        self.refusals: collections.Counter[str] = collections.Counter()  # joins refused, by reason (metrics)
        self.observe_join: Callable[[float], None] = lambda _seconds: None  # join latency (metrics)
        self.observe_handshake: Callable[[float], None] = lambda _seconds: None  # data-plane TLS latency (metrics)
        self.replicas: Callable[[], tuple[str, ...]] = tuple  # replicas on etcd: every one's address
        self.budgets = Budgets()  # what one node may cost: renewals here, frames on the packet loop

    # -- identity -----------------------------------------------------------------

    def identify(self, cert: PeerCert, kind: str) -> Identity:
        """The live identity a verified client certificate stands for, or Unauthenticated.

        A certificate counts while its serial is recorded, not revoked, and its node
        is still registered. Nodes that joined before serials were recorded are known
        by name until they renew."""
        owner = self.store.cert_owner(cert.serial)
        if owner is not None:
            token, revoked = owner
            if revoked or token != cert.common_name:
                raise Unauthenticated("this certificate was revoked (replaced by a renewed one); use the current one")
            self._retire_older_certs(token, kind, cert.serial)
        elif cert.common_name == RESERVED_NODE_TOKEN or not self.store.is_legacy_node(cert.common_name):
            raise Unauthenticated(
                "this certificate names no registered node (unregistered, reclaimed or deleted); join again"
            )
        token = cert.common_name
        if token == RESERVED_NODE_TOKEN:
            return Identity(ADMIN, token, DEFAULT_NETWORK)
        node = self.store.node(token)
        if node is not None and node.pending and not self.store.confirm_node(token):
            node = None  # purged meanwhile: superseded by a later join with its single-use token
        if node is None:
            raise Unauthenticated("this certificate names no registered node (unregistered or reclaimed); join again")
        if node.pending:
            log.info("node %s confirmed its join (first authenticated call)", token)
        return Identity(NODE, token, node.network)

    def _retire_older_certs(self, token: str, kind: str, serial: int) -> None:
        """The first use of a renewed certificate revokes the ones it replaced."""
        if token == RESERVED_NODE_TOKEN and self.store.shared:
            return  # replicas: each has its own admin identity, none replaces another's
        if self.store.has_older_live_certs(token, kind, serial):
            revoked = self.store.switch_to_cert(token, kind, serial)
            log.info("node %s switched to its renewed %s certificate; %d older one(s) revoked", token, kind, revoked)

    def authorize(self, who: Identity, action: str, target: NodeRow | None = None) -> None:
        """Enforce PERMISSIONS: PermissionDenied, or for a node reading outside its
        network, the same answer as for a node that does not exist."""
        scope = PERMISSIONS[action].get(who.role)
        if scope is None:
            raise PermissionDenied("admin credentials required" if who.role == NODE else f"{action} is for nodes")
        if target is None or scope == "any":
            return
        if scope == "own network" and target.network != who.network:
            raise BadRequest(NOT_REGISTERED)
        if scope == "itself" and target.token != who.node_token:
            raise PermissionDenied("permission denied: a node may unregister only itself")

    def node_for(self, who: Identity, action: str, token: str) -> NodeRow:
        """The node a request names, once who may act on it."""
        row = self.store.node(token)
        if row is None:
            self.authorize(who, action)
            raise BadRequest(NOT_REGISTERED)
        self.authorize(who, action, row)
        return row

    # -- bootstrap tokens -----------------------------------------------------------

    def create_bootstrap_token(
        self, who: Identity, life_minutes: int, single_use: bool = False, network: str = ""
    ) -> tuple[str, str, Overlay]:
        self.authorize(who, "mint")
        if who.role == NODE:
            if network and network != who.network:
                raise BadRequest("a node may mint tokens only into its own network")
            if not self.config.nodes_may_mint:
                raise PermissionDenied(
                    "permission denied: nodes may not mint bootstrap tokens here (server.nodesMayMint is false); "
                    "ask the administrator"
                )
            minter = self.store.node(who.node_token)
            if minter is not None and minter.minted_by:
                raise PermissionDenied(
                    "permission denied: this node joined with another node's token, and what a node minted "
                    "may not mint further; ask the administrator"
                )
            network = who.network
        life = requested_token_life(life_minutes, who.role == NODE, self.config.node_token_max_life)
        overlay = self.overlay_named(network or DEFAULT_NETWORK)
        token = new_bootstrap_token()
        minted_by = who.node_token if who.role == NODE else ""
        limit = self.config.node_mint_rate if minted_by else None
        expire = self.store.add_bootstrap_token(token, life, single_use, overlay.name, minted_by, limit)
        log.info(
            "bootstrap token %s created for network %s by %s, expires %s%s",
            token_id(token),
            overlay.name,
            f"node {minted_by}" if minted_by else "the admin",
            expire,
            ", single-use" if single_use else "",
        )
        return token, expire, overlay

    def join_string(self, token: str, overlay: Overlay) -> str:
        """token@ip:port#sha256:<pin>, plus ,net=<net-token> for a network other than the default."""
        hosts = dict.fromkeys([self.advertised_ip, *self.replicas()])  # replicas: a:6439,b:6439
        listed = list(hosts)[:MAX_JOIN_REPLICAS]  # what a node accepts
        addresses = ",".join(host_port(host, self.config.bootstrap_port) for host in listed)
        text = f"{token}@{addresses}#{self.pki.ca_pin()}"
        return text if overlay.name == DEFAULT_NETWORK else f"{text},net={overlay.net_token}"

    def list_bootstrap_tokens(self, who: Identity) -> list[BootstrapTokenRow]:
        self.authorize(who, "administer")
        return self.store.list_bootstrap_tokens()

    def delete_bootstrap_token(self, who: Identity, text: str) -> str:
        """Delete by id (or whole token); returns the id."""
        self.authorize(who, "administer")
        wanted = text.strip().split(".", 1)[0]
        rows = self.store.bootstrap_tokens_with_id(wanted)
        if not rows:
            raise BadRequest(f"no bootstrap token with id {wanted!r}")
        for row in rows:
            self.store.delete_bootstrap_token(row.token)
        log.info("bootstrap token %s deleted", loggable(wanted))
        return wanted

    # -- admission: joins -----------------------------------------------------------

    def admit_join(self, bootstrap_token: str) -> tuple[str, NodeCredentials]:
        """A join with a bootstrap token: a new node-token with its certificates.

        The token's validity (expiry, single use) is decided once, atomically, by
        the store while it adds the node."""
        started = time.monotonic()
        try:
            admitted = self._admit_join(bootstrap_token)
        except NetworkFull:
            self.refusals["network-full"] += 1
            raise
        except BadRequest:
            self.refusals["token"] += 1
            raise
        self.observe_join(time.monotonic() - started)
        return admitted

    def _admit_join(self, bootstrap_token: str) -> tuple[str, NodeCredentials]:
        row = self._find_bootstrap_token(bootstrap_token)
        overlay = self.overlay_named(row.network)
        if not overlay.bindings.has_room(minted=bool(row.minted_by)):
            raise NetworkFull(
                f"network {overlay.name} is full: every address belongs to a connected node; "
                "ask the administrator to unregister nodes or use a larger network"
            )
        node_token = random_token()
        while self.store.node_token_exists(node_token):
            node_token = random_token()
        credentials = self.pki.issue_node(node_token)
        network = self.store.admit_node(row.token, node_token, credentials.records)
        log.info("node %s joined network %s with bootstrap token %s", node_token, network, token_id(row.token))
        return node_token, credentials

    def control_ip_for(self, node_token: str) -> str:
        """Where a joined node reaches the control port, as the original answers GetToken:
        the server's address in the node's overlay."""
        node = self.store.node(node_token)
        overlay = self.overlays.get(node.network) if node is not None else None
        return str(overlay.server_ip) if overlay is not None else str(self.config.server_overlay_ip)

    def _find_bootstrap_token(self, token: str) -> BootstrapTokenRow:
        if not BOOTSTRAP_TOKEN_RE.match(token):
            raise BadRequest("bootstrap token is malformed; copy the whole join string")
        for row in self.store.bootstrap_tokens_with_id(token_id(token)):
            if hmac.compare_digest(row.token.encode(), token.encode()):
                return row
        raise BadRequest("bootstrap token is unknown or was deleted")

    # -- admission: data-plane sessions -------------------------------------------------

    def admit_session(self, cert: PeerCert, node_token: str, net_token: str) -> tuple[str, ipaddress.IPv4Address]:
        """A HELLO over mutual TLS: the node's network name and overlay address, or
        BadRequest / Unauthenticated / PoolExhausted saying why not."""
        if node_token != cert.common_name:
            raise BadRequest("the node-token does not match the client certificate")
        if node_token == RESERVED_NODE_TOKEN:
            raise BadRequest("the reserved node-token is the server's own")
        who = self.identify(cert, "network")
        overlay = self.overlays.get(who.network)
        if overlay is None:
            raise BadRequest("this node's network was deleted; join again")
        if net_token != overlay.net_token and not (overlay.name == DEFAULT_NETWORK and not net_token):
            raise BadRequest("the net-token does not match this node's network; use the join string's net-token")
        return overlay.name, overlay.bindings.claim(node_token)

    # -- nodes ----------------------------------------------------------------------

    def node_state(self, who: Identity, token: str) -> NodeRow:
        return self.node_for(who, "read-node", token)

    def list_nodes(self, who: Identity) -> list[NodeRow]:
        self.authorize(who, "administer")
        return self.store.nodes()

    def rename_node(self, who: Identity, token: str, name: str) -> None:
        """The admin names a node; a name its network has already is refused (no suffix here)."""
        self.authorize(who, "administer")
        if token == RESERVED_NODE_TOKEN:
            raise BadRequest("the reserved node-token is the server's own row and has no name")
        self.store.rename_node(token, name.strip())
        log.info("node %s renamed %s by the admin", loggable(token), name.strip())

    def prune_nodes(self, who: Identity, idle_for_s: int, dry_run: bool) -> list[str]:
        """Unregister every node not connected for longer than idle_for_s (or, dry, name them)."""
        self.authorize(who, "administer")
        parse_duration(idle_for_s, "idleForSeconds", error=BadRequest)  # the bounds --idle-for has
        tokens = self.store.idle_nodes(idle_for_s)
        if dry_run:
            return tokens
        pruned = []
        for token in tokens:
            with contextlib.suppress(BadRequest):  # gone meanwhile
                self.unregister(who, token)
                pruned.append(token)
        log.info("pruned %d node(s) idle for over %s", len(pruned), format_duration(idle_for_s))
        return pruned

    def node_transports(self, who: Identity) -> dict[str, str]:
        self.authorize(who, "administer")
        return self.sessions.transports()

    def unregister(self, who: Identity, token: str) -> None:
        """Remove a node: its row, address, certificates and unused minted tokens at
        once, and its live session within a second."""
        if token == RESERVED_NODE_TOKEN:
            self.authorize(who, "unregister")
            raise BadRequest("the reserved node-token belongs to the server and cannot be unregistered")
        node = self.node_for(who, "unregister", token)
        overlay = self.overlays.get(node.network)
        forgotten = overlay.bindings.forget(token) if overlay is not None else self.store.delete_node(token)
        if not forgotten:
            raise BadRequest(NOT_REGISTERED)
        self.sessions.disconnect(token, "this node was unregistered")
        log.info("node %s unregistered by %s", loggable(token), "itself" if who.node_token == token else "the admin")

    def renew(self, who: Identity, grpc_csr: bytes, network_csr: bytes) -> tuple[bytes, bytes]:
        """New certificates for the calling node; the old ones stay valid until the
        node first uses the new ones."""
        self.authorize(who, "renew")
        try:
            per_s = renewals_per_s(self.config.node_cert_life)
            self.budgets.renewals.spend(who.node_token, f"node {who.node_token}", per_s)
        except OverBudget as e:
            raise BadRequest(f"renewed too often: {e}; the current certificates stay valid, try later") from None
        grpc_pem, network_pem, records = self.pki.renew_node(who.node_token, grpc_csr, network_csr)
        unused = self.store.record_renewal(who.node_token, records)
        if self.store.node(who.node_token) is None:  # unregistered meanwhile: forget what was just recorded
            self.store.delete_node(who.node_token)
            raise Unauthenticated("this node was unregistered; join again")
        log.info(
            "node %s renewed its certificates (valid until %s)%s",
            who.node_token,
            records[0].not_after,
            f"; {unused} earlier renewal(s) it never used revoked" if unused else "",
        )
        return grpc_pem, network_pem

    # -- networks -------------------------------------------------------------------

    def overlay_named(self, name: str) -> Overlay:
        overlay = self.overlays.get(name)
        if overlay is None:
            raise BadRequest(f"no network named {name!r}; see `nc adm network list`")
        return overlay

    def list_networks(self, who: Identity) -> list[tuple[Overlay, int]]:
        """Every network with how many nodes it has."""
        self.authorize(who, "administer")
        counts = collections.Counter(r.network for r in self.store.nodes() if r.token != RESERVED_NODE_TOKEN)
        return [(o, counts[o.name]) for o in sorted(self.overlays.all(), key=lambda o: o.index)]

    def check_cidr(self, spec: NetworkSpec) -> str | None:
        return cidr_problem(spec.network, spec.allow_public, (self.underlay_ip,), host_routes())

    def check_config_networks(self) -> None:
        """server.yml networks: the host rules, at start (a refusal names the field)."""
        for spec in self.config.networks:
            problem = self.check_cidr(spec)
            if problem is not None:
                raise ConfigError(f"networks: {spec.name}: {problem} (allowPublic: true for a public range)")

    def create_network(
        self, who: Identity, name: str, cidr: str, interconnection: bool, allow_public: bool = False
    ) -> Overlay:
        self.authorize(who, "administer")
        try:
            spec = check_network_spec(name, cidr, interconnection, "network", allow_public)
        except ConfigError as e:
            raise BadRequest(str(e)) from None
        problem = self.check_cidr(spec)
        if problem is not None:
            raise BadRequest(problem)
        with self._network_lock:
            overlay = self.overlays.create(spec)
            try:
                self.sessions.add_overlay(overlay)
            except NcError:
                self.overlays.remove(spec.name)
                self.store.delete_network(spec.name)
                raise
        log.info("network %s created: %s, interconnection %s", spec.name, spec.network, spec.interconnection)
        return overlay

    def add_config_network(self, spec: NetworkSpec) -> Overlay:
        """A network server.yml gained (SIGHUP): served from now on, as if listed at start."""
        problem = self.check_cidr(spec)
        if problem is not None:
            raise BadRequest(f"networks: {spec.name}: {problem}")
        with self._network_lock:
            overlay = self.overlays.create(spec)
            try:
                self.store.put_config_network(spec, overlay.net_token)
                overlay.from_config = True
                self.sessions.add_overlay(overlay)
            except NcError:
                self.overlays.remove(spec.name)
                self.store.delete_network(spec.name)
                raise
        log.info("network %s added from the config: %s", spec.name, spec.network)
        return overlay

    def delete_network(self, who: Identity, name: str, force: bool) -> list[str]:
        """Delete a network created at run time; with force, its nodes are unregistered
        (certificates revoked, sessions closed with the network's TUN)."""
        self.authorize(who, "administer")
        with self._network_lock:
            overlay = self.overlay_named(name)
            if name == DEFAULT_NETWORK:
                raise BadRequest("the default network (networkAddr) cannot be deleted")
            if overlay.from_config:
                raise BadRequest(f"network {name} is defined in the server config; remove it there and restart")
            nodes = self.store.node_tokens_in(name)
            if nodes and not force:
                raise BadRequest(f"network {name} has {len(nodes)} node(s); add --force to unregister them too")
            removed = self.store.delete_network(name)
            self.overlays.remove(name)
            self.sessions.remove_overlay(name)
        log.info("network %s deleted%s", name, f"; unregistered {len(removed)} node(s)" if removed else "")
        return removed


# ============================================================================
# 8. TUN and routes
#    The kernel side: TUN devices (ioctls), addresses and routes through the
#    `ip` command, and the server's optional NAT gateway. Whatever is added
#    here is recorded and removed again by the same object.
# ============================================================================


TUNSETIFF = 0x400454CA


TUNSETOFFLOAD = 0x400454D0


IFF_TUN = 0x0001


IFF_NO_PI = 0x1000


IFF_VNET_HDR = 0x4000


# TUNSETOFFLOAD flags: the kernel may hand us (and accept) 64 KiB TCP segments
# with partial checksums instead of MTU-sized packets.
TUN_F_CSUM = 0x01


TUN_F_TSO4 = 0x02


TUN_F_TSO6 = 0x04


TUN_F_TSO_ECN = 0x08


TUN_READ_SIZE = 65536 + 64


def run_ip(*args: str) -> str:
    return run_tool("ip", *args)


def run_tool(tool: str, *args: str) -> str:
    try:
        done = subprocess.run([tool, *args], capture_output=True, text=True, timeout=15)
    except FileNotFoundError:
        package = "iproute2" if tool == "ip" else tool
        raise TunError(f"the `{tool}` command is missing; install {package}") from None
    if done.returncode != 0:
        raise TunError(f"{tool} {' '.join(args)}: {done.stderr.strip() or 'failed'}")
    return done.stdout


class Tun:
    """A TUN device owned by this process: the kernel removes it, with its
    addresses and routes, when the file descriptor closes (also on SIGKILL)."""

    def __init__(self, name: str, offload: bool = False) -> None:
        """offload: every read and write carries a virtio_net_hdr, and the kernel
        uses TSO/GSO and checksum offload on this device."""
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            fix = "run nc as root" if e.errno in (errno.EACCES, errno.EPERM) else "load the tun module (modprobe tun)"
            raise TunError(f"/dev/net/tun: {e.strerror}; {fix}, or in a container pass in /dev/net/tun") from None
        flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if offload else 0)
        try:
            result = fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
            if offload:
                fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN)
        except OSError as e:
            os.close(fd)
            if e.errno == errno.EBUSY:
                raise TunError(f"interface {name} already exists and is in use (is another nc running?)") from None
            raise TunError(f"cannot create TUN device {name}: {e.strerror}") from None
        self.fd = fd
        self.offload = offload
        self.name = result[:16].rstrip(b"\0").decode()

    def configure(self, address: ipaddress.IPv4Interface, mtu: int) -> None:
        """Address (which also routes its prefix here), MTU, up; no IPv6 chatter."""
        with contextlib.suppress(OSError):
            Path(f"/proc/sys/net/ipv6/conf/{self.name}/disable_ipv6").write_text("1")
        run_ip("addr", "flush", "dev", self.name)
        run_ip("addr", "add", str(address), "dev", self.name)
        run_ip("link", "set", "dev", self.name, "mtu", str(mtu), "up")
        # Flow queueing: a ping or a keystroke does not wait behind a bulk flow's megabyte
        # of 64 KiB segments when nc reads slower than the kernel writes (the UDP path,
        # which cuts and seals each segment). Best effort: without tc it stays pfifo.
        with contextlib.suppress(TunError):
            run_tool("tc", "qdisc", "replace", "dev", self.name, "root", "fq_codel")

    def withdraw(self) -> None:
        """Down and without its address, while the fd (another thread may read it) stays
        open: the address is given up at once, the device goes with the fd later."""
        for args in (("link", "set", "dev", self.name, "down"), ("addr", "flush", "dev", self.name)):
            try:
                run_ip(*args)
            except TunError as e:
                log.warning("%s", e)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def route_to(host: str) -> dict:
    """How the kernel reaches host now: {'dst', 'gateway'?, 'dev', ...}."""
    routes = json.loads(run_ip("-j", "route", "get", host) or "[]")
    if not routes:
        raise TunError(f"no route to {host}")
    return routes[0]


class RouteSet:
    """Routes this process added, removed in reverse order by close()."""

    def __init__(self) -> None:
        self.added: list[list[str]] = []

    def add(self, *spec: str) -> None:
        run_ip("route", "add", *spec)
        self.added.append(list(spec))

    def replace(self, *spec: str) -> None:
        """For a route that outlives this process (one not through its TUN): a killed
        run leaves it behind, and the next run takes it over instead of failing."""
        run_ip("route", "replace", *spec)
        self.added.append(list(spec))

    def close(self) -> None:
        while self.added:
            spec = self.added.pop()
            try:
                run_ip("route", "del", *spec)
            except TunError as e:
                log.debug("route already gone: %s", e)


class IpForwarding:
    """Turns on net.ipv4.ip_forward for gateway mode and puts back what was there.

    The value found before the first change waits in a state file until a clean stop
    restores it: a killed run leaves forwarding on, and the next run must not take
    that 1 for the host's own setting."""

    SYSCTL = Path("/proc/sys/net/ipv4/ip_forward")

    def __init__(self, state_path: Path) -> None:
        self.state_path = state_path
        self.previous: str | None = None

    def enable(self) -> None:
        self.previous = self._original() or self.SYSCTL.read_text().strip()
        write_private(self.state_path, f"{self.previous}\n".encode())
        self.SYSCTL.write_text("1")

    def restore(self) -> None:
        """Put back the original value: this run's, or a killed run's (state file)."""
        previous = self.previous or self._original()
        if previous is not None:
            self.SYSCTL.write_text(previous)
            self.state_path.unlink(missing_ok=True)
            self.previous = None

    def _original(self) -> str | None:
        try:
            value = self.state_path.read_text().strip()
        except OSError:
            return None
        return value if value in ("0", "1") else None


NC_RULE_COMMENT = "nc:{tun}"  # tags every iptables rule nc adds, so leftovers can be found


class GatewayNat:
    """Server option `gateway: true`, for one overlay: forward its traffic out of
    the uplink with source NAT, never into another overlay. Undone by disable().

    Every rule carries the comment nc:<tun>: rules a killed run left behind are
    found by it and removed before the rules are added again."""

    TABLES = ("filter", "nat")

    def __init__(self, overlay: ipaddress.IPv4Network, tun_name: str) -> None:
        self.tag = NC_RULE_COMMENT.format(tun=tun_name)
        tagged = ["-m", "comment", "--comment", self.tag]
        self.rules = [  # (table, verb, chain, match...)
            ["-t", "filter", "-I", "FORWARD", "-i", tun_name, "-o", "ncsrv+", *tagged, "-j", "DROP"],
            ["-t", "nat", "-A", "POSTROUTING", "-s", str(overlay), "!", "-o", tun_name, *tagged, "-j", "MASQUERADE"],
            ["-t", "filter", "-A", "FORWARD", "-i", tun_name, *tagged, "-j", "ACCEPT"],
            [
                "-t",
                "filter",
                "-A",
                "FORWARD",
                "-o",
                tun_name,
                "-m",
                "conntrack",
                "--ctstate",
                "RELATED,ESTABLISHED",
                *tagged,
                "-j",
                "ACCEPT",
            ],
        ]
        self.added: list[list[str]] = []

    def enable(self) -> None:
        remove_tagged_rules(lambda tag: tag == self.tag)  # a killed run's, for this TUN
        for rule in self.rules:
            run_tool("iptables", *rule)
            self.added.append(rule)

    def disable(self) -> None:
        while self.added:
            table, name, _, chain, *match = self.added.pop()
            with contextlib.suppress(TunError):
                run_tool("iptables", table, name, "-D", chain, *match)


def remove_tagged_rules(wanted: Callable[[str], bool]) -> int:
    """Delete the iptables rules whose nc comment tag is wanted; returns how many."""
    removed = 0
    for table in GatewayNat.TABLES:
        for line in run_tool("iptables", "-t", table, "-S").splitlines():
            verb, *rule = shlex.split(line)
            tags = [b for a, b in zip(rule, rule[1:]) if a == "--comment" and b.startswith("nc:")]
            if verb == "-A" and tags and wanted(tags[0]):
                run_tool("iptables", "-t", table, "-D", *rule)
                removed += 1
    if removed:
        log.info("removed %d iptables rule(s) an earlier nc run left", removed)
    return removed


def default_route_interface() -> str | None:
    try:
        lines = Path("/proc/net/route").read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) > 7 and fields[1] == "00000000" and fields[7] == "00000000":
            return fields[0]
    return None


def interface_ipv4(name: str) -> str | None:
    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), siocgifaddr, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def detect_server_ip() -> str:
    """The address of the default-route interface, else the first non-loopback IPv4."""
    iface = default_route_interface()
    if iface:
        ip = interface_ipv4(iface)
        if ip:
            return ip
    for _, name in socket.if_nameindex():
        ip = interface_ipv4(name)
        if ip and not ip.startswith("127."):
            return ip
    raise ConfigError("cannot find this host's IPv4 address; set server.ip in server.yml")


# ============================================================================
# 9. Wire protocol
#    Frames on the TLS stream: a 4-byte header (type:8, length:24) and a
#    payload. Handshake frames carry JSON objects whose unknown keys are
#    ignored; frame types >= 0x80 are optional and skipped by peers that do
#    not know them. Pure functions of bytes.
# ============================================================================


PROTOCOL_VERSION = 1


FRAME_HELLO = 0x01  # client -> server: who I am, what I can do


FRAME_WELCOME = 0x02  # server -> client: your address, MTU, routes, agreed capabilities


FRAME_ERROR = 0x03  # either way: why the session ends, and whether to retry


FRAME_PACKET = 0x10  # one IP packet


FRAME_KEEPALIVE = 0x11  # liveness, empty


FRAME_GSO_PACKET = 0x12  # virtio_net_hdr + a packet of up to 64 KiB (capability "gso")


FRAME_OPTIONAL = 0x80  # types from here up may be ignored by a peer that lacks them


FRAME_HEADER = struct.Struct("!I")


MAX_PAYLOAD = 65535 + 64


MAX_CONTROL_PAYLOAD = 4096


FRAME_TRANSPORT = 0x81  # node -> server over TLS (capability "udp"): the path it wants data on now


FRAME_REKEY = 0x82  # either way over TLS (capability "udp"): fresh X25519 shares for the datagram keys


FRAME_PEERS = 0x83  # over TLS (capability "direct"): node -> server its endpoints; server -> node peers added/removed


CAP_GSO = "gso"


CAP_UDP = "udp"  # the encrypted UDP data path; its keys travel in HELLO/WELCOME (udpKey, udpSession)


CAP_DIRECT = (
    "direct"  # node-to-node datagrams (with "udp"): the node's share for pair keys travels in HELLO (directKey)
)


CAP_GROUPS = "groups"  # datagrams may carry a frame sealed once across several (with "udp" and "gso")


CAPABILITIES: tuple[str, ...] = (
    CAP_GSO,
    CAP_UDP,
    CAP_DIRECT,
    CAP_GROUPS,
)  # negotiated per peer: offered in HELLO, agreed in WELCOME


# struct virtio_net_hdr (host byte order), as TUN with IFF_VNET_HDR reads and writes it.
VNET_HDR = struct.Struct("=BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset


VNET_HDR_LEN = VNET_HDR.size


ZERO_VNET_HDR = bytes(VNET_HDR_LEN)


VNET_F_NEEDS_CSUM = 0x01


VNET_F_DATA_VALID = 0x02


VNET_KNOWN_FLAGS = VNET_F_NEEDS_CSUM | VNET_F_DATA_VALID


GSO_NONE = 0


GSO_TCPV4 = 1


GSO_ECN = 0x80


GSO_TYPES = (GSO_NONE, GSO_TCPV4, GSO_TCPV4 | GSO_ECN)  # all the kernel hands us for IPv4 (TUNSETOFFLOAD)


# TCP payload per segment: a smaller gso_size makes one frame cost hundreds of segments
# (gso_size 1 would cut 65 000). Real peers send MTU-sized pieces; 500 leaves room for small MSS.
GSO_MIN_SIZE = 500


MAX_GSO_SEGMENTS = -(-MAX_PAYLOAD // GSO_MIN_SIZE)


TCP_CSUM_OFFSET = 16  # where the checksum field sits in a TCP header


UDP_CSUM_OFFSET = 6


class BadFrame(ProtocolError):
    """A data frame that breaks the protocol: dropped, and counted under `reason`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def encode_frame(kind: int, payload: bytes = b"") -> bytes:
    return FRAME_HEADER.pack(kind << 24 | len(payload)) + payload


def encode_control(kind: int, message: dict) -> bytes:
    payload = json.dumps(message, separators=(",", ":")).encode()
    if len(payload) > MAX_CONTROL_PAYLOAD:
        raise ProtocolError("control message too large")
    return encode_frame(kind, payload)


def next_frame(buf: Any, start: int, end: int) -> tuple[int, int, int] | None:
    """(type, payload_start, payload_end) of the frame at buf[start:end], or None
    if it is not complete yet. A declared length over the limit is an error."""
    if end - start < 4:
        return None
    word = FRAME_HEADER.unpack_from(buf, start)[0]
    kind, length = word >> 24, word & 0xFFFFFF
    if length > MAX_PAYLOAD or (kind < FRAME_PACKET and length > MAX_CONTROL_PAYLOAD):
        raise ProtocolError(f"frame type {kind:#x} declares {length} bytes, over the limit")
    if end - start - 4 < length:
        return None
    return kind, start + 4, start + 4 + length


def decode_control(payload: Any) -> dict:
    try:
        message = json.loads(bytes(payload))
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: hostile nesting
        raise ProtocolError("handshake message is not JSON") from None
    if not isinstance(message, dict):
        raise ProtocolError("handshake message is not a JSON object")
    return message


@dataclasses.dataclass(frozen=True)
class Hello:
    node_token: str
    version: str = VERSION
    caps: tuple[str, ...] = CAPABILITIES
    proto: int = PROTOCOL_VERSION
    net_token: str = ""  # empty: the default network (peers that predate networks send none)
    host_name: str = ""  # optional, for the operator's node list
    udp_key: bytes = b""  # the node's X25519 share for the datagram keys (with capability "udp")
    name: str = ""  # the name the node asks for (--name at its join); older nodes send none: their host name is used
    direct_key: bytes = b""  # the node's X25519 share for its peers' pair keys (with capability "direct")

    def encode(self) -> bytes:
        message = {"proto": self.proto, "nodeToken": self.node_token, "version": self.version, "caps": list(self.caps)}
        if self.direct_key:
            message["directKey"] = base64.b64encode(self.direct_key).decode()
        if self.net_token:
            message["netToken"] = self.net_token
        if self.host_name:
            message["hostName"] = self.host_name
        if self.udp_key:
            message["udpKey"] = base64.b64encode(self.udp_key).decode()
        if self.name:
            message["name"] = self.name  # an older server ignores it
        return encode_control(FRAME_HELLO, message)

    @classmethod
    def decode(cls, payload: Any) -> Hello:
        m = decode_control(payload)
        token, proto, caps = m.get("nodeToken"), m.get("proto"), m.get("caps", [])
        if not isinstance(token, str) or not valid_node_token(token):
            raise ProtocolError("hello carries no valid node-token")
        if not isinstance(proto, int) or proto < 1:
            raise ProtocolError("hello carries no protocol version")
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise ProtocolError("hello capabilities must be a list of strings")
        net_token = m.get("netToken", "")
        if not isinstance(net_token, str) or (net_token and not valid_net_token(net_token)):
            raise ProtocolError("hello carries a malformed net-token")
        host_name = m.get("hostName", "")
        if not isinstance(host_name, str):
            raise ProtocolError("hello host name must be a string")
        name = m.get("name", "")
        if not isinstance(name, str):
            raise ProtocolError("hello name must be a string")
        udp_key = decode_x25519_share(m.get("udpKey"))
        if CAP_UDP in caps and not udp_key:
            caps = [c for c in caps if c != CAP_UDP]  # no share, no datagram keys: the TLS path only
        direct_key = decode_x25519_share(m.get("directKey"))
        if CAP_DIRECT in caps and (not direct_key or CAP_UDP not in caps):
            caps = [c for c in caps if c != CAP_DIRECT]  # direct paths ride the datagram path, keyed by this share
        fields = (str(m.get("version", "?"))[:32], tuple(caps[:32]), proto, net_token, host_name[:64], udp_key)
        return cls(token, *fields, name=name[:63], direct_key=direct_key)


def decode_x25519_share(value: Any) -> bytes:
    """The 32 raw bytes of a base64 X25519 public key from a handshake message, or b"" if absent or malformed."""
    if not isinstance(value, str) or len(value) != 44:
        return b""
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        return b""
    return raw if len(raw) == X25519_SHARE_LEN else b""


MAX_WELCOME_ROUTES = 256


@dataclasses.dataclass(frozen=True)
class Welcome:
    ip: str
    prefix: int
    server_ip: str
    mtu: int
    keepalive: int
    routes: tuple[str, ...] = ()
    caps: tuple[str, ...] = ()
    replicas: tuple[str, ...] = ()  # every server replica's underlay address (optional key)
    udp_key: bytes = b""  # the server's X25519 share (capability "udp")
    udp_session: int = 0  # the session id every datagram of this session carries
    udp_port: int = 0  # where the server takes datagrams

    @property
    def interface(self) -> ipaddress.IPv4Interface:
        return ipaddress.IPv4Interface(f"{self.ip}/{self.prefix}")

    def encode(self) -> bytes:
        message = {
            "proto": PROTOCOL_VERSION,
            "ip": self.ip,
            "prefix": self.prefix,
            "serverIp": self.server_ip,
            "mtu": self.mtu,
            "keepalive": self.keepalive,
            "routes": list(self.routes),
            "caps": list(self.caps),
        }
        if self.replicas:
            message["replicas"] = list(self.replicas)
        if CAP_UDP in self.caps:
            message.update(
                udpKey=base64.b64encode(self.udp_key).decode(), udpSession=self.udp_session, udpPort=self.udp_port
            )
        return encode_control(FRAME_WELCOME, message)

    @classmethod
    def decode(cls, payload: Any) -> Welcome:
        m = decode_control(payload)
        strings = lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)  # noqa: E731
        integers = [m.get("prefix"), m.get("mtu"), m.get("keepalive", 10)]
        if (
            not isinstance(m.get("ip"), str)
            or not isinstance(m.get("serverIp"), str)
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in integers)
            or not strings(m.get("routes", []))
            or not strings(m.get("caps", []))
        ):
            raise ProtocolError("welcome message is incomplete or has fields of the wrong type")
        if len(m.get("routes", [])) > MAX_WELCOME_ROUTES:
            raise ProtocolError(f"welcome message has over {MAX_WELCOME_ROUTES} routes")
        try:
            welcome = cls(
                ip=str(ipaddress.IPv4Address(m["ip"])),
                prefix=m["prefix"],
                server_ip=str(ipaddress.IPv4Address(m["serverIp"])),
                mtu=m["mtu"],
                keepalive=m.get("keepalive", 10),
                routes=tuple(dict.fromkeys(str(ipaddress.IPv4Network(r)) for r in m.get("routes", []))),
                caps=tuple(m.get("caps", [])),
                replicas=welcome_replicas(m.get("replicas", [])),
            )
        except ValueError:
            raise ProtocolError("welcome message has a malformed address or route") from None
        if CAP_UDP in welcome.caps:
            welcome = dataclasses.replace(welcome, **udp_welcome_fields(m))
        if not 8 <= welcome.prefix <= 30 or not 576 <= welcome.mtu <= 65535 or not 1 <= welcome.keepalive <= 3600:
            raise ProtocolError("welcome message has out-of-range values")
        welcome.check_addresses()
        return welcome

    def check_addresses(self) -> None:
        """A unicast host address, the server another host of the same subnet, and routes
        that stay clear of special-purpose ranges: what a node can configure safely."""
        iface, server = self.interface, ipaddress.IPv4Address(self.server_ip)
        net = iface.network
        ends = (net.network_address, net.broadcast_address)
        if special_range(net) or iface.ip in ends:
            raise ProtocolError(f"welcome message gives the unusable address {iface}")
        if server not in net or server == iface.ip or server in ends:
            raise ProtocolError(f"welcome message names {server} as the server, which is not another host of {net}")
        for route in map(ipaddress.IPv4Network, self.routes):
            if special := special_range(route):
                raise ProtocolError(f"welcome message has the route {route}, which overlaps {special}")


def welcome_replicas(value: Any) -> tuple[str, ...]:
    """The welcome's optional replica list: addresses only, at most MAX_WELCOME_REPLICAS;
    anything else is ignored (a node then keeps the replicas it knows)."""
    if not isinstance(value, list) or len(value) > MAX_WELCOME_REPLICAS:
        return ()
    with contextlib.suppress(ValueError, TypeError):
        return tuple(dict.fromkeys(str(ipaddress.ip_address(v)) for v in value if isinstance(v, str)))
    return ()


def udp_welcome_fields(m: dict) -> dict:
    """The datagram fields of a welcome that agreed on "udp"; a malformed one is a protocol error."""
    key, session, port = decode_x25519_share(m.get("udpKey")), m.get("udpSession"), m.get("udpPort")
    integers = all(isinstance(v, int) and not isinstance(v, bool) for v in (session, port))
    if not key or not integers or not 0 < session <= 0xFFFFFFFF or not 0 < port <= 65535:
        raise ProtocolError("welcome message agrees on udp without a valid udpKey, udpSession and udpPort")
    return {"udp_key": key, "udp_session": session, "udp_port": port}


@dataclasses.dataclass(frozen=True)
class Refusal:
    """An ERROR frame: the session ends; retry says whether reconnecting can help."""

    code: str
    reason: str
    retry: bool
    leader: str = ""  # a standby replica names the leader's underlay address (optional key)

    def encode(self) -> bytes:
        message = {"code": self.code, "reason": self.reason, "retry": self.retry}
        if self.leader:
            message["leader"] = self.leader
        return encode_control(FRAME_ERROR, message)

    @classmethod
    def decode(cls, payload: Any) -> Refusal:
        m = decode_control(payload)
        retry = m.get("retry", True) is not False  # only a JSON false ends the retries, not "false" or 0
        leader = m.get("leader", "")
        try:
            leader = str(ipaddress.ip_address(leader)) if isinstance(leader, str) and leader else ""
        except ValueError:
            leader = ""  # not an address: ignored, the node tries its other replicas
        return cls(str(m.get("code", "error"))[:64], str(m.get("reason", "no reason given"))[:512], retry, leader)


def ipv4_endpoints(packet: Any) -> tuple[int, int] | None:
    """(src, dst) of a well-formed IPv4 packet, else None (IPv6, runts, bad headers)."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    header_len = (packet[0] & 0x0F) * 4
    total = packet[2] << 8 | packet[3]
    if header_len < 20 or total < header_len or total > len(packet):
        return None
    return int.from_bytes(packet[12:16], "big"), int.from_bytes(packet[16:20], "big")


def check_packet(packet: Any, mtu: int) -> tuple[int, int]:
    """(src, dst) of a PACKET frame's packet from a peer; raises BadFrame unless it is
    a well-formed IPv4 packet within the MTU."""
    if len(packet) > mtu:
        raise BadFrame("oversized", f"a {len(packet)}-byte packet over the MTU {mtu}")
    endpoints = ipv4_endpoints(packet)
    if endpoints is None:
        raise BadFrame("not-ipv4", "a packet that is not well-formed IPv4")
    return endpoints


def gso_header(payload: Any, mtu: int) -> bytes:
    """The virtio_net_hdr to pass on with a GSO frame's packet: rebuilt from the peer's
    fields once each is checked against the packet, so nothing the peer chose reaches a
    kernel unchecked. Raises BadFrame otherwise.

    What passing guarantees: one whole IPv4 packet; a checksum the kernel (or
    plain_packets) writes lands on the TCP or UDP checksum field, never inside the IP
    header, where it could forge the source address after the anti-spoof check (and
    segmentation copies the addresses as they are); segmentation makes at most
    MAX_GSO_SEGMENTS pieces, none over the MTU. A few integer comparisons, no byte loop."""
    if len(payload) < VNET_HDR_LEN + 20:
        raise BadFrame("runt", "a GSO frame shorter than its headers")
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = VNET_HDR.unpack_from(payload)
    length = len(payload) - VNET_HDR_LEN
    first, proto = payload[VNET_HDR_LEN], payload[VNET_HDR_LEN + 9]
    ihl = (first & 0x0F) * 4
    total = payload[VNET_HDR_LEN + 2] << 8 | payload[VNET_HDR_LEN + 3]
    if first >> 4 != 4 or not 20 <= ihl <= length or total != length:
        raise BadFrame("not-ipv4", "a GSO frame that does not carry one whole IPv4 packet")
    if flags & ~VNET_KNOWN_FLAGS or gso_type not in GSO_TYPES:
        raise BadFrame("gso-type", f"virtio_net_hdr flags {flags:#x}, gso_type {gso_type:#x}: not ones nc uses")
    if hdr_len > length:
        raise BadFrame("gso-hdr-len", f"hdr_len {hdr_len} beyond the {length}-byte packet")
    l4_len, csum_field = 0, -1  # transport header length, offset of its checksum field
    if proto == socket.IPPROTO_TCP and length >= ihl + 20:
        l4_len, csum_field = (payload[VNET_HDR_LEN + ihl + 12] >> 4) * 4, TCP_CSUM_OFFSET
        if l4_len < 20 or ihl + l4_len > length:
            raise BadFrame("not-ipv4", "a TCP header that does not fit its packet")
    elif proto == socket.IPPROTO_UDP and length >= ihl + 8:
        l4_len, csum_field = 8, UDP_CSUM_OFFSET
    if flags & VNET_F_NEEDS_CSUM:
        if csum_start != ihl or csum_offset != csum_field:
            raise BadFrame(
                "gso-csum", f"csum_start {csum_start}, csum_offset {csum_offset}: not the transport checksum"
            )
    else:
        csum_start = csum_offset = 0
    if gso_type == GSO_NONE:
        if length > mtu:
            raise BadFrame("oversized", f"a {length}-byte packet over the MTU {mtu}")
        gso_size = 0
    elif csum_field != TCP_CSUM_OFFSET:
        raise BadFrame("gso-type", "TCP segmentation asked for a packet that is not TCP")
    elif not GSO_MIN_SIZE <= gso_size <= mtu - ihl - l4_len:
        raise BadFrame("gso-size", f"gso_size {gso_size} outside {GSO_MIN_SIZE}..{mtu - ihl - l4_len}")
    elif length - ihl - l4_len > MAX_GSO_SEGMENTS * gso_size:  # implied by the bounds above; kept should they move
        raise BadFrame("gso-segments", f"over {MAX_GSO_SEGMENTS} segments")
    return VNET_HDR.pack(flags, gso_type, ihl + l4_len, gso_size, csum_start, csum_offset)


def ones_sum(data: Any) -> int:
    """The ones' complement sum of the 16-bit words (RFC 1071), folded: the value of the
    whole buffer modulo 0xFFFF, because 0x10000 = 1 (mod 0xFFFF)."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    return int.from_bytes(data, "big") % 0xFFFF


def checksum(data: Any) -> int:
    """Internet checksum (RFC 1071)."""
    return 0xFFFF - ones_sum(data)


def plain_packets(payload: Any) -> list[bytes]:
    """The ordinary packets in a GSO frame payload (virtio_net_hdr + packet), for
    a peer without offload: a TCP super-segment is cut into gso_size pieces with
    their own headers and checksums; a partial checksum is completed. A peer's
    frame must have passed gso_header first."""
    if len(payload) < VNET_HDR_LEN:
        return []
    flags, gso_type, _, gso_size, csum_start, csum_offset = VNET_HDR.unpack_from(payload)
    packet = payload[VNET_HDR_LEN:]
    if gso_type & ~GSO_ECN == GSO_TCPV4 and gso_size > 0:
        return segment_tcp4(packet, gso_size)
    if gso_type != GSO_NONE:
        return []  # nothing else is negotiated with the kernel (TSO6 packets are not IPv4 overlay traffic)
    if flags & VNET_F_NEEDS_CSUM:
        field = csum_start + csum_offset
        if field + 2 > len(packet):
            return []
        fixed = bytearray(packet)
        fixed[field : field + 2] = checksum(fixed[csum_start:]).to_bytes(2, "big")
        return [bytes(fixed)]
    return [bytes(packet)]


def plain_frames(payload: Any) -> list[bytes]:
    """PACKET frames for a peer without offload, from a GSO frame payload."""
    return [encode_frame(FRAME_PACKET, p) for p in plain_packets(payload)]


def tcp4_pieces(packet: Any, mss: int) -> Iterator[tuple[bytearray, bytearray, Any, bytes]]:
    """Software TSO for one IPv4/TCP super-segment: each piece's IP header (length, id
    and checksum set), TCP header (sequence and flags set, checksum zero), payload,
    and pseudo-header; nothing for a malformed packet."""
    if len(packet) < 40 or packet[0] >> 4 != 4 or packet[9] != socket.IPPROTO_TCP:
        return
    ihl = (packet[0] & 0x0F) * 4
    thl = (packet[ihl + 12] >> 4) * 4 if len(packet) > ihl + 12 else 0
    if ihl < 20 or thl < 20 or len(packet) < ihl + thl:
        return
    ip_header, tcp_header, data = bytes(packet[:ihl]), bytes(packet[ihl : ihl + thl]), packet[ihl + thl :]
    ip_id = int.from_bytes(ip_header[4:6], "big")
    seq = int.from_bytes(tcp_header[4:8], "big")
    tcp_flags = tcp_header[13]
    pseudo_base = ip_header[12:20] + bytes((0, socket.IPPROTO_TCP))
    for index, offset in enumerate(range(0, len(data), mss)):
        chunk = data[offset : offset + mss]
        last = offset + mss >= len(data)
        ip = bytearray(ip_header)
        ip[2:4] = (ihl + thl + len(chunk)).to_bytes(2, "big")
        ip[4:6] = ((ip_id + index) & 0xFFFF).to_bytes(2, "big")
        ip[10:12] = b"\0\0"
        ip[10:12] = checksum(ip).to_bytes(2, "big")
        tcp = bytearray(tcp_header)
        tcp[4:8] = ((seq + offset) & 0xFFFFFFFF).to_bytes(4, "big")
        flags = tcp_flags if last else tcp_flags & ~0x09  # FIN and PSH only on the last piece
        tcp[13] = flags if index == 0 else flags & ~0x80  # CWR only on the first
        tcp[16:18] = b"\0\0"
        yield ip, tcp, chunk, pseudo_base + (thl + len(chunk)).to_bytes(2, "big")


def segment_tcp4_partial(packet: Any, mss: int) -> list[bytes]:
    """segment_tcp4 for a peer whose kernel completes TCP checksums: each piece a GSO
    frame (GSO_NONE, NEEDS_CSUM) whose checksum field holds only the pseudo-header sum."""
    frames = []
    for ip, tcp, chunk, pseudo in tcp4_pieces(packet, mss):
        tcp[16:18] = ones_sum(pseudo).to_bytes(2, "big")
        vnet = VNET_HDR.pack(VNET_F_NEEDS_CSUM, GSO_NONE, len(ip) + len(tcp), 0, len(ip), TCP_CSUM_OFFSET)
        body = vnet + ip + tcp + chunk
        frames.append(FRAME_HEADER.pack(FRAME_GSO_PACKET << 24 | len(body)) + body)
    return frames


def segment_tcp4(packet: Any, mss: int) -> list[bytes]:
    """Software TSO for one IPv4/TCP super-segment (nothing for an mss so small
    that one packet would cost hundreds of segments)."""
    if mss < GSO_MIN_SIZE:
        return []
    segments = []
    for ip, tcp, chunk, pseudo in tcp4_pieces(packet, mss):
        tcp[16:18] = checksum(pseudo + tcp + chunk).to_bytes(2, "big")
        segments.append(bytes(ip + tcp + chunk))
    return segments


# Userspace GRO: a run of consecutive TCP segments of one flow becomes one super-packet
# for a TUN with offload, so the kernel's TCP takes 64 KiB per write, as from the stream.
TCP_ACK, TCP_PSH = 0x10, 0x08


GRO_MAX_LENGTH = 65535


def tcp4_flow(buffer: Any) -> tuple[bytes, int, int, int, int] | None:
    """(flow key, seq, ihl + thl, payload length, tcp flags) of a virtio_net_hdr + plain
    IPv4/TCP segment that may be coalesced (no GSO, no IP options or fragments, only
    ACK/PSH set, some payload), else None."""
    if len(buffer) < VNET_HDR_LEN + 40 or buffer[1] != GSO_NONE:
        return None
    packet = memoryview(buffer)[VNET_HDR_LEN:]
    if packet[0] != 0x45 or packet[9] != socket.IPPROTO_TCP or packet[6] & 0x3F or packet[7]:
        return None
    total = packet[2] << 8 | packet[3]
    thl = (packet[32] >> 4) * 4
    flags = packet[33]
    if total != len(packet) or thl < 20 or 20 + thl >= total or flags & ~(TCP_ACK | TCP_PSH) or not flags & TCP_ACK:
        return None
    # Everything that must match across a run: TOS, TTL, addresses, ports, ack, window, options.
    key = bytes(packet[1:2]) + bytes(packet[8:9]) + bytes(packet[12:24]) + bytes(packet[28:32]) + bytes(packet[34:36])
    key += bytes(packet[40 : 20 + thl])
    return key, int.from_bytes(packet[24:28], "big"), 20 + thl, total - 20 - thl, flags


def coalesce_tcp4(buffers: list[bytes]) -> list[bytes]:
    """What to write to a TUN with offload, in order, for these virtio_net_hdr + packet
    buffers (headers already checked): each run of consecutive full-sized segments of one
    flow as one GSO super-packet (the last may be shorter or carry PSH), the rest as they are."""
    out: list[bytes] = []
    run: list[bytes] = []
    run_key, next_seq, mss, length, closed = b"", 0, 0, 0, True
    for buffer in buffers:
        flow = tcp4_flow(buffer)
        if flow is not None and run and not closed:
            key, seq, headers, payload, flags = flow
            if key == run_key and seq == next_seq and payload <= mss and length + payload <= GRO_MAX_LENGTH:
                run.append(buffer)
                next_seq, length = (seq + payload) & 0xFFFFFFFF, length + payload
                closed = payload < mss or bool(flags & TCP_PSH)
                continue
        if run:
            out.append(gro_packet(run, mss))
            run = []
        if flow is None:
            out.append(buffer)
            continue
        key, seq, headers, payload, flags = flow
        run, run_key, mss = [buffer], key, payload
        next_seq, length, closed = (seq + payload) & 0xFFFFFFFF, headers + payload, bool(flags & TCP_PSH)
    if run:
        out.append(gro_packet(run, mss))
    return out


def gro_packet(run: list[Any], mss: int) -> bytes:
    """One super-packet (virtio_net_hdr + IPv4/TCP) from a run coalesce_tcp4 chose."""
    if len(run) == 1:
        return run[0]
    first = memoryview(run[0])[VNET_HDR_LEN:]
    headers = 20 + (first[32] >> 4) * 4
    body = b"".join(memoryview(p)[VNET_HDR_LEN + headers :] for p in run)
    return super_packet_headers(first, headers, len(body), run[-1][VNET_HDR_LEN + 33] & TCP_PSH, mss) + body


def super_packet_headers(first: Any, headers: int, payload: int, last_flags: int, mss: int) -> bytes:
    """virtio_net_hdr + IPv4 + TCP headers of a super-packet joined from segments: the
    first segment's headers (`first` starts at its IPv4 header, `headers` long) with the
    length and IP checksum for `payload` bytes, the last segment's `last_flags` added, and
    only the pseudo-header sum in the TCP checksum field (NEEDS_CSUM: the kernel adds the
    rest as it cuts the packet again)."""
    ip = bytearray(first[:20])
    ip[2:4] = (headers + payload).to_bytes(2, "big")
    ip[10:12] = b"\0\0"
    ip[10:12] = checksum(ip).to_bytes(2, "big")
    tcp = bytearray(first[20:headers])
    tcp[13] |= last_flags
    pseudo = bytes(ip[12:20]) + bytes((0, socket.IPPROTO_TCP)) + (headers - 20 + payload).to_bytes(2, "big")
    tcp[16:18] = ones_sum(pseudo).to_bytes(2, "big")
    gso_type = GSO_TCPV4 | (GSO_ECN if tcp[13] & 0x80 else 0)  # CWR: the kernel keeps it on the first segment
    return VNET_HDR.pack(VNET_F_NEEDS_CSUM, gso_type, headers, mss, 20, TCP_CSUM_OFFSET) + ip + tcp


class FrameBuffer:
    """Receive buffer: bytes from TLS go in at the end, whole frames come out."""

    def __init__(self, size: int = 4 * (MAX_PAYLOAD + 4)) -> None:
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0

    def space(self) -> memoryview:
        if self.start == self.end:
            self.start = self.end = 0
        elif len(self.buf) - self.end < MAX_PAYLOAD + 4:
            size = self.end - self.start
            self.buf[0:size] = self.buf[self.start : self.end]
            self.start, self.end = 0, size
        return self.view[self.end :]

    def commit(self, count: int) -> None:
        self.end += count

    def ready(self) -> bool:
        """Whether frames() has news: a whole frame, or a header next_frame refuses (frames()
        raises it). A 64 KiB frame spans four TLS records; the stream hands it over once,
        not once a record."""
        try:
            return next_frame(self.buf, self.start, self.end) is not None
        except ProtocolError:
            return True

    def frames(self) -> Iterator[tuple[int, int, int]]:
        """(type, payload_start, payload_end) offsets into self.view, consumed as yielded."""
        while (frame := next_frame(self.buf, self.start, self.end)) is not None:
            self.start = frame[2]
            yield frame


# -- datagrams -------------------------------------------------------------------------
# The UDP data path: every datagram is header || AEAD(frame), the header being the AEAD's
# associated data. The header names the session (so a node that changes address or NAT
# mapping keeps its session) and a 64-bit counter that is the nonce: one key per direction
# and a counter that only grows, so no nonce ever repeats under a key.

DATAGRAM_HEADER = struct.Struct("!BxxxIQ")  # type, session id, counter


NONCE = struct.Struct("<Q4x")  # the counter as AES-GCM's 96-bit nonce


DATAGRAM_SEALED = 0x01


DATAGRAM_TAG_LEN = 16


DATAGRAM_MIN = DATAGRAM_HEADER.size + DATAGRAM_TAG_LEN + 4  # an empty frame, sealed: header, frame header, tag


# A frame too big for one datagram (a TCP super-packet, capability "groups") is sealed once
# and its sealed bytes cut into a group of datagrams, each naming its index and the group's
# size in DATAGRAM_HEADER's spare bytes and its own counter; the group's nonce is its first
# datagram's counter, and its associated data the header of index 0. The receiver opens a
# group once all of it came, in order: one AEAD call and no segmenting per 64 KiB instead
# of one each per segment. One datagram lost loses the group, so senders group only on a
# clean link (GroupGate, section 10).
DATAGRAM_GROUPED = 0x02


GROUP_HEADER = struct.Struct("!BBBxIQ")  # type, index, count, session id, counter


GROUP_MAX_COUNT = 255


GROUP_MAX_SEALED = 4 + MAX_PAYLOAD + DATAGRAM_TAG_LEN  # the largest frame, sealed


GROUP_CHUNK_EXTRA = 6 + 4 + DATAGRAM_TAG_LEN  # a group's datagram is as long as the longest TSO piece's


def group_chunk(mtu: int) -> int:
    """Sealed bytes per datagram of a group, for a path of this MTU."""
    return mtu + GROUP_CHUNK_EXTRA


X25519_SHARE_LEN = 32


# A key is replaced over TLS long before its counter could wrap, within AES-GCM's bound
# for one key (RFC 8446 5.5: 2^24.5 full-size records), and often enough that a stolen
# key reads little traffic.
REKEY_AFTER_DATAGRAMS = 1 << 24


REKEY_AFTER_S = 120.0


COUNTER_LIMIT = (1 << 64) - 1  # never sealed: seal refuses before the counter could repeat


REPLAY_WINDOW = 4096  # datagrams a counter may lag the newest and still count as reordered, not replayed


class BadDatagram(ProtocolError):
    """A datagram that did not authenticate: dropped, and counted under `reason`."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"datagram dropped: {reason}")
        self.reason = reason


class ReplayWindow:
    """RFC 6479's sliding window: the newest counter seen and, for the `size` counters
    below it, whether each arrived, kept in a ring of 64-bit words so moving on clears
    a word at a time instead of shifting one long bitmap. `fresh` is asked before the
    tag check (a replay costs no decryption); `accept` only after it (a forgery moves
    nothing)."""

    def __init__(self, size: int = REPLAY_WINDOW) -> None:
        self.size = size
        self.top = -1
        # A power of two of blocks of 64 counters, more than the window's counters span.
        self.mask = (1 << (-(-size // 64)).bit_length()) - 1
        self.words = [0] * (self.mask + 1)

    def fresh(self, counter: int) -> bool:
        behind = self.top - counter
        return behind < 0 or (behind < self.size and not self.words[counter >> 6 & self.mask] >> (counter & 63) & 1)

    def accept(self, counter: int) -> None:
        if counter > self.top:
            block, newest = counter >> 6, self.top >> 6
            if block != newest:
                for skipped in range(max(newest + 1, block - self.mask), block + 1):
                    self.words[skipped & self.mask] = 0
            self.top = counter
        self.words[counter >> 6 & self.mask] |= 1 << (counter & 63)

    def accept_run(self, first: int, count: int) -> None:
        """accept() for first, first + 1, ... (count of them), all newer than the newest
        so far: a word of bits at a time."""
        last = first + count - 1
        block, newest = last >> 6, self.top >> 6
        for skipped in range(max(newest + 1, block - self.mask), block + 1):
            self.words[skipped & self.mask] = 0
        self.top = last
        counter = max(first, (block - self.mask) << 6)  # older ones left the ring already
        while counter <= last:
            end = min(last, counter | 63)
            self.words[counter >> 6 & self.mask] |= ((1 << (end - counter + 1)) - 1) << (counter & 63)
            counter = end + 1


def new_x25519() -> tuple[Any, bytes]:
    """A fresh X25519 private key and its 32-byte public share."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    private = X25519PrivateKey.generate()
    return private, private.public_key().public_bytes_raw()


def datagram_keys(private: Any, peer_share: bytes, transcript: bytes) -> tuple[bytes, bytes]:
    """(node-to-server key, server-to-node key): HKDF-SHA256 over the X25519 secret,
    salted with a hash of the transcript (both shares, the session id, the node), so a
    key belongs to this exchange alone. Raises BadDatagram("bad-share") for a share
    that gives the all-zero secret."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    try:
        secret = private.exchange(X25519PublicKey.from_public_bytes(peer_share))
    except ValueError:
        raise BadDatagram("bad-share") from None
    salt = hashlib.sha256(transcript).digest()
    okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=salt, info=b"nc udp data path v1").derive(secret)
    return okm[:32], okm[32:]


def datagram_transcript(node_share: bytes, server_share: bytes, session_id: int, node_token: str) -> bytes:
    return b"nc-udp|" + node_share + server_share + session_id.to_bytes(4, "big") + node_token.encode()


class DatagramKeys:
    """One direction pair of a session's datagram keys: seal with one, open with the other."""

    def __init__(self, session_id: int, send_key: bytes, receive_key: bytes) -> None:
        # AES-256-GCM: with AES-NI about three times faster here than ChaCha20-Poly1305.
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self.session_id = session_id
        self.forged = InvalidTag  # what a failed tag check raises (imported here, off the hot path)
        self.sealer = AESGCM(send_key)
        self.opener = AESGCM(receive_key)
        self.sent = 0  # the next counter to seal with
        self.window = ReplayWindow()
        self.received = 0  # datagrams opened or come in a group (with window.top: how many never came, LossMeter)
        self.gaps = 0  # times a datagram came past the newest + 1: loss events (a burst of losses is one)
        self.born = time.monotonic()
        # The group being received: its first counter, size in datagrams, sealed parts so far
        # (copies: a read's buffer is reused), and the bytes of its datagrams.
        self.group_first = self.group_count = self.group_size = 0
        self.group_parts: list[bytes] = []

    @classmethod
    def for_node(cls, session_id: int, node_to_server: bytes, server_to_node: bytes) -> DatagramKeys:
        return cls(session_id, node_to_server, server_to_node)

    @classmethod
    def for_server(cls, session_id: int, node_to_server: bytes, server_to_node: bytes) -> DatagramKeys:
        return cls(session_id, server_to_node, node_to_server)

    def worn(self, now: float) -> bool:
        """Time to agree on fresh keys (over TLS)."""
        return self.sent >= REKEY_AFTER_DATAGRAMS or now - self.born >= REKEY_AFTER_S

    def seal(self, frames: list[Any], chunk: int = 0) -> list[bytes]:
        """Each frame as its own datagram, under consecutive counters; with `chunk` (the
        peer takes groups) a frame whose sealed form is longer goes as a group."""
        if chunk and max(map(len, frames)) + DATAGRAM_TAG_LEN > chunk:
            return self._seal_mixed(frames, chunk)
        counter, end = self.sent, self.sent + len(frames)
        if end > COUNTER_LIMIT:
            raise BadDatagram("counter-exhausted")
        counters = range(counter, end)
        # map() over C callables: no Python frame per datagram.
        repeat = itertools.repeat
        headers = list(map(DATAGRAM_HEADER.pack, repeat(DATAGRAM_SEALED), repeat(self.session_id), counters))
        bodies = map(self.sealer.encrypt, map(NONCE.pack, counters), frames, headers)
        self.sent = end
        return list(map(operator.add, headers, bodies))

    def _seal_mixed(self, frames: list[Any], chunk: int) -> list[bytes]:
        sealed: list[bytes] = []
        small: list[Any] = []
        for frame in frames:
            if len(frame) + DATAGRAM_TAG_LEN <= chunk:
                small.append(frame)
                continue
            if small:
                sealed += self.seal(small)
                small = []
            sealed += self.seal_group(frame, chunk)
        return sealed + self.seal(small) if small else sealed

    def seal_group(self, frame: Any, chunk: int) -> list[bytes]:
        """One frame sealed once, cut into datagrams of `chunk` sealed bytes (the last
        maybe shorter) under consecutive counters."""
        first, count = self.sent, -(-(len(frame) + DATAGRAM_TAG_LEN) // chunk)
        if first + count > COUNTER_LIMIT:  # count: at most 110 (an MTU is at least 576)
            raise BadDatagram("counter-exhausted")
        aad = GROUP_HEADER.pack(DATAGRAM_GROUPED, 0, count, self.session_id, first)
        sealed = memoryview(self.sealer.encrypt(NONCE.pack(first), bytes(frame), aad))
        self.sent = first + count
        repeat = itertools.repeat
        headers = map(
            GROUP_HEADER.pack,
            repeat(DATAGRAM_GROUPED),
            range(count),
            repeat(count),
            repeat(self.session_id),
            range(first, first + count),
        )
        return list(
            map(operator.add, headers, [sealed[start : start + chunk] for start in range(0, len(sealed), chunk)])
        )

    def open_run(self, datagrams: list[Any], first: int) -> list[bytes] | None:
        """The frames of datagrams of this session whose headers name first, first + 1,
        ... (a read's usual content), opened together when all are newer than any seen
        (else None, nothing checked): the frames of the longest prefix that authenticates.
        The datagram after it (if any) failed its tag check; the rest are unopened."""
        if first <= self.window.top:
            return None
        start = DATAGRAM_HEADER.size
        frames: list[bytes] = []
        with contextlib.suppress(self.forged):  # the frames before the forged datagram stay
            frames.extend(
                map(
                    self.opener.decrypt,
                    map(NONCE.pack, range(first, first + len(datagrams))),
                    [datagram[start:] for datagram in datagrams],
                    [datagram[:start] for datagram in datagrams],
                )
            )
        if frames:
            self.gaps += first > self.window.top + 1
            self.window.accept_run(first, len(frames))
            self.received += len(frames)
        return frames

    def open(self, datagram: Any, counter: int) -> bytes:
        """The one frame inside a datagram of this session whose header names `counter`
        (datagram_header); raises BadDatagram (replayed, too old, forged, not one frame)
        at the cost of at most one tag check."""
        if not self.window.fresh(counter):
            raise BadDatagram("replayed")
        try:
            frame = self.opener.decrypt(
                NONCE.pack(counter), datagram[DATAGRAM_HEADER.size :], datagram[: DATAGRAM_HEADER.size]
            )
        except self.forged:
            raise BadDatagram("forged") from None
        self.gaps += counter > self.window.top + 1
        self.window.accept(counter)
        self.received += 1
        if not one_frame(frame):
            raise BadDatagram("not-one-frame")  # authentic, so the peer is broken: counted, not fatal
        return frame

    def add_to_group(self, datagrams: list[Any], index: int, count: int, counter: int) -> tuple[bytes | None, int]:
        """Consecutive datagrams of one group, the first of them `index` of `count` under
        `counter`: (the group's frame once all of it came, else None; the bytes of all its
        datagrams). Raises BadDatagram for a datagram that does not continue the group
        being received (which is then given up) and for a group that does not open."""
        first = counter - index
        if index == 0:
            if count > GROUP_MAX_COUNT or count < 2 or not self._fresh_run(first, count):
                self.group_parts = []
                raise BadDatagram("replayed" if count <= GROUP_MAX_COUNT else "malformed")
            self.group_first, self.group_count, self.group_parts, self.group_size = first, count, [], 0
        elif not self.group_parts or (first, count, index) != (
            self.group_first,
            self.group_count,
            len(self.group_parts),
        ):
            self.group_parts = []
            self.received += len(datagrams)  # they came: one before them did not
            raise BadDatagram("group-incomplete")
        # Counted as they come, not when the group opens: the loss a LossMeter sees is of
        # datagrams on the link, not a lost one times its group's size.
        self.received += len(datagrams)
        start = GROUP_HEADER.size
        self.group_parts += [bytes(datagram[start:]) for datagram in datagrams]
        self.group_size += sum(map(len, datagrams))
        if len(self.group_parts) < count:
            if self.group_size - len(self.group_parts) * start > GROUP_MAX_SEALED:
                self.group_parts = []
                raise BadDatagram("malformed")
            return None, 0
        parts, self.group_parts = self.group_parts, []
        return self._open_group(first, count, b"".join(parts)), self.group_size

    def _fresh_run(self, first: int, count: int) -> bool:
        window = self.window
        return first > window.top or all(map(window.fresh, range(first, first + count)))

    def _open_group(self, first: int, count: int, sealed: bytes) -> bytes:
        aad = GROUP_HEADER.pack(DATAGRAM_GROUPED, 0, count, self.session_id, first)
        try:
            frame = self.opener.decrypt(NONCE.pack(first), sealed, aad)
        except self.forged:
            raise BadDatagram("forged") from None
        if not self._fresh_run(first, count):  # a rekey's or reordered datagrams came meanwhile
            raise BadDatagram("replayed")
        if first > self.window.top:
            self.gaps += first > self.window.top + 1
            self.window.accept_run(first, count)
        else:
            for counter in range(first, first + count):
                self.window.accept(counter)
        if not one_frame(frame):
            raise BadDatagram("not-one-frame")
        return frame


def datagram_header(datagram: Any) -> tuple[int, int] | None:
    """(session id, counter) of a datagram long enough to be sealed, else None."""
    if len(datagram) < DATAGRAM_MIN or datagram[0] != DATAGRAM_SEALED:
        return None
    _kind, session_id, counter = DATAGRAM_HEADER.unpack_from(datagram)
    return session_id, counter


def one_frame(frame: Any) -> bool:
    """An opened datagram holds exactly one frame: its length field agrees."""
    return len(frame) >= 4 and int.from_bytes(frame[1:4], "big") == len(frame) - 4


def whole_frames(frames: list[bytes]) -> bool:
    """one_frame() of every frame, in C loops."""
    try:
        words = [word & 0xFFFFFF for (word,) in map(FRAME_HEADER.unpack_from, frames)]
    except struct.error:
        return False
    return words == [length - 4 for length in map(len, frames)]


def split_runs(datagrams: list[Any]) -> tuple[int, list[tuple[int, int, int]]] | None:
    """A read of one session's sealed datagrams as (session id, [(start, end, first
    counter) of each run under consecutive counters]): usually one run, and a datagram
    lost on the way splits it in two; None for a read holding anything else. Compared
    in C loops but for the one step per datagram that finds the breaks."""
    if min(map(len, datagrams)) < DATAGRAM_MIN:
        return None
    headers = list(map(DATAGRAM_HEADER.unpack_from, datagrams))
    session_id = headers[0][1]
    if list(map(operator.itemgetter(0, 1), headers)) != [(DATAGRAM_SEALED, session_id)] * len(headers):
        return None
    counters = list(map(operator.itemgetter(2), headers))
    breaks = [index for index, step in enumerate(map(operator.sub, counters[1:], counters), 1) if step != 1]
    bounds = [0, *breaks, len(datagrams)]
    return session_id, [(start, end, counters[start]) for start, end in zip(bounds, bounds[1:])]


def cut_at_groups(datagrams: list[Any]) -> list[list[Any]]:
    """A batch of reads cut where each group's datagrams begin and end (by the first one's
    index and count), so each part is one group's or holds none: a batch may hold several
    groups, each a GRO read of its own."""
    parts: list[list[Any]] = []
    start = index = 0
    while index < len(datagrams):
        datagram = datagrams[index]
        if len(datagram) <= GROUP_HEADER.size or datagram[0] != DATAGRAM_GROUPED:
            index += 1
            continue
        _kind, position, count, _session_id, _counter = GROUP_HEADER.unpack_from(datagram)
        end = min(len(datagrams), index + max(1, count - position))
        parts += [datagrams[start:index], datagrams[index:end]] if start < index else [datagrams[index:end]]
        start = index = end
    return [*parts, datagrams[start:]] if start < len(datagrams) else parts


def group_run(datagrams: list[Any]) -> tuple[int, int, int, int] | None:
    """(index, count, session id, counter) of the first datagram when all of a read are
    consecutive datagrams of one group, else None; compared in C loops."""
    if min(map(len, datagrams)) <= GROUP_HEADER.size:
        return None
    headers = list(map(GROUP_HEADER.unpack_from, datagrams))
    _kind, index, count, session_id, counter = headers[0]
    repeat, size = itertools.repeat, len(headers)
    expected = zip(
        repeat(DATAGRAM_GROUPED),
        range(index, index + size),
        repeat(count),
        repeat(session_id),
        range(counter, counter + size),
    )
    return headers[0][1:] if index + size <= count and headers == list(expected) else None


def open_datagrams(
    datagrams: list[Any], keys_for: Callable[[int], DatagramKeys | None], dropped: Callable[[str], None]
) -> Iterator[tuple[DatagramKeys, list[bytes], int]]:
    """The authenticated frames of one read's datagrams, as (the keys that opened them,
    frames, bytes of their datagrams) for each run of one session; every other datagram
    goes to `dropped` with its reason, having cost one lookup and at most one tag check.
    A read usually holds one session's datagrams under new consecutive counters: those
    open together (each run of them, where loss broke the counters), and so do
    consecutive datagrams of one group."""
    if len(datagrams[0]) > GROUP_HEADER.size and datagrams[0][0] == DATAGRAM_GROUPED:
        run = group_run(datagrams)
        keys = keys_for(run[2]) if run is not None else None
        if run is not None and keys is not None:
            try:
                frame, size = keys.add_to_group(datagrams, run[0], run[1], run[3])
            except BadDatagram as e:
                dropped(e.reason)
                return
            if frame is not None:
                yield keys, [frame], size
            return
    runs = split_runs(datagrams) if len(datagrams) > 1 else None
    if runs is None:
        parts = cut_at_groups(datagrams) if len(datagrams) > 1 else [datagrams]
        if len(parts) == 1:
            yield from open_one_by_one(datagrams, keys_for, dropped)
        else:
            for part in parts:
                yield from open_datagrams(part, keys_for, dropped)
        return
    session_id, pieces = runs
    for start, end, first in pieces:
        yield from open_one_run(datagrams[start:end], (session_id, first), keys_for, dropped)


def open_one_run(
    datagrams: list[Any],
    whole: tuple[int, int],
    keys_for: Callable[[int], DatagramKeys | None],
    dropped: Callable[[str], None],
) -> Iterator[tuple[DatagramKeys, list[bytes], int]]:
    """open_datagrams() for datagrams of one session (`whole`: its id, the first counter)
    under consecutive counters."""
    keys = keys_for(whole[0])
    opened = keys.open_run(datagrams, whole[1]) if keys is not None else None
    if keys is not None and opened is not None:
        if len(opened) == len(datagrams) and whole_frames(opened):
            yield keys, opened, sum(map(len, datagrams))
            return
        whole_ones = [one_frame(frame) for frame in opened]
        for _ in range(whole_ones.count(False)):
            dropped("not-one-frame")
        if any(whole_ones):
            yield (
                keys,
                list(itertools.compress(opened, whole_ones)),
                sum(itertools.compress(map(len, datagrams), whole_ones)),
            )
        if len(opened) == len(datagrams):
            return
        dropped("forged")  # the datagram after the opened ones
        datagrams = datagrams[len(opened) + 1 :]
    yield from open_one_by_one(datagrams, keys_for, dropped)


def open_one_by_one(
    datagrams: list[Any], keys_for: Callable[[int], DatagramKeys | None], dropped: Callable[[str], None]
) -> Iterator[tuple[DatagramKeys, list[bytes], int]]:
    """open_datagrams() for any mix of sessions, counters and junk."""
    keys: DatagramKeys | None = None
    frames: list[bytes] = []
    size = 0
    for datagram in datagrams:
        grouped = len(datagram) > GROUP_HEADER.size and datagram[0] == DATAGRAM_GROUPED
        header = GROUP_HEADER.unpack_from(datagram)[1:] if grouped else datagram_header(datagram)
        opener = keys_for(header[-2]) if header is not None else None
        if opener is None:
            dropped("malformed" if header is None else "unknown-session")
            continue
        if opener is not keys and frames:
            yield keys, frames, size  # type: ignore[misc]
            frames, size = [], 0
        keys = opener
        try:
            if grouped:
                index, count, _session_id, counter = header  # type: ignore[misc]
                frame, grown = opener.add_to_group([datagram], index, count, counter)
                if frame is not None:
                    frames.append(frame)
                    size += grown
                continue
            frames.append(opener.open(datagram, header[1]))  # type: ignore[index]
        except BadDatagram as e:
            dropped(e.reason)
            continue
        size += len(datagram)
    if frames:
        yield keys, frames, size  # type: ignore[misc]


def open_newest(
    datagrams: list[Any], keys_for: Callable[[int], DatagramKeys | None], dropped: Callable[[str], None]
) -> Iterator[tuple[DatagramKeys, list[bytes], int, bool]]:
    """open_datagrams(), each run also saying whether it held a datagram newer than any its
    keys opened before (the replay window's top moved). Only such a datagram may move a
    session's address: an older one, captured on its way and replayed from elsewhere,
    is authentic and unseen, yet not the node's latest word on where it is."""
    tops: dict[int, int] = {}  # each session id's newest counter before this read

    def keys_before(session_id: int) -> DatagramKeys | None:
        keys = keys_for(session_id)
        if keys is not None:
            tops.setdefault(session_id, keys.window.top)
        return keys

    for keys, frames, size in open_datagrams(datagrams, keys_before, dropped):
        yield keys, frames, size, keys.window.top > tops[keys.session_id]


# A TCP super-packet leaves as pieces, each one datagram: the segment a software TSO would
# make (its TCP checksum field holding only the pseudo-header sum), tagged with the burst
# (the counter of the super-packet's first datagram) and its index in it. The receiver
# joins consecutive pieces of a burst back into a super-packet by comparing two integers,
# where general GRO would parse and compare every header: the sender made them from one
# packet, so their headers agree. A lost piece only splits the burst in two.
FRAME_TSO_PIECE = 0x13  # inside datagrams only (capabilities "udp" and "gso"): burst, index, IPv4/TCP segment


PIECE_TAG = struct.Struct("!IH")  # burst, index


PIECE_START = 4 + PIECE_TAG.size  # where the segment starts in a piece frame


PIECE_FLAGS_KEPT = 0x89  # CWR only on a burst's first piece; FIN and PSH only on its last


def tso_pieces(packet: Any, mss: int, burst: int) -> list[bytes] | None:
    """A TSO super-packet (IPv4 without options, TCP) as piece frames of `mss` payload
    bytes; None for any other packet (the caller segments it the general way). Headers
    are laid out once; per piece only the IP id and checksum, and the sequence number
    change (and the flags and lengths of the first and last)."""
    if len(packet) < 40 or packet[0] != 0x45 or packet[9] != socket.IPPROTO_TCP or mss < GSO_MIN_SIZE:
        return None
    thl = (packet[32] >> 4) * 4
    if thl < 20 or len(packet) < 20 + thl or (packet[2] << 8 | packet[3]) != len(packet):
        return None
    ip, tcp = bytes(packet[:20]), bytes(packet[20 : 20 + thl])
    data = memoryview(packet)[20 + thl :]
    count = max(1, -(-len(data) // mss))
    ip_id, seq, flags = int.from_bytes(ip[4:6], "big"), int.from_bytes(tcp[4:8], "big"), tcp[13]
    layout = struct.Struct(f"!IIH4sH4sH8s4sI{thl - 8}s")
    pseudo = ip[12:20] + bytes((0, socket.IPPROTO_TCP))

    def headers(length: int, piece_flags: int) -> tuple[int, bytes, int, bytes]:
        """Frame word, IP bytes 0-3, IP header sum without id and checksum, TCP bytes 8 on."""
        total = 20 + thl + length
        ip_start = ip[:2] + total.to_bytes(2, "big")
        ip_sum = ones_sum(ip_start + ip[6:10] + ip[12:20])
        tail = bytearray(tcp[8:])
        tail[5] = piece_flags
        tail[8:10] = ones_sum(pseudo + (thl + length).to_bytes(2, "big")).to_bytes(2, "big")
        return FRAME_TSO_PIECE << 24 | PIECE_TAG.size + total, ip_start, ip_sum, bytes(tail)

    middle = headers(mss, flags & ~PIECE_FLAGS_KEPT)
    pieces = []
    pack, ip_rest, addresses, ports = layout.pack, ip[6:10], ip[12:20], tcp[:4]
    for index in range(count):
        offset = index * mss
        if 0 < index < count - 1:
            word, ip_start, ip_sum, tail = middle
        else:
            last = index == count - 1
            piece_flags = (flags if last else flags & ~PIECE_FLAGS_KEPT) & (0xFF if index == 0 else ~0x80)
            word, ip_start, ip_sum, tail = headers(len(data) - offset if last else mss, piece_flags)
        ident = (ip_id + index) & 0xFFFF
        ip_check = 0xFFFF - (ip_sum + ident) % 0xFFFF
        head = pack(
            word, burst, index, ip_start, ident, ip_rest, ip_check, addresses, ports, (seq + offset) & 0xFFFFFFFF, tail
        )
        pieces.append(head + data[offset : offset + mss])
    return pieces


def datagram_frames(payload: Any, mtu: int, partial: bool, burst: int, whole: bool = False) -> list[bytes]:
    """Frames of about the MTU for datagrams, from a GSO frame payload (virtio_net_hdr +
    packet). partial (the peer agreed on "gso"): a TCP super-packet leaves as pieces of
    burst `burst` (the counter its first datagram will carry), or with `whole` (the path
    groups) as one GSO frame to be sealed as a group; other packets as GSO frames, and the
    receiving kernel completes TCP checksums, so the sender sums no payload bytes; else all
    leave as plain PACKET frames with full checksums."""
    if len(payload) < VNET_HDR_LEN:
        return []
    gso_type, gso_size = payload[1], VNET_HDR.unpack_from(payload)[3]
    packet = payload[VNET_HDR_LEN:]
    if whole and partial and gso_type & ~GSO_ECN == GSO_TCPV4 and gso_size >= GSO_MIN_SIZE:
        return [encode_frame(FRAME_GSO_PACKET, payload)]
    if not partial or gso_type & ~GSO_ECN != GSO_TCPV4 or gso_size < GSO_MIN_SIZE:
        if partial and gso_type == GSO_NONE and len(packet) <= mtu:
            return [encode_frame(FRAME_GSO_PACKET, bytes(payload))]
        return plain_frames(payload)
    pieces = tso_pieces(packet, gso_size, burst & 0xFFFFFFFF)
    return pieces if pieces is not None else segment_tcp4_partial(packet, gso_size)


def piece_headers(frame: Any) -> int:
    """The IPv4 + TCP header length of a piece that may start a run (IPv4 without
    options, TCP, some payload), else 0: such a piece travels on alone, and the GSO
    check refuses it if it is malformed."""
    if len(frame) < PIECE_START + 40 or frame[PIECE_START] != 0x45 or frame[PIECE_START + 9] != socket.IPPROTO_TCP:
        return 0
    headers = 20 + (frame[PIECE_START + 32] >> 4) * 4
    return headers if headers >= 40 and PIECE_START + headers < len(frame) else 0


def lone_piece(frame: Any) -> bytearray:
    """A GSO_PACKET frame of the one segment a piece carries, its checksum left to the kernel."""
    segment = memoryview(frame)[PIECE_START:]
    headers = piece_headers(frame) or min(len(segment), 40)
    vnet = VNET_HDR.pack(VNET_F_NEEDS_CSUM, GSO_NONE, headers, 0, 20, TCP_CSUM_OFFSET)
    return bytearray(FRAME_HEADER.pack(FRAME_GSO_PACKET << 24 | VNET_HDR_LEN + len(segment))) + vnet + segment


def join_pieces(run: list[Any], headers: int) -> bytearray:
    """A GSO_PACKET frame from a run coalesce_pieces chose: a super-packet under the first
    piece's headers (`headers` long), the kernel to cut it and complete the checksums."""
    if len(run) == 1:
        return lone_piece(run[0])
    start = PIECE_START + headers
    payloads = [piece[start:] for piece in run]
    payload = sum(map(len, payloads))
    last_flags = run[-1][PIECE_START + 33] & PIECE_FLAGS_KEPT & ~0x80
    joined = super_packet_headers(memoryview(run[0])[PIECE_START:], headers, payload, last_flags, len(run[0]) - start)
    word = FRAME_HEADER.pack(FRAME_GSO_PACKET << 24 | len(joined) + payload)
    return bytearray().join([word, joined, *payloads])  # one copy, writable


def coalesce_pieces(frames: list[Any]) -> list[Any]:
    """The frames of one peer's datagrams, in arrival order, with each run of consecutive
    pieces of one burst (every piece as long as the first, the last maybe shorter, at
    most 64 KiB together) joined into one GSO_PACKET frame; other frames as they are.
    Whatever a peer puts in its pieces, this only passes frames on for the GSO check."""
    out: list[Any] = []
    run: list[Any] = []
    burst = following = size = headers = room = 0
    unpack = PIECE_TAG.unpack_from
    for frame in frames:
        if frame[0] != FRAME_TSO_PIECE or len(frame) < PIECE_START + 40:
            if run:
                out.append(join_pieces(run, headers))
                run = []
            out.append(frame if frame[0] != FRAME_TSO_PIECE else lone_piece(frame))
            continue
        tag = unpack(frame, 4)
        payload = len(frame) - PIECE_START - headers
        if run and tag[0] == burst and tag[1] == following and len(frame) <= size and payload <= room:
            run.append(frame)
            following, room = following + 1, room - payload
            if len(frame) < size:  # a burst's short last piece
                out.append(join_pieces(run, headers))
                run = []
            continue
        if run:
            out.append(join_pieces(run, headers))
        headers = piece_headers(frame)
        if not headers:
            out.append(lone_piece(frame))
            run = []
            continue
        run, size, room = [frame], len(frame), GRO_MAX_LENGTH - (len(frame) - PIECE_START)
        burst, following = tag[0], tag[1] + 1
    if run:
        out.append(join_pieces(run, headers))
    return out


# -- direct paths: node-to-node datagrams (capability "direct") ---------------------------
# Two nodes the server introduced seal datagrams for each other under keys only they hold:
# HKDF over the X25519 secret of their session shares (each sent to the server in its
# hello, handed to the other over TLS), salted with both shares and both overlay
# addresses. Keys come in epochs (HKDF info), each with its own session id and replay
# window: a sender moves to the next epoch when its keys are worn, as the server path
# rekeys, and the receiver always holds the next epoch's keys ready.

FRAME_DIRECT_PROBE = 0x14  # inside direct datagrams only: one byte, DIRECT_PING or DIRECT_PONG


# Inside datagrams only, to a peer that agreed on "groups": one byte, the receiver's verdict
# on the datagrams it gets from that peer (GroupGate): 1, whole enough to group; 0, not.
FRAME_LINK_REPORT = 0x15


DIRECT_PING, DIRECT_PONG = 0, 1


MAX_PEER_ENDPOINTS = 4  # candidate endpoints per peer (its LAN addresses, the address the server sees)


MAX_PEERS_PER_FRAME = 12  # peer entries in one FRAME_PEERS, well within MAX_CONTROL_PAYLOAD


class PairKeys:
    """One node pair's datagram keys, epoch by epoch, from the pair's X25519 secret."""

    def __init__(self, private: Any, my_share: bytes, peer_share: bytes, my_ip: int, peer_ip: int) -> None:
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

        try:
            self.secret = private.exchange(X25519PublicKey.from_public_bytes(peer_share))
        except ValueError:
            raise BadDatagram("bad-share") from None
        low, high = sorted(((my_ip, my_share), (peer_ip, peer_share)))
        self.salt = hashlib.sha256(b"nc-direct|" + low[1] + high[1] + struct.pack("!II", low[0], high[0])).digest()
        self.low = my_ip < peer_ip  # the lower address sends with the first key

    def epoch(self, number: int) -> DatagramKeys:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        info = b"nc direct path v1 epoch " + number.to_bytes(4, "big")
        okm = HKDF(algorithm=hashes.SHA256(), length=68, salt=self.salt, info=info).derive(self.secret)
        session_id = int.from_bytes(okm[64:], "big") or 1
        up, down = okm[:32], okm[32:64]
        return DatagramKeys(session_id, up, down) if self.low else DatagramKeys(session_id, down, up)


def decode_endpoints(value: Any) -> tuple[tuple[str, int], ...]:
    """Candidate endpoints from a control message ([[address, port], ...]): well-formed
    unicast ones only, at most MAX_PEER_ENDPOINTS; anything else is left out."""
    endpoints: list[tuple[str, int]] = []
    for item in value if isinstance(value, list) else ():
        if not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str):
            continue
        port = item[1]
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port <= 65535:
            continue
        try:
            address = ipaddress.ip_address(item[0])
        except ValueError:
            continue
        if address.is_unspecified or address.is_multicast or address.is_loopback:
            continue
        if (str(address), port) not in endpoints:
            endpoints.append((str(address), port))
    return tuple(endpoints[:MAX_PEER_ENDPOINTS])


@dataclasses.dataclass(frozen=True)
class PeerInfo:
    """A peer the server introduced: its overlay address, share, endpoints, and whether it
    takes GSO frames and groups."""

    ip: int
    share: bytes
    endpoints: tuple[tuple[str, int], ...]
    gso: bool
    groups: bool = False

    def encode(self) -> dict:
        return {
            "ip": str(ipaddress.IPv4Address(self.ip)),
            "key": base64.b64encode(self.share).decode(),
            "endpoints": [list(e) for e in self.endpoints],
            "gso": self.gso,
            "groups": self.groups,
        }

    @classmethod
    def decode(cls, entry: Any) -> PeerInfo | None:
        """None for a malformed entry (ignored, as unknown keys are)."""
        if not isinstance(entry, dict) or not isinstance(entry.get("ip"), str):
            return None
        share = decode_x25519_share(entry.get("key"))
        try:
            ip = int(ipaddress.IPv4Address(entry["ip"]))
        except ValueError:
            return None
        if not share:
            return None
        gso = entry.get("gso") is True
        return cls(ip, share, decode_endpoints(entry.get("endpoints")), gso, gso and entry.get("groups") is True)


def frame_addresses(frame: Any) -> tuple[bytes, bytes] | None:
    """(source, destination) IPv4 address bytes of a data frame opened from a datagram
    (PACKET, GSO_PACKET, TSO piece), else None: what a direct peer's frames are checked by."""
    kind = frame[0]
    start = 4 if kind == FRAME_PACKET else 4 + VNET_HDR_LEN if kind == FRAME_GSO_PACKET else PIECE_START
    if kind not in (FRAME_PACKET, FRAME_GSO_PACKET, FRAME_TSO_PIECE) or len(frame) < start + 20:
        return None
    if frame[start] >> 4 != 4:
        return None
    return bytes(frame[start + 12 : start + 16]), bytes(frame[start + 16 : start + 20])


# ============================================================================
# 10. Transport
#    A secured path to a peer (PeerPath), shared by server and client: the TLS
#    stream (Link) and the UDP datagram paths, the sockets that move batches,
#    the poller, receive buffers and send budgets, and the TUN's batch reads
#    and writes.
# ============================================================================


SEND_QUEUE_LIMIT = 4 * 1024 * 1024  # bytes queued per peer before packets are dropped


# All sessions together queue at most this much; past it, only peers holding more
# than their fair share lose packets, so one slow reader never costs the others.
TOTAL_SEND_QUEUE_LIMIT = 64 * 1024 * 1024


FAIR_SEND_QUEUE = 256 * 1024


RECEIVE_BUDGET = 512 * 1024  # bytes read from one peer per loop turn, for fairness


UDP_PROBE_S = 2.0  # auto: datagrams must flow both ways this soon after a probe starts, or data stays on TLS


UDP_SILENT_S = 3.0  # no authenticated datagram for this long: the UDP path is down, data moves to TLS


UDP_PING_S = 1.0  # while on UDP the node sends a keepalive datagram this often; the server answers each


UDP_RETRY_S = 20.0  # a failed or lost UDP path is probed again after this long


UDP_RTT_PING_S = 5.0  # a keepalive at least this often, also while data flows both ways: its echo times the path


UDP_OLD_KEYS_S = 10.0  # keys replaced by a rekey still open late datagrams this long


UDP_RECEIVE_SIZE = 65536  # room for one read: a GRO run of up to 64 KiB


UDP_RECEIVE_BUFFER = 4 * UDP_RECEIVE_SIZE  # reads from one source fill it in turn before they are opened together


# Socket buffers. Sending: room for a few 64 KiB super-packets in flight, no more (a deeper
# queue is latency under load; a full socket stops TUN reads instead). Receiving: a GRO
# read holds up to 64 datagrams, each charged its full buffer, so 256 KiB overflowed in
# bursts and every overflow cost the inner TCP a loss; 1 MiB is ~8 ms at 1 Gbit/s.
# SO_*BUFFORCE is 32/33 in socket.h; Python names neither.
UDP_BUFFERS = ((32, socket.SO_SNDBUF, 256 << 10), (33, socket.SO_RCVBUF, 1 << 20))


UDP_BACKLOG = 256  # sealed datagrams a node holds while its socket is full, before dropping


# Datagrams read from the UDP socket per loop turn (a GRO read holds up to 64, a read
# without GRO one): enough to join a super-packet's pieces even when the kernel hands
# them over one by one, few enough that a bulk flow does not hold the loop while a ping's
# answer waits on the TUN behind it.
UDP_DATAGRAMS_PER_TURN = 128


# When data moves from datagrams to the stream, the datagrams sent before the move wait in
# the receiving socket, and the stream's first packets must not overtake them: they are
# one flow's, and a flow that sees them reordered sends them again (measured: 48-722
# segments in 8 of 30 moves). The receiver reads what is waiting at once, up to what a
# full socket holds (SO_RCVBUF, UDP_BUFFERS), before it delivers from the stream.
UDP_SETTLE_DATAGRAMS = 2048


# Datagrams a session has waiting for the end of the loop turn before they go anyway.
UDP_SEND_BATCH = 64


# Bytes likewise: a frame sealed as a group is 46 datagrams, and a send of many would
# overrun the socket's buffer (whose excess the server and direct paths drop).
UDP_SEND_BYTES = UDP_SEND_BATCH * 1500


def batch_full(frames: list[bytes]) -> bool:
    """Frames for one peer that are to go now, not at the end of the turn."""
    return len(frames) >= UDP_SEND_BATCH or sum(map(len, frames)) >= UDP_SEND_BYTES


class PeerPath(Protocol):
    """A secured path to a peer, as server and client pick one to send on: the TLS stream
    (Link) or a UDP datagram path (the node's DatagramPath, the server's ServerDatagramPath).
    It moves batches: send takes a list of frames and returns how many it took; the path
    counts what it dropped (peer too far behind, socket full) in its owner's counters."""

    name: str  # "tcp" or "udp", as `nc status`, the node list and the metrics say
    rx_bytes: int  # what came in and went out on this path, framing included
    tx_bytes: int

    def send(self, frames: list[bytes]) -> int: ...


class Poller:
    """epoll that also tells whether the loop had to sleep for its events.

    After a sleep, traffic is sparse: handlers read once and return instead of
    reading on until EAGAIN (an exception in Python, and time on the latency
    path). Under load events are ready at once, and handlers read in batches.
    Whether it slept is read off the clock around the one epoll wait, not asked
    of the kernel with a second epoll_wait(0). It never spins: on two cores a
    spinning loop takes the CPU that ping, iperf3 or the peer process needs,
    which costs far more latency than it saves.
    """

    SLEPT_S = 50e-6  # a wait this long was a real sleep, not events already queued

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.woke = False
        self.now = time.monotonic()  # when the last wait returned
        self.held: set[int] = set()  # readable, though the kernel cannot tell (hold)

    def hold(self, fd: int) -> None:
        """Report fd readable at the next poll, without waiting: its bytes are in a
        buffer of ours or OpenSSL's, not in the socket epoll watches."""
        self.held.add(fd)

    def register(self, fd: int, mask: int) -> None:
        self.epoll.register(fd, mask)

    def modify(self, fd: int, mask: int) -> None:
        self.epoll.modify(fd, mask)

    def unregister(self, fd: int) -> None:
        self.held.discard(fd)
        self.epoll.unregister(fd)

    def close(self) -> None:
        self.epoll.close()

    def poll(self, timeout: float) -> list[tuple[int, int]]:
        before = time.monotonic()
        events = self.epoll.poll(0 if self.held else timeout)
        self.now = time.monotonic()
        self.woke = self.now - before > self.SLEPT_S
        if self.held:
            ready = {fd for fd, _ in events}
            events += [(fd, select.EPOLLIN) for fd in self.held if fd not in ready]
            self.held.clear()
        return events


class PeerClosed(Exception):
    pass


class RateLimitedLog:
    """At most one line per key every interval, with a count of what was held back."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self.last: dict[str, float] = {}
        self.held: collections.Counter[str] = collections.Counter()

    def __call__(self, key: str, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self.last.get(key, -1e9) < self.interval:
            self.held[key] += 1
            return
        held = self.held.pop(key, 0)
        self.last[key] = now
        log.info(message + (f" (+{held} similar)" if held else ""), *args)


class TunReader:
    """Reads TUN packets into one reused buffer that leaves room for a frame
    header in front, so a packet becomes a frame with a single copy and no
    64 KiB allocation per read."""

    def __init__(self, tun: Tun) -> None:
        self.fd = tun.fd
        self.offload = tun.offload  # packets come with a virtio_net_hdr in front
        self.buf = bytearray(4 + TUN_READ_SIZE)
        self.view = memoryview(self.buf)
        self.body = self.view[4:]

    def read(self) -> int:
        """Length of the next packet (raises BlockingIOError when there is none)."""
        return os.readv(self.fd, [self.body])

    def packet(self, length: int) -> memoryview:
        return self.body[:length]

    def frame(self, kind: int, length: int) -> bytes:
        FRAME_HEADER.pack_into(self.buf, 0, kind << 24 | length)
        return bytes(self.view[: 4 + length])

    def framed(self, length: int) -> memoryview:
        """The packet just read as one stream frame, in place: valid until the next read."""
        FRAME_HEADER.pack_into(self.buf, 0, (FRAME_GSO_PACKET if self.offload else FRAME_PACKET) << 24 | length)
        return self.view[: 4 + length]

    def frames(self, length: int, gso: bool) -> list[bytes]:
        """The stream frames for the packet just read, for a peer that takes GSO frames
        (gso) or not: one frame as read, or a super-packet cut into PACKET frames."""
        if self.offload and not gso:  # a TUN made with offload, a peer that (now) lacks it
            return plain_frames(self.body[:length])
        return [bytes(self.framed(length))]


def write_tun_batch(tun: Tun, buffers: list[bytes], failed: Callable[[OSError], None]) -> None:
    """Checked packets (virtio_net_hdr + packet) to a TUN, as one batch of datagrams brought
    them: TCP runs coalesced into super-packets where it takes them (GRO), else each packet
    completed in software. failed(error) hears of each write that failed."""
    fd = tun.fd
    packets = coalesce_tcp4(buffers) if tun.offload else [p for b in buffers for p in plain_packets(b)]
    for packet in packets:
        try:
            os.write(fd, packet)
        except OSError as e:
            failed(e)


# -- the stream ------------------------------------------------------------------------
# A node's one TLS connection carries its frames when datagrams do not, and always the
# control frames.


class BufferPool:
    """Receive buffers lent to links only while they hold a partial frame, so a
    thousand idle sessions do not each pin a quarter megabyte."""

    def __init__(self, spares: int = 16) -> None:
        self.free: list[FrameBuffer] = []
        self.spares = spares

    def take(self) -> FrameBuffer:
        return self.free.pop() if self.free else FrameBuffer()

    def give(self, buffer: FrameBuffer) -> None:
        if len(self.free) < self.spares:
            buffer.start = buffer.end = 0
            self.free.append(buffer)


class SendBudget:
    """The bytes queued across all of a server's sessions (one thread touches it)."""

    def __init__(self, limit: int = TOTAL_SEND_QUEUE_LIMIT, fair_share: int = FAIR_SEND_QUEUE) -> None:
        self.limit = limit
        self.fair_share = fair_share
        self.queued = 0

    def admits(self, link_queued: int) -> bool:
        """Under the total everyone may queue; over it only peers within their fair share."""
        return self.queued <= self.limit or link_queued < self.fair_share


def bound_any(kind: int, port: int, reuse_address: bool = False) -> socket.socket:
    """A socket of `kind` bound to port on every address: dual-stack (IPv6, and IPv4 as
    mapped addresses) where the host has IPv6, else IPv4 only. This is what server.ip
    may name, either family."""
    try:
        sock = socket.socket(socket.AF_INET6, kind)
    except OSError:  # IPv6 disabled at boot
        sock = socket.socket(socket.AF_INET, kind)
    try:
        if reuse_address:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::", port))
        else:
            sock.bind(("0.0.0.0", port))
    except OSError:
        sock.close()
        raise
    return sock


def listen_any(port: int) -> socket.socket:
    """A TCP listener on every address (bound_any)."""
    sock = bound_any(socket.SOCK_STREAM, port, reuse_address=True)
    try:
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock


# OpenSSL reads a record's 5-byte header and then its body, two reads per 16 KiB record:
# a third of a receiving server's system calls. Reading ahead lets one read take this
# much, records not yet asked for included (forced TCP node -> server, 6 interleaved
# pairs of runs: median 4 643 -> 4 972 Mbit/s, the server's reads 3.3 times fewer; a
# trial of sizes gave 17 KiB 4 424, 64 KiB 4 960, 256 KiB 5 040). The buffer is
# OpenSSL's, held only while it holds bytes: CPython sets SSL_MODE_RELEASE_BUFFERS.
TLS_READ_AHEAD = 128 * 1024


@functools.lru_cache(maxsize=1)
def libssl() -> Any:
    """The OpenSSL that Python's ssl module runs on, for the calls it does not expose; None
    where it cannot be found (the ssl module statically linked and its symbols hidden)."""
    import _ssl
    import ctypes

    try:
        lib = ctypes.CDLL(getattr(_ssl, "__file__", None))  # its libssl, found as its dependency
        for name, args in (
            ("SSL_get_fd", [ctypes.c_void_p]),
            ("SSL_set_read_ahead", [ctypes.c_void_p, ctypes.c_int]),
            ("SSL_set_default_read_buffer_len", [ctypes.c_void_p, ctypes.c_size_t]),
            ("SSL_has_pending", [ctypes.c_void_p]),
        ):
            getattr(lib, name).argtypes = args
    except (OSError, AttributeError):
        return None
    return lib


def openssl_connection(tls: Any, fd: int) -> int | None:
    """The address of the OpenSSL connection (SSL *) behind CPython's _ssl._SSLSocket,
    or None where that cannot be told for certain. CPython 3.9-3.13 lay the object out
    as its header, then a reference to the socket, the SSL *, and the context: the
    context's word must be the context object, and OpenSSL must name the socket's fd."""
    import ctypes

    layout_type = ctypes.c_void_p * 3
    if type(tls).__module__ != "_ssl" or type(tls).__basicsize__ < object.__basicsize__ + ctypes.sizeof(layout_type):
        return None
    layout = layout_type.from_address(id(tls) + object.__basicsize__)
    connection, context = layout[1], layout[2]
    lib = libssl()
    if lib is None or fd < 0 or not connection or context != id(tls.context) or lib.SSL_get_fd(connection) != fd:
        return None
    return connection


def read_tls_ahead(tls: Any, fd: int) -> Callable[[], int] | None:
    """Let OpenSSL read up to TLS_READ_AHEAD bytes a time from the socket. Returns what
    then tells whether it holds bytes, read or not yet opened, that epoll cannot see
    (SSL_has_pending); None where it cannot be set, and the stream reads as before."""
    connection = openssl_connection(tls, fd)
    if connection is None:
        return None
    lib = libssl()
    lib.SSL_set_default_read_buffer_len(connection, TLS_READ_AHEAD)
    lib.SSL_set_read_ahead(connection, 1)
    return functools.partial(lib.SSL_has_pending, connection)


class Link:
    """One TLS stream of frames: receive buffer, bounded send queue, liveness times."""

    name = "tcp"

    def __init__(
        self,
        sock: ssl.SSLSocket,
        peer: str,
        buffers: BufferPool | None = None,
        budget: SendBudget | None = None,
        counters: collections.Counter[str] | None = None,
    ) -> None:
        self.sock = sock
        # Reads and writes go straight to the C-level TLS object: the ssl.SSLSocket
        # methods add three Python frames of checks per call, which is measurable
        # on the latency path. The public socket is the fallback on other Pythons.
        self.tls: Any = getattr(sock, "_sslobj", None) or sock
        self.fd = sock.fileno()
        # Whether OpenSSL holds bytes the socket's readiness no longer announces. The
        # C-level object stays alive as long as self.tls, and the SSL * with it. (A plain
        # socket, as some tests hand in, holds none.)
        self.holds_bytes: Callable[[], int] = read_tls_ahead(self.tls, self.fd) or getattr(self.tls, "pending", int)
        self.peer = peer
        self.buffers = buffers
        self.rx: FrameBuffer = None if buffers else FrameBuffer()  # type: ignore[assignment]
        self.out: list[bytes] = []
        self.queued = 0
        self.budget = budget
        self.pending: bytes | None = None  # a write OpenSSL started; retried as-is
        self.last_rx = self.last_tx = time.monotonic()
        self.closed = False
        self.rx_bytes = self.tx_bytes = 0  # TLS payload bytes, framing included
        self.counters = collections.Counter() if counters is None else counters  # the owner's drop counts

    def send(self, frames: list[bytes]) -> int:
        """Queue data frames in order; how many were taken. The rest are dropped (and counted)
        when the peer is this far behind, or when all peers together are and this one holds
        more than its share. The check is queue's, inline: this runs for every packet."""
        taken = 0  # counted, not enumerate()d: that costs a third more per packet here
        for frame in frames:
            if self.queued > SEND_QUEUE_LIMIT or (self.budget is not None and not self.budget.admits(self.queued)):
                self.counters["dropped-queue-full"] += 1
                return taken
            self.out.append(frame)
            self._count(len(frame))
            taken += 1
        return taken

    def send_read(self, reader: TunReader, length: int, gso: bool) -> int:
        """Send the packet `reader` just read; how many frames were taken (send's count)."""
        if reader.offload and not gso:
            return self.send(reader.frames(length, gso))
        return self.send_now(reader.framed(length))

    def send_now(self, frame: memoryview) -> int:
        """Send one frame (header included) held in a buffer the caller reuses; 1 if taken,
        0 if dropped (as send counts). With nothing queued before it, it is written at
        once from that buffer: no copy, and no wait for the end of the loop turn, so the
        peer opens one TLS record while this side seals the next (node -> server on a
        clean link went from 4.9 to 5.2 Gbit/s). Behind queued frames it waits its turn,
        as a copy. A write that fails here is kept as a copy too: flush() retries it and
        raises what it raises, where the callers already handle a full or broken socket."""
        if self.out or self.pending is not None or self.closed:
            return self.send([bytes(frame)])
        try:
            self.tls.write(frame)
        except (OSError, ssl.SSLError):  # a full socket (SSLWantWriteError is an SSLError) or a broken one
            self.pending = bytes(frame)  # OpenSSL takes the same bytes again, from any buffer
            self._count(len(frame))
            return 1
        self.tx_bytes += len(frame)
        self.last_tx = time.monotonic()
        return 1

    def queue(self, frame: bytes) -> bool:
        """Queue a frame; False (the caller counts the drop) when the peer is this far behind,
        or when all peers together are and this one holds more than its share."""
        if self.queued > SEND_QUEUE_LIMIT or (self.budget is not None and not self.budget.admits(self.queued)):
            return False
        self.out.append(frame)
        self._count(len(frame))
        return True

    def _count(self, delta: int) -> None:
        self.queued += delta
        if self.budget is not None:
            self.budget.queued += delta

    def drop_queue(self) -> None:
        """Forget the queued frames; a write OpenSSL started must still finish as-is."""
        self.out.clear()
        self._count((len(self.pending) if self.pending is not None else 0) - self.queued)

    def flush(self) -> bool:
        """Write what is queued; False when the socket is full (wait for EPOLLOUT)."""
        while self.pending is not None or self.out:
            if self.pending is None:
                self.pending = self.out[0] if len(self.out) == 1 else b"".join(self.out)
                self.out.clear()
            try:
                self.tls.write(self.pending)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                return False
            self._count(-len(self.pending))
            self.tx_bytes += len(self.pending)
            self.pending = None
            self.last_tx = time.monotonic()
        return True

    def receive(self, handle_frames: Callable[[Any], None], once: bool = False) -> bool:
        """Read what TLS has (up to the budget), calling handle_frames(self) on each chunk.
        once: stop after one read unless OpenSSL holds more (epoll will say if the socket does).
        True when it stopped with bytes in OpenSSL that epoll cannot see: the caller
        must come back without waiting for the socket (Poller.hold)."""
        if self.rx is None:
            self.rx = self.buffers.take()
        rx, read = self.rx, self.tls.read
        got = 0
        try:
            while got < RECEIVE_BUDGET and not self.closed:
                space = rx.space()
                try:
                    count = read(len(space), space)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                    break
                except ssl.SSLEOFError:  # the TLS object itself does not forgive a bare TCP close
                    raise PeerClosed("closed the connection") from None
                if count == 0:
                    raise PeerClosed("closed the connection")
                rx.commit(count)
                got += count
                if rx.ready():
                    handle_frames(self)
                if once and not self.closed and not self.holds_bytes():
                    break
            else:
                return not self.closed and bool(self.holds_bytes())
        finally:
            if got:
                self.last_rx = time.monotonic()
                self.rx_bytes += got
            if self.buffers is not None and rx.start == rx.end:
                self.buffers.give(rx)
                self.rx = None  # type: ignore[assignment]
        return False

    def close(self) -> None:
        self.closed = True
        self.out.clear()
        self.pending = None
        self._count(-self.queued)
        with contextlib.suppress(OSError):
            self.sock.close()


# -- datagrams --------------------------------------------------------------------------
# The UDP data path: sealed datagrams (section 8) through one socket per side, in batches.


def udp_socket(port: int = 0) -> socket.socket:
    """A non-blocking UDP socket on every address (dual-stack where the host has IPv6),
    bound to port (0: any), with buffers big enough for bursts of a fast link."""
    sock = bound_any(socket.SOCK_DGRAM, port)
    for forced, option, size in UDP_BUFFERS:
        try:  # root may pass net.core.[rw]mem_max, which a fresh namespace keeps at 208 KiB
            sock.setsockopt(socket.SOL_SOCKET, forced, size)
        except OSError:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, size)
    sock.setblocking(False)
    return sock


UDP_SEGMENT = 103  # linux/udp.h: UDP GSO, one send of equal-sized datagrams


UDP_GRO = 104  # linux/udp.h: the kernel hands over runs of equal-sized datagrams in one read


UDP_MAX_SEGMENTS = 64  # per UDP_SEGMENT send (the kernel's limit on older releases)


UDP_GSO_BYTES = 65535 - 48  # one UDP_SEGMENT send is one IP packet before segmentation (IPv6 header + UDP)


GRO_CMSG_SPACE = socket.CMSG_SPACE(4)


IP_PKTINFO = 8  # linux/in.h (Python names only the IPv6 one): a datagram's local address


PKTINFO_CMSG_SPACE = socket.CMSG_SPACE(20)  # struct in6_pktinfo; in_pktinfo is 12


UDP_RECEIVE_SLOTS = 16  # reads one recvmmsg takes at most, each into its own UDP_RECEIVE_SIZE


Cmsgs = list  # of (level, type, data), as recvmsg gives a read's ancillary data


class ManyMessages:
    """recvmmsg(2), which Python's socket does not offer, through ctypes: up to
    UDP_RECEIVE_SLOTS reads in one system call. Where the host's GRO joins little, as
    on a lossy wire, every datagram was a recvmsg of its own: a third of a receiving
    server's time. The kernel fills fixed arrays (struct mmsghdr on 64-bit Linux), read
    back in strided slices; addresses and cmsgs repeat, so each distinct one is parsed once."""

    # struct mmsghdr: msghdr (name, namelen, iov, iovlen, control, controllen, flags), msg_len
    HEADER = struct.Struct("=QI4xQQQQi4xI4x")
    NAME = 28  # struct sockaddr_in6, the larger family
    CACHE_LIMIT = 4096  # distinct addresses or cmsgs remembered; a spray of them just clears it

    def __init__(self, fd: int, control: int, meaning: Callable[[Cmsgs], Any], slots: int = UDP_RECEIVE_SLOTS) -> None:
        """meaning: what a read's cmsgs say, worked out once for each distinct set of them."""
        import ctypes

        if ctypes.sizeof(ctypes.c_void_p) != 8 or self.HEADER.size != 64:
            raise OSError(errno.ENOSYS, "struct mmsghdr is laid out for 64-bit Linux here")
        self.call = ctypes.CDLL(None, use_errno=True).recvmmsg  # AttributeError off Linux
        self.call.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
        self.get_errno = ctypes.get_errno
        self.fd, self.slots, self.control, self.meaning = fd, slots, control, meaning
        # Kept as attributes: the kernel writes through their addresses.
        self.data = memoryview(bytearray(slots * UDP_RECEIVE_SIZE))
        self.names = bytearray(slots * self.NAME)
        self.controls = bytearray(slots * control or 1)
        self.vectors = bytearray(slots * 16)  # struct iovec: base, length
        headers = bytearray(slots * self.HEADER.size)
        address = [
            ctypes.addressof(ctypes.c_char.from_buffer(b))
            for b in (self.data, self.names, self.controls, self.vectors, headers)
        ]
        for slot in range(slots):
            struct.pack_into("=QQ", self.vectors, slot * 16, address[0] + slot * UDP_RECEIVE_SIZE, UDP_RECEIVE_SIZE)
            self.HEADER.pack_into(
                headers, slot * self.HEADER.size, address[1] + slot * self.NAME, self.NAME, address[3] + slot * 16, 1,
                address[2] + slot * control if control else 0, control, 0, 0,
            )  # fmt: skip
        self.headers, self.pointer = headers, address[4]
        self.words = memoryview(headers).cast("I")  # 16 per header: namelen at 2, msg_len at 14
        self.longs = memoryview(headers).cast("Q")  # 8 per header: controllen at 5
        self.fresh_words = memoryview(bytes(headers)).cast("I")  # what the kernel overwrites, as set up
        self.fresh_longs = memoryview(bytes(headers)).cast("Q")
        self.addresses: dict[bytes, tuple] = {}
        self.meanings: dict[bytes, Any] = {}
        self.no_cmsg = meaning([])

    def read(self, count: int) -> list[tuple[memoryview, tuple, Any]]:
        """Up to `count` reads waiting: (data, source address as Python's socket gives it,
        the meaning of its cmsgs). Empty when none waits; other errors raise OSError."""
        got = self.call(self.fd, self.pointer, min(count, self.slots), socket.MSG_DONTWAIT, None)
        if got < 0:
            code = self.get_errno()
            if code in (errno.EAGAIN, errno.EINTR):
                return []
            raise OSError(code, os.strerror(code))
        end = got * 16
        words, longs = self.words, self.longs
        lengths, name_lengths = words[14:end:16].tolist(), words[2:end:16].tolist()
        control_lengths = longs[5 : got * 8 : 8].tolist()
        words[2:end:16] = self.fresh_words[2:end:16]
        longs[5 : got * 8 : 8] = self.fresh_longs[5 : got * 8 : 8]
        names, controls, data = self.names, self.controls, self.data
        step, size, control = self.NAME, UDP_RECEIVE_SIZE, self.control
        reads = []
        for slot in range(got):
            name = bytes(names[slot * step : slot * step + name_lengths[slot]])
            address = self.addresses.get(name) or self._remember(self.addresses, name, socket_address(name))
            meaning = self.no_cmsg
            if control_lengths[slot]:
                raw = bytes(controls[slot * control : slot * control + control_lengths[slot]])
                meaning = self.meanings.get(raw) or self._remember(self.meanings, raw, self.meaning(parse_cmsgs(raw)))
            reads.append((data[slot * size : slot * size + lengths[slot]], address, meaning))
        return reads

    def _remember(self, cache: dict, key: bytes, value: Any) -> Any:
        if len(cache) >= self.CACHE_LIMIT:
            cache.clear()
        cache[key] = value
        return value


def socket_address(raw: bytes) -> tuple:
    """A struct sockaddr_in or sockaddr_in6 as Python's socket gives it: (host, port) or
    (host, port, flowinfo, scope_id)."""
    if int.from_bytes(raw[:2], sys.byteorder) == socket.AF_INET6:
        host = socket.inet_ntop(socket.AF_INET6, raw[8:24])
        return (
            host,
            int.from_bytes(raw[2:4], "big"),
            int.from_bytes(raw[4:8], "big"),
            int.from_bytes(raw[24:28], sys.byteorder),
        )
    return (socket.inet_ntop(socket.AF_INET, raw[4:8]), int.from_bytes(raw[2:4], "big"))


def parse_cmsgs(raw: bytes) -> Cmsgs:
    """A msghdr's control bytes as recvmsg gives them: (level, type, data) each."""
    header = struct.Struct("=Qii")  # struct cmsghdr: len, level, type (64-bit)
    found: Cmsgs = []
    offset = 0
    while offset + header.size <= len(raw):
        length, level, kind = header.unpack_from(raw, offset)
        if length < header.size:
            break
        found.append((level, kind, raw[offset + header.size : offset + length]))
        offset += (length + 7) & ~7
    return found


class DatagramSocket:
    """A non-blocking UDP socket that moves batches: a list of datagrams goes out in few
    sends (UDP GSO where the kernel takes it), and reads fill a list (UDP GRO). A kernel
    without either keeps a correct one-datagram-per-syscall path.

    With `local_source` (the server's socket, bound to every address) each read also
    names the local address it came to, and a send may name it as its source: on a
    multi-homed host the answer then leaves from the address the node sent to, as a NAT
    or stateful firewall in front of the node expects, not from the routing default."""

    def __init__(self, port: int = 0, local_source: bool = False) -> None:
        self.sock = udp_socket(port)
        self.fd = self.sock.fileno()
        self.gso = True  # cleared at the first send the kernel refuses
        self.gro = False
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_UDP, UDP_GRO, 1)
            self.gro = True
        self.pktinfo: tuple[int, int] | None = None  # the cmsg that names a local address
        if local_source:
            v6 = self.sock.family == socket.AF_INET6
            level, enable, kind = (
                (socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, socket.IPV6_PKTINFO)
                if v6
                else (socket.IPPROTO_IP, IP_PKTINFO, IP_PKTINFO)
            )
            with contextlib.suppress(OSError):
                self.sock.setsockopt(level, enable, 1)
                self.pktinfo = (level, kind)
        self.cmsg_space = GRO_CMSG_SPACE + (PKTINFO_CMSG_SPACE if self.pktinfo else 0)
        self.many: ManyMessages | None = None
        with contextlib.suppress(OSError, AttributeError):  # not 64-bit Linux: a read a datagram
            self.many = ManyMessages(self.fd, self.cmsg_space, self._meaning)
        self.view = memoryview(bytearray(UDP_RECEIVE_BUFFER if self.many is None else 0))

    @property
    def family(self) -> int:
        return self.sock.family

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, datagrams: list[bytes], address: Any, source: tuple | None = None) -> int:
        """Send in order, from the local address `source` names (a cmsg from receive) if
        given; how many went (fewer when the socket is full). Other errors raise OSError."""
        count, index = len(datagrams), 0
        ancillary = [source] if source is not None else []
        while index < count:
            size = len(datagrams[index])
            end = index + 1
            limit = min(count, index + UDP_MAX_SEGMENTS, index + max(1, UDP_GSO_BYTES // size))
            while end < limit and len(datagrams[end]) == size:
                end += 1
            if end < limit and len(datagrams[end]) < size:
                end += 1  # a shorter datagram may end a GSO run
            try:
                if end - index > 1 and self.gso:
                    self._send_run(datagrams[index:end], size, address, ancillary)
                else:
                    end = index + 1
                    self._send_one(datagrams[index], address, ancillary)
            except (BlockingIOError, InterruptedError):
                return index
            index = end
        return index

    def _send_one(self, datagram: bytes, address: Any, ancillary: list) -> None:
        if ancillary:
            self.sock.sendmsg([datagram], ancillary, 0, address)
        else:
            self.sock.sendto(datagram, address)

    def _send_run(self, run: list[bytes], size: int, address: Any, ancillary: list) -> None:
        try:
            segment = (socket.SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))
            self.sock.sendmsg(run, [segment, *ancillary], 0, address)
        except OSError as e:
            if e.errno not in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP):
                raise
            log.info("UDP segmentation offload unavailable (%s); sending datagrams one by one", e.strerror)
            self.gso = False
            for datagram in run:
                self._send_one(datagram, address, ancillary)

    def receive(self, limit: int) -> Iterator[tuple[list[memoryview], Any, tuple | None]]:
        """(datagrams, source address, local address as a cmsg for send, if asked for) for
        what is waiting, until `limit` datagrams came: consecutive reads from one source
        together (with GRO a read holds a run; where the host's GRO found little to join,
        one datagram), so they open as one batch. The views are valid until the next batch."""
        rounds = self._read_many(limit) if self.many is not None else self._read_one_by_one(limit)
        for reads in rounds:
            batch: list[memoryview] = []
            source: tuple[Any, tuple | None] = (None, None)
            for read, address, (size, local) in reads:
                if batch and (address, local) != source:
                    yield batch, source[0], source[1]
                    batch = []
                source = (address, local)
                batch += [read] if not size or size >= len(read) else gro_run(read, size)
            if batch:
                yield batch, source[0], source[1]

    def _read_many(self, limit: int) -> Iterator[list[tuple[memoryview, Any, tuple[int, tuple | None]]]]:
        """The reads of each recvmmsg, non-empty ones, as (data, source, _meaning); valid until the next call."""
        while limit > 0:
            try:
                reads = self.many.read(limit)  # type: ignore[union-attr]
            except OSError:  # an ICMP error for an earlier send; liveness tells what it meant
                limit -= 1
                continue
            if not reads:
                return
            limit -= sum(datagrams_in(len(read), size) for read, _address, (size, _local) in reads)
            yield [entry for entry in reads if entry[0]]  # an empty datagram carries nothing

    def _read_one_by_one(self, limit: int) -> Iterator[list[tuple[memoryview, Any, tuple[int, tuple | None]]]]:
        """The same through recvmsg, each read into the buffer after the last, until it is full."""
        sock, view, space = self.sock, self.view, self.cmsg_space
        reads: list[tuple[memoryview, Any, tuple[int, tuple | None]]] = []
        offset = 0
        while limit > 0:
            if offset + UDP_RECEIVE_SIZE > len(view):  # no room for another read: these go
                yield reads
                reads, offset = [], 0
            try:
                count, ancillary, _flags, address = sock.recvmsg_into([view[offset : offset + UDP_RECEIVE_SIZE]], space)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # an ICMP error for an earlier send; liveness tells what it meant
                limit -= 1
                continue
            meaning = self._meaning(ancillary)
            limit -= datagrams_in(count, meaning[0])
            if count:  # an empty datagram carries nothing (and would make no run of datagrams)
                reads.append((view[offset : offset + count], address, meaning))
                offset += count
        if reads:
            yield reads

    def _meaning(self, ancillary: Cmsgs) -> tuple[int, tuple | None]:
        """What a read's cmsgs say: the size its GRO run is cut at (0: one datagram) and
        the local address it came to (as a cmsg for send), if asked for."""
        size, local = 0, None
        for level, kind, data in ancillary:
            if level == socket.SOL_UDP and kind == UDP_GRO and len(data) >= 4:
                size = max(0, struct.unpack("=i", data[:4])[0])
            elif (level, kind) == self.pktinfo:
                local = local_source(level, kind, data)
        return size, local


def datagrams_in(length: int, size: int) -> int:
    """How many datagrams a read of `length` bytes cut at `size` holds (an empty one counts one)."""
    return -(-length // size) if 0 < size < length else 1


def gro_run(read: memoryview, size: int) -> list[memoryview]:
    """A GRO read cut into its datagrams: all `size` long, the last maybe shorter."""
    return [read[start : start + size] for start in range(0, len(read), size)]


def local_source(level: int, kind: int, pktinfo: bytes) -> tuple | None:
    """The cmsg that sends from the local address a received pktinfo names (any interface)."""
    if level == socket.IPPROTO_IPV6 and len(pktinfo) >= 20:
        return (level, kind, pktinfo[:16] + bytes(4))  # in6_pktinfo: address, ifindex 0
    if level == socket.IPPROTO_IP and len(pktinfo) >= 12:
        return (level, kind, bytes(4) + pktinfo[8:12] + bytes(4))  # in_pktinfo: spec_dst = the address it came to
    return None


def udp_address(sock: socket.socket, host: str, port: int) -> tuple:
    """host:port as sock's family addresses it (an IPv4 server through a dual-stack socket is mapped)."""
    if sock.family == socket.AF_INET6 and ipaddress.ip_address(host).version == 4:
        return (f"::ffff:{host}", port, 0, 0)
    return (host, port)


# Between frames of different senders (the server, each peer) in one read: coalesce_pieces
# joins a run under its first piece's headers, so no run may span two senders.
RUN_BREAK = encode_frame(FRAME_KEEPALIVE)


class DatagramPath:
    """The node's side of the UDP data path: its socket, keys, and whether data travels
    on it now. In auto it is probed after the welcome and used only while authenticated
    datagrams flow both ways and the node's PathChooser prefers it (`preferred`); it gives
    way to the TLS stream when they stop."""

    PROBING, UP, DOWN = "probing", "up", "down"
    name = "udp"

    def __init__(self, server: str, port: int, keys: DatagramKeys, mode: str, node_token: str) -> None:
        self.sock = DatagramSocket()
        self.fd = self.sock.fd
        self.server = udp_address(self.sock.sock, server, port)
        self.keys = keys  # sealing: the newest agreed
        self.openers: dict[int, DatagramKeys] = {keys.session_id: keys}
        self.retired_at = 0.0  # when replaced keys stop opening datagrams
        self.mode = mode
        self.node_token = node_token
        self.state = self.PROBING
        self.preferred = True  # auto: datagrams carry while up (False: the link is clean, TLS carries more)
        self.meter = LossMeter()  # the server's datagrams lost, for auto's PathChooser
        now = time.monotonic()
        self.grouping = Grouping(now)
        self.since = now  # when the state began
        self.last_rx = 0.0
        self.last_tx = 0.0
        self.backlog: list[bytes] = []  # sealed datagrams the full socket did not take yet
        self.rekey_private: Any = None  # our share of a rekey sent, awaiting the server's
        self.rekey_share = b""
        self.counters: collections.Counter[str] = collections.Counter()
        self.rx_bytes = self.tx_bytes = 0  # authenticated datagrams in, datagrams sent
        self.ping_at = 0.0  # when the keepalive now awaiting its echo went out (0: none)
        self.pinged_at = 0.0  # when the last keepalive went out
        self.rtt_s: float | None = None  # smoothed round trip of keepalive echoes (as TCP's srtt: 1/8 a sample)
        self.peers: PeerTable | None = None  # direct paths over this socket (capability "direct")

    @property
    def carrying(self) -> bool:
        """Data goes out as datagrams now (in udp mode whenever there are keys)."""
        return (self.state == self.UP and self.preferred) or self.mode == "udp"

    def loss_sample(self) -> tuple[int, int]:
        """(datagrams the server sent, of them opened here) since the last call."""
        sent, opened, _gaps = self.meter.sample(self.openers.values())
        return sent, opened

    @property
    def chunk(self) -> int:
        return self.grouping.chunk

    def on_report(self, frame: Any) -> None:
        """The server's verdict on this node's datagrams."""
        if (line := self.grouping.on_report(frame)) is not None:
            log.info("UDP to %s: %s", unmapped(self.server[0]), line)

    def close(self) -> None:
        self.sock.close()

    def send(self, frames: list[bytes]) -> int:
        """Seal each frame and send the batch; what the full socket does not take waits in
        a short backlog (the caller stops reading the TUN until it drains), past which it
        is dropped and counted. Returns how many frames were sent or held."""
        try:
            sealed = self.keys.seal(frames, self.chunk)
        except BadDatagram:
            self.counters["dropped-udp-send"] += 1
            return 0
        if self.backlog:
            room = UDP_BACKLOG - len(self.backlog)
            self.backlog.extend(sealed[:room])
            self.counters["dropped-udp-full"] += max(0, len(sealed) - room)
            return min(room, len(sealed))
        self._send(sealed)
        return len(sealed)

    def _send(self, sealed: list[bytes]) -> None:
        try:
            sent = self.sock.send(sealed, self.server)
        except OSError:
            self.counters["dropped-udp-send"] += 1
            return
        self.tx_bytes += sum(map(len, sealed[:sent]))
        if sent < len(sealed):
            self.backlog = sealed[sent:]
        self.last_tx = time.monotonic()

    def flush(self) -> bool:
        """Send the backlog; True once it is empty."""
        backlog, self.backlog = self.backlog, []
        if backlog:
            self._send(backlog)
        return not self.backlog

    def receive(self, limit: int) -> list[bytes]:
        """The frames of the authenticated datagrams in up to `limit` reads; the rest are
        counted and dropped."""
        frames: list[bytes] = []
        direct: list[bytes] = []  # from peers: they say nothing of the server path's liveness
        peers, last = self.peers, None
        for datagrams, source, _local in self.sock.receive(limit):
            if peers is None:
                for _keys, opened, size in open_datagrams(datagrams, self.openers.get, self._dropped):
                    frames += opened
                    self.rx_bytes += size
                continue
            for keys, opened, size, newest in open_newest(datagrams, self._opener, self._dropped):
                if self.openers.get(keys.session_id) is keys:
                    frames += opened
                    self.rx_bytes += size
                else:
                    owner = peers.by_id.get(keys.session_id)
                    passed = peers.accept(keys, opened, size, source, newest)
                    if passed and owner is not last:  # no TSO piece run joins two senders' pieces
                        direct.append(RUN_BREAK)
                        last = owner
                    direct += passed
        if frames:
            self.last_rx = time.monotonic()
            if self.ping_at:  # the server answers each keepalive with one: the first back is its echo
                self._time_echo(frames, self.last_rx)
        return frames + direct if direct else frames

    def _opener(self, session_id: int) -> DatagramKeys | None:
        keys = self.openers.get(session_id)
        return keys if keys is not None or self.peers is None else self.peers.opener(session_id)

    def _time_echo(self, frames: list[bytes], now: float) -> None:
        if any(frame[0] == FRAME_KEEPALIVE for frame in frames):
            sample = now - self.ping_at
            self.rtt_s = sample if self.rtt_s is None else self.rtt_s * 0.875 + sample * 0.125
            self.ping_at = 0.0

    def _ping(self, now: float) -> None:
        """A keepalive; timed unless one is awaiting its echo (one lost is given up after UDP_SILENT_S)."""
        if not self.ping_at or now - self.ping_at > UDP_SILENT_S:
            self.ping_at = time.monotonic()  # now is when the loop woke; the echo is timed from the send
        self.pinged_at = now
        self.send([encode_frame(FRAME_KEEPALIVE)])

    def _dropped(self, reason: str) -> None:
        self.counters["udp-" + reason] += 1

    def tick(self, now: float) -> str | None:
        """Advance the probe/up/down states; returns "udp" or "tcp" when the server must
        be told where data goes now (over TLS), else None."""
        if self.retired_at and now >= self.retired_at:
            self.openers = {self.keys.session_id: self.keys}
            self.retired_at = 0.0
        line, report = self.grouping.judge(now, self.openers.values())
        if line is not None:
            log.debug("UDP from %s: %s", unmapped(self.server[0]), line)
        if report is not None:
            self.send([report])
        if self.state == self.PROBING:
            if self.last_rx >= self.since:
                return self._become(self.UP, now)
            if now - self.since > UDP_PROBE_S:
                log.info(
                    "UDP to %s does not answer; data stays on TLS/TCP, probing again in %.0f s",
                    unmapped(self.server[0]),
                    UDP_RETRY_S,
                )
                return self._become(self.DOWN, now)
            self._ping(now)
        elif self.state == self.UP:
            if now - self.last_rx > UDP_SILENT_S:
                log.warning(
                    "UDP to %s silent for %.0f s; data moves to TLS/TCP", unmapped(self.server[0]), UDP_SILENT_S
                )
                return self._become(self.DOWN, now)
            quiet = now - self.last_tx >= UDP_PING_S or now - self.last_rx >= UDP_PING_S
            if quiet or now - self.pinged_at >= UDP_RTT_PING_S:
                # Also while data only leaves: the server answers each keepalive, so a
                # one-way flow keeps the path alive instead of looking silent.
                self._ping(now)
        elif now - self.since >= UDP_RETRY_S:
            self._become(self.PROBING, now)
            self._ping(now)
        return None

    def _become(self, state: str, now: float) -> str | None:
        self.state, self.since = state, now
        if state == self.UP:
            return "udp"
        return "tcp" if state == self.DOWN and self.mode != "udp" else None

    def rekey_request(self, now: float) -> bytes | None:
        """A REKEY frame for the server when the keys are worn (and none is pending)."""
        if self.rekey_private is not None or not self.keys.worn(now):
            return None
        self.rekey_private, self.rekey_share = new_x25519()
        return encode_control(FRAME_REKEY, {"udpKey": base64.b64encode(self.rekey_share).decode()})

    def on_rekey(self, message: dict, now: float) -> None:
        """The server's answer: seal with the new keys at once; the old ones still open
        late datagrams for a while."""
        if self.rekey_private is None:
            return
        share, session = decode_x25519_share(message.get("udpKey")), message.get("udpSession")
        if not share or not isinstance(session, int) or not 0 < session <= 0xFFFFFFFF:
            raise ProtocolError("rekey answer without a valid udpKey and udpSession")
        transcript = datagram_transcript(self.rekey_share, share, session, self.node_token)
        keys = DatagramKeys.for_node(session, *datagram_keys(self.rekey_private, share, transcript))
        self.rekey_private, self.rekey_share = None, b""
        self.keys = keys
        self.openers[session] = keys
        self.retired_at = now + UDP_OLD_KEYS_S


# -- auto: which path carries ------------------------------------------------------------
# On a clean link the TLS stream carries the most (the kernel's TCP and one AES-GCM call per
# 16 KiB record; datagrams carry about 0.9 of it with groups, half without); under loss
# it stalls behind every retransmission while datagrams carry more at a fraction of the
# latency. A node on auto measures which link it has and says where data goes with the
# TRANSPORT frame every server already obeys: the datagram counters tell exactly how many
# of the server's datagrams never came, TCP_INFO how many bytes the stream sent again and
# how many segments came out of order. It starts on datagrams (safe under loss), moves to
# the stream once enough traffic shows a clean link, and back at the first sign of loss;
# a stream that proved lossy is tried again only after a wait that doubles each time.


AUTO_CLEAN_LOSS = 0.0005  # at most this share of the server's datagrams missing: the link is clean


AUTO_MIN_DATAGRAMS = 1000  # datagrams one judgement of the datagram path needs


# auto looks at its counters this often while traffic turns the loop (idle, the loop wakes
# every 0.25 s): a bulk flow on a clean link reaches the stream a tenth of a second after
# its thousandth datagram, not up to a quarter later, which a 5 s transfer felt.
AUTO_OBSERVE_S = 0.1


AUTO_LOSSY_RESENT = 0.005  # on the stream: this share of bytes sent again is loss


AUTO_MIN_BYTES = 32 << 20  # bytes sent one judgement needs (one lost 64 KiB TSO segment is 0.2 % of it)


# On the stream: this share of segments received out of order is loss. A lost segment puts
# what follows it until the retransmission out of order, so the share grows with the loss
# rate and the window: measured here 7 % at 3 % loss, up to 1.5 % on a clean but busy
# host (drops in its own queues). A download alone leaves the stream only under heavy
# loss; the bytes the node sends again show it exactly.
AUTO_LOSSY_OUT_OF_ORDER = 0.05


AUTO_MIN_SEGMENTS = 4000  # segments received that one judgement of the stream's receiving needs


AUTO_EVIDENCE_S = 10.0  # a judgement gathers its traffic within this long, or starts again


AUTO_STREAM_AGAIN_S = 30.0  # after the stream proved lossy, the wait before trying it again; doubled each time


AUTO_STREAM_AGAIN_MAX_S = 600.0


AUTO_STREAM_PROVEN_S = 300.0  # a stream that ran clean this long before a loss starts the wait afresh


# struct tcp_info (linux/tcp.h): tcpi_snd_mss, tcpi_data_segs_in, tcpi_bytes_sent,
# tcpi_bytes_retrans, tcpi_dsack_dups, tcpi_rcv_ooopack (all there from Linux 5.4 on).
TCP_INFO_COUNTERS = struct.Struct("=16xI132xI44xQQI4xI")


@dataclasses.dataclass
class StreamCounters:
    """The TLS stream's TCP counters (cumulative), as TCP_INFO has them."""

    segments_in: int = 0
    bytes_sent: int = 0
    bytes_resent: int = 0  # less what the peer reported as duplicates (D-SACK): those were not lost
    out_of_order: int = 0


def stream_counters(sock: socket.socket) -> StreamCounters | None:
    """The stream socket's TCP_INFO counters; None where the kernel has not all of them.
    A retransmission the peer then reports as a duplicate was spurious (a timer that fired
    while a busy host held the ACKs back), not a loss: its bytes do not count as resent."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_COUNTERS.size)
    except OSError:
        return None
    if len(info) < TCP_INFO_COUNTERS.size:
        return None
    mss, segments_in, sent, resent, duplicates, out_of_order = TCP_INFO_COUNTERS.unpack(info)
    return StreamCounters(segments_in, sent, max(0, resent - duplicates * mss), out_of_order)


class PathChooser:
    """auto's choice between datagrams and the TLS stream, from counters fed each tick
    (observe). Judgements need enough traffic: an idle or slow link keeps its path."""

    def __init__(self, now: float) -> None:
        self.datagrams = True  # data goes as datagrams (while the UDP path is up)
        self.since = now  # when the current choice was made
        self.stream_after = now  # no move to the stream before this
        self.wait = AUTO_STREAM_AGAIN_S
        self.last: StreamCounters | None = None  # the stream's counters at the last tick
        self.evidence = StreamCounters()  # this judgement's stream deltas
        self.sent = self.opened = 0  # this judgement's datagrams: the server's, and opened here
        self.started = now

    def observe(self, now: float, datagrams: tuple[int, int], stream: StreamCounters | None) -> str | None:
        """One tick's datagram sample (DatagramPath.loss_sample) and the stream's cumulative
        counters (None: unknown, and then the stream is never chosen); a line saying why when
        the choice changed, else None."""
        self.sent, self.opened = self.sent + datagrams[0], self.opened + datagrams[1]
        if stream is not None and self.last is not None:
            for field in dataclasses.fields(StreamCounters):
                name = field.name
                delta = getattr(stream, name) - getattr(self.last, name)
                setattr(self.evidence, name, getattr(self.evidence, name) + max(0, delta))
        self.last = stream
        why = self._judge_datagrams(now, stream is not None) if self.datagrams else self._judge_stream(now)
        if why is None and now - self.started >= AUTO_EVIDENCE_S:
            self._forget(now)  # too little traffic to judge: start again
        return why

    def _judge_datagrams(self, now: float, stream_known: bool) -> str | None:
        if self.sent < AUTO_MIN_DATAGRAMS:
            return None
        loss = max(0, self.sent - self.opened) / self.sent
        self._forget(now)
        if loss > AUTO_CLEAN_LOSS or now < self.stream_after or not stream_known:
            return None
        self._choose(False, now)
        return f"the link is clean ({loss:.2%} of datagrams lost)"

    def _judge_stream(self, now: float) -> str | None:
        seen = self.evidence
        resent = seen.bytes_resent / seen.bytes_sent if seen.bytes_sent >= AUTO_MIN_BYTES else 0.0
        disordered = seen.out_of_order / seen.segments_in if seen.segments_in >= AUTO_MIN_SEGMENTS else 0.0
        if resent < AUTO_LOSSY_RESENT and disordered < AUTO_LOSSY_OUT_OF_ORDER:
            if seen.bytes_sent >= AUTO_MIN_BYTES or seen.segments_in >= AUTO_MIN_SEGMENTS:
                self._forget(now)
            return None
        if now - self.since >= AUTO_STREAM_PROVEN_S:
            self.wait = AUTO_STREAM_AGAIN_S
        self.stream_after = now + self.wait
        why = (
            f"the link loses packets ({resent:.2%} of the stream's bytes sent again, {disordered:.2%} of its"
            f" segments out of order); the stream is tried again in {self.wait:.0f} s"
        )
        self.wait = min(2 * self.wait, AUTO_STREAM_AGAIN_MAX_S)
        self._choose(True, now)
        return why

    def _choose(self, datagrams: bool, now: float) -> None:
        self.datagrams, self.since = datagrams, now
        self._forget(now)

    def _forget(self, now: float) -> None:
        self.evidence = StreamCounters()
        self.sent = self.opened = 0
        self.started = now


class LossMeter:
    """How many datagrams a peer sent and how many of them opened here, from the keys'
    counters: they are consecutive, so the newest one seen says how many were sent, and
    every counter below it that never opened was lost on the way (or is still reordered)."""

    def __init__(self) -> None:
        # Per session id: (newest counter, opened, gaps) at the last sample.
        self.counted: dict[int, tuple[int, int, int]] = {}

    def sample(self, openers: Iterable[DatagramKeys]) -> tuple[int, int, int]:
        """(sent, opened, loss events) since the last call."""
        sent = opened = gaps = 0
        counted: dict[int, tuple[int, int, int]] = {}
        for keys in openers:
            top, received, jumps = keys.window.top, keys.received, keys.gaps
            last_top, last_received, last_jumps = self.counted.get(keys.session_id, (-1, 0, 0))
            sent += top - last_top
            opened += received - last_received
            gaps += jumps - last_jumps
            counted[keys.session_id] = (top, received, jumps)
        self.counted = counted
        return sent, opened, gaps


GROUP_AGAIN_S = 5.0  # after loss ended grouping on a path, the wait before it may group again; doubled each time


GROUP_AGAIN_MAX_S = 300.0


# Loss events that end grouping before a judgement has its AUTO_MIN_DATAGRAMS: under loss
# grouped flows slow down, and their datagrams may never add up to a judgement.
GROUP_LOSS_SEEN = 3


class GroupGate:
    """Whether a peer may seal its big frames to us as groups (capability "groups"): one
    datagram lost loses a whole group, so only while the datagrams we receive from it show
    a clean link (AUTO_MIN_DATAGRAMS with loss events, gaps in the counters, in at most
    AUTO_CLEAN_LOSS of them), and not again for a while after loss ended it. Events, not
    datagrams: a burst lost at once (a GRO read the receiving socket had no room for, up
    to 64 datagrams) costs the inner TCP one loss whether or not the datagrams were
    grouped, where random loss on a link costs it one per datagram lost. The receiver
    judges, since only it sees every loss on the way, and tells the sender its verdict
    (FRAME_LINK_REPORT) after each judgement: at once at the first few losses, and again
    while they go on, so a lost report is soon replaced."""

    def __init__(self, now: float) -> None:
        self.on = False  # the verdict: the peer may group
        self.meter = LossMeter()
        self.sent = self.opened = self.gaps = 0
        self.started = self.after = self.since = self.next_sample = now
        self.wait = GROUP_AGAIN_S
        self.report_due = False

    def observe(self, now: float, openers: Iterable[DatagramKeys]) -> str | None:
        """Sample the openers (at most every 0.25 s); a line for the log when the verdict changed."""
        if now < self.next_sample:
            return None
        self.next_sample = now + 0.25
        sent, opened, gaps = self.meter.sample(openers)
        self.sent, self.opened, self.gaps = self.sent + sent, self.opened + opened, self.gaps + gaps
        lossy = self.gaps > self.sent * AUTO_CLEAN_LOSS
        if self.sent < AUTO_MIN_DATAGRAMS and not (lossy and self.gaps >= GROUP_LOSS_SEEN):
            if now - self.started >= AUTO_EVIDENCE_S:
                self._forget(now)
            return None
        loss = f"{max(0, self.sent - self.opened) / max(1, self.sent):.2%} lost in {self.gaps} gaps"
        self._forget(now)
        self.report_due = True
        if self.on and lossy:
            if now - self.since >= AUTO_STREAM_PROVEN_S:
                self.wait = GROUP_AGAIN_S
            self.on, self.since, self.after = False, now, now + self.wait
            self.wait = min(2 * self.wait, GROUP_AGAIN_MAX_S)
            return f"{loss}: not whole enough to group"
        if not self.on and not lossy and now >= self.after:
            self.on, self.since = True, now
            return f"{loss}: whole enough to group"
        return None

    def report(self) -> bytes | None:
        """The verdict for the peer, once per judgement."""
        if not self.report_due:
            return None
        self.report_due = False
        return encode_frame(FRAME_LINK_REPORT, b"\x01" if self.on else b"\x00")

    def _forget(self, now: float) -> None:
        self.sent = self.opened = self.gaps = 0
        self.started = now


def grouping_change(before: bool, after: bool) -> str | None:
    """The line a sender logs when the peer's verdict changes what it does."""
    if after == before:
        return None
    return "the link is clean: one seal per 64 KiB" if after else "datagrams lost: one seal per segment again"


class Grouping:
    """One path's groups, the same on the node's server path, the server's path to a node
    and a direct path: their chunk once the peer agreed on them (`size`; 0: never), the
    gate judging what the peer sends, and the peer's verdict on what this side sends."""

    def __init__(self, now: float) -> None:
        self.size = 0
        self.gate = GroupGate(now)
        self.may_group = False

    @property
    def chunk(self) -> int:
        """Big frames leave as groups of datagrams of this many sealed bytes (0: never)."""
        return self.size if self.may_group else 0

    def on_report(self, frame: Any) -> str | None:
        """The peer's FRAME_LINK_REPORT; a line for the log when it changes what this side sends."""
        if not self.size or len(frame) < 5:
            return None
        line = grouping_change(self.may_group, frame[4] == 1)
        self.may_group = frame[4] == 1
        return line

    def judge(self, now: float, openers: Iterable[DatagramKeys]) -> tuple[str | None, bytes | None]:
        """(a line when the gate's verdict changed, a FRAME_LINK_REPORT for the peer), both None without groups."""
        if not self.size:
            return None, None
        return self.gate.observe(now, openers), self.gate.report()


class ServerDatagramPath:
    """The server's side of one node's UDP data path, sending through the server's one
    socket: the node's keys by session id (a rekey adds one), the keys that seal, the
    address of the latest authenticated datagram (the only one ever sent to), and
    whether the node asked for data as datagrams."""

    name = "udp"

    def __init__(
        self,
        sock: DatagramSocket,
        keys: DatagramKeys,
        share: bytes,
        mtu: int,
        gso: bool,
        node_token: str,
        counters: collections.Counter[str],
        note: RateLimitedLog,
    ) -> None:
        self.sock = sock
        self.sealer = keys
        self.openers: dict[int, DatagramKeys] = {keys.session_id: keys}
        self.offer = (share, keys.session_id)  # the welcome's share and session id
        self.addr: Any = None
        self.local: tuple | None = None  # the cmsg that answers from the address the node sent to
        self.last_rx = 0.0
        self.wanted = False
        self.mtu = mtu
        self.gso = gso  # the node takes FRAME_GSO_PACKET: TCP segments leave with partial checksums
        self.node_token = node_token
        self.counters = counters
        self.note = note
        self.rx_bytes = self.tx_bytes = 0  # authenticated datagrams in, datagrams sent
        self.grouping = Grouping(time.monotonic())

    @property
    def chunk(self) -> int:
        return self.grouping.chunk

    def heard(self, now: float, size: int) -> bytes | None:
        """Authenticated datagrams of `size` bytes came: the path is alive. Returns a
        FRAME_LINK_REPORT for the node when the gate has a verdict on its datagrams."""
        self.last_rx = now
        self.rx_bytes += size
        line, report = self.grouping.judge(now, self.openers.values())
        if line is not None:
            log.debug("node %s: datagrams from it: %s", self.node_token, line)
        return report

    def on_report(self, frame: Any) -> bool:
        """The node's verdict on this server's datagrams (False: not a report, from a node that agreed on groups)."""
        if frame[0] != FRAME_LINK_REPORT or not self.grouping.size or len(frame) < 5:
            return False
        if (line := self.grouping.on_report(frame)) is not None:
            log.debug("node %s: %s", self.node_token, line)
        return True

    def retire_all_but(self, keys: DatagramKeys) -> list[int]:
        """Seal with `keys` and open only with them from now on; the session ids let go."""
        gone = [i for i in self.openers if i != keys.session_id]
        for session_id in gone:
            del self.openers[session_id]
        self.sealer = keys
        return gone

    def carrying(self, now: float) -> bool:
        """Data for this node goes out as datagrams: it asked, and its datagrams keep coming."""
        return self.wanted and now - self.last_rx < UDP_SILENT_S

    def send(self, frames: list[bytes]) -> int:
        """Seal each frame (a 64 KiB GSO frame cut into MTU-sized pieces first) and send them
        together to the latest authenticated address, from the local address it sent to.
        A full socket drops the rest. Returns how many frames were handed to the socket."""
        keys, address, sock = self.sealer, self.addr, self.sock
        if address is None:
            return 0
        pieces: list[bytes] = []
        chunk = self.chunk
        for frame in frames:
            if frame[0] == FRAME_GSO_PACKET and not chunk:  # each burst named by the counter its first piece will get
                pieces += datagram_frames(memoryview(frame)[4:], self.mtu, self.gso, keys.sent + len(pieces))
            else:
                pieces.append(frame)
        try:
            sealed = keys.seal(pieces, chunk)
            sent = sock.send(sealed, address, self.local)
        except (OSError, BadDatagram) as e:
            self.counters["dropped-udp-send"] += 1
            self.note("udp-send", "UDP send to node %s failed: %s", self.node_token, e)
            return 0
        self.tx_bytes += sum(map(len, sealed[:sent]))
        if sent < len(sealed):
            self.counters["dropped-udp-full"] += 1
            return 0
        return len(frames)


# -- direct paths to peers ----------------------------------------------------------------
# Design. The server stays the one authority on who may talk to whom: a node that agreed on
# "direct" (with "udp") gives its X25519 share in the hello and, over TLS (FRAME_PEERS), its
# LAN endpoint (the address it reaches the server from, and its datagram socket's port).
# To each such node the server introduces every peer the switch would forward to (same
# network, interconnection on, also "direct"): the peer's overlay address, share, and
# candidate endpoints (its LAN endpoint, and the address the server sees its datagrams
# come from: its NAT mapping), and tells both at the same moment, so both probe at once
# and each one's probes open its own NAT for the other's (hole punching). When a session
# is detached (unregister, revocation, a network deleted, a reconnect) every peer told of
# it hears FRAME_PEERS "remove" on the same loop turn and forgets its keys: its datagrams
# find no keys from then on. Pair keys are PairKeys (section 9): per pair, per epoch.
#
# A node keeps a PeerTable beside its server DatagramPath, sharing its socket (so the NAT
# mapping the server saw is the one peers reach). A peer's path (DirectPeer) is used only
# once a pong came back for a ping (authenticated datagrams both ways), and left for the
# server path after DIRECT_SILENT_S without a pong; probing repeats with backoff. A direct
# datagram is opened only by that peer's keys (its replay window), and each frame must carry
# the peer's overlay address as source and this node's as destination, else it is dropped:
# the server's anti-spoofing rule, applied by the receiving node. The switch's question
# "which path for this destination" is PeerTable.path_for: a DirectPeer, or None for the
# server path as before.

DIRECT_PROBE_S = 3.0  # a round of pings to a peer's candidates lasts this long


DIRECT_PROBE_EVERY_S = 0.5  # pings in a round, and pings on an up path


DIRECT_SILENT_S = 2.0  # no pong for this long: data to the peer goes through the server again


DIRECT_RETRY_S = 2.0  # the first wait after a failed round; it doubles


DIRECT_RETRY_MAX_S = 30.0


DIRECT_REPORT_S = 5.0  # how often at most a node tells the server its direct bytes (metrics)


DIRECT_PEERS_REPORT_S = 1.0  # how often at most it tells which peers it reaches directly (node list), on a change


MAX_DIRECT_PEERS_REPORTED = 128  # peers named in one report: ~2.3 KB, well within MAX_CONTROL_PAYLOAD


class DirectPeer:
    """One peer's direct path (a PeerPath): its keys by epoch, candidate endpoints, the
    endpoint that answered, and whether data goes this way now."""

    PROBING, UP, DOWN = "probing", "up", "down"
    name = "direct"

    def __init__(self, info: PeerInfo, pair: PairKeys, sock: DatagramSocket, now: float, mtu: int) -> None:
        self.ip, self.share, self.gso, self.pair, self.sock = info.ip, info.share, info.gso, pair, sock
        self.grouping = Grouping(now)
        self.grouping.size = group_chunk(mtu) if info.groups else 0
        self.address = str(ipaddress.IPv4Address(info.ip))
        self.ip_bytes = info.ip.to_bytes(4, "big")
        self.endpoints = [udp_address(sock.sock, host, port) for host, port in info.endpoints]
        self.epochs: dict[int, DatagramKeys] = {}  # by epoch; opened by session id through `ids`
        self.ids: dict[int, int] = {}  # session id -> epoch
        self.send_epoch = self.receive_epoch = 0
        for epoch in (0, 1):
            self._keep(epoch)
        self.endpoint: Any = None  # where the latest pong came from
        self.state, self.since, self.next_probe = self.PROBING, now, now
        self.backoff = DIRECT_RETRY_S
        self.last_pong = self.last_ping = 0.0
        self.handshake = 0.0  # wall-clock time of the latest pong, for `nc status`
        self.rx_bytes = self.tx_bytes = 0
        self.dropped = 0  # datagrams the full socket did not take

    def _keep(self, epoch: int) -> None:
        if epoch not in self.epochs:
            keys = self.pair.epoch(epoch)
            self.epochs[epoch], self.ids[keys.session_id] = keys, epoch

    @property
    def sealer(self) -> DatagramKeys:
        return self.epochs[self.send_epoch]

    @property
    def chunk(self) -> int:
        return self.grouping.chunk

    def on_report(self, frame: Any) -> None:
        if (line := self.grouping.on_report(frame)) is not None:
            log.info("direct path to %s: %s", self.address, line)

    def received(self, session_id: int) -> None:
        """A datagram opened under this session id: a newer epoch of the peer's makes the
        next one ready and lets the ones before the previous go."""
        epoch = self.ids[session_id]
        if epoch <= self.receive_epoch:
            return
        self.receive_epoch = epoch
        self._keep(epoch + 1)
        for old in [e for e in self.epochs if e < epoch - 1 and e != self.send_epoch]:
            del self.ids[self.epochs.pop(old).session_id]

    def send(self, frames: list[bytes]) -> int:
        return self.send_to(frames, self.endpoint)

    def send_to(self, frames: list[bytes], address: Any) -> int:
        """Seal and send; what the full socket does not take is dropped (the inner flow's
        own congestion control answers that). Returns how many frames went."""
        if address is None:
            return 0
        try:
            sealed = self.sealer.seal(frames, self.chunk)
            sent = self.sock.send(sealed, address)
        except (OSError, BadDatagram):
            return 0
        self.tx_bytes += sum(map(len, sealed[:sent]))
        self.dropped += len(sealed) - sent
        return sent

    def probe(self, kind: int, address: Any) -> None:
        self.send_to([encode_frame(FRAME_DIRECT_PROBE, bytes((kind,)))], address)

    def tick(self, now: float) -> str | None:
        """Pings, rekeys and state changes; returns a line for the log when the path changed."""
        if self.sealer.worn(now):
            self.send_epoch += 1
            self._keep(self.send_epoch)
        line, report = self.grouping.judge(now, self.epochs.values())
        if line is not None:
            log.debug("direct path from %s: %s", self.address, line)
        if report is not None:
            self.send([report])
        if self.state == self.UP:
            if now - self.last_pong > DIRECT_SILENT_S:
                self._down(now, DIRECT_RETRY_S)
                return f"direct path to {self.address} silent for {DIRECT_SILENT_S:.0f} s; through the server"
            if now - self.last_ping >= DIRECT_PROBE_EVERY_S:
                self.last_ping = now
                self.probe(DIRECT_PING, self.endpoint)
        elif self.state == self.PROBING:
            if now - self.since > DIRECT_PROBE_S:
                self._down(now, self.backoff)
                self.backoff = min(2 * self.backoff, DIRECT_RETRY_MAX_S)
            elif now >= self.next_probe:
                self.next_probe = now + DIRECT_PROBE_EVERY_S
                for address in dict.fromkeys([*self.endpoints, self.endpoint]):
                    self.probe(DIRECT_PING, address)
        elif now >= self.next_probe:
            self.restart(now)
        return None

    def _down(self, now: float, wait: float) -> None:
        self.state, self.since, self.next_probe = self.DOWN, now, now + wait

    def restart(self, now: float) -> None:
        """A new round of probes now (unless the path is up)."""
        if self.state != self.UP:
            self.state, self.since, self.next_probe = self.PROBING, now, now

    def on_probe(self, kind: int, source: Any, newest: bool, now: float) -> str | None:
        """A ping is answered where it came from (and, while not up, pinged back there:
        the peer's NAT mapping toward us may be one the server never saw); a pong, the
        newest datagram yet, proves both ways and names the endpoint."""
        if kind == DIRECT_PING:
            self.probe(DIRECT_PONG, source)
            if self.state != self.UP:
                self.probe(DIRECT_PING, source)
            return None
        if kind != DIRECT_PONG or not newest:
            return None
        self.last_pong, self.handshake, self.endpoint = now, time.time(), source
        self.backoff = DIRECT_RETRY_S
        if self.state == self.UP:
            return None
        self.state, self.since, self.last_ping = self.UP, now, now
        return f"direct path to {self.address} via {unmapped(str(source[0]))}:{source[1]}"

    def status(self) -> dict[str, Any]:
        up = self.state == self.UP
        return {
            "ip": self.address,
            "path": "direct" if up else "relayed",
            "endpoint": f"{unmapped(str(self.endpoint[0]))}:{self.endpoint[1]}" if up else "",
            "lastHandshake": (
                datetime.datetime.fromtimestamp(self.handshake).astimezone().isoformat(timespec="seconds")
                if self.handshake
                else None  # never reached: null, as every time nc prints
            ),
            "rxBytes": self.rx_bytes,
            "txBytes": self.tx_bytes,
            "dropped": self.dropped,
        }


class PeerTable:
    """A node's direct paths, by overlay address and by datagram session id, over the
    server DatagramPath's socket: what the server introduced, and which path a packet
    for a destination takes (path_for; None: the server's)."""

    def __init__(self, sock: DatagramSocket, private: Any, share: bytes, ip: int, counters: collections.Counter[str]):
        self.sock, self.private, self.share, self.ip = sock, private, share, ip
        self.ip_bytes = ip.to_bytes(4, "big")
        self.counters = counters
        self.mtu = DEFAULT_MTU  # the network's (the welcome's): what a group's datagrams are cut to
        self.peers: dict[int, DirectPeer] = {}  # by overlay address
        self.by_id: dict[int, DirectPeer] = {}  # by datagram session id, every epoch kept
        self.gone_tx = 0  # bytes sent to peers since removed
        self.report: bytes | None = None  # the LAN endpoint for the server, sent once
        self.reported, self.next_report = 0, 0.0  # direct bytes sent, as last told to the server
        self.reported_peers: list[str] = []  # the peers reached directly, as last told to the server
        self.next_peers_report = 0.0

    def direct_peers(self) -> list[str]:
        """The peers whose direct path is up, by overlay address, lowest first (at most MAX_DIRECT_PEERS_REPORTED)."""
        up = sorted(ip for ip, peer in self.peers.items() if peer.state == DirectPeer.UP)
        return [str(ipaddress.IPv4Address(ip)) for ip in up[:MAX_DIRECT_PEERS_REPORTED]]

    def direct_report(self, now: float) -> bytes | None:
        """What went out on direct paths (the server's metrics: every DIRECT_REPORT_S at most,
        if it changed) and which peers run direct (the node list: when that changed, every
        DIRECT_PEERS_REPORT_S at most, so a path that goes down leaves the list within
        seconds): one FRAME_PEERS with both, or None. A server without the list ignores it."""
        sent = sum(peer.tx_bytes for peer in self.peers.values()) + self.gone_tx
        bytes_due = now >= self.next_report and sent != self.reported
        direct = self.direct_peers() if now >= self.next_peers_report else self.reported_peers
        peers_due = direct != self.reported_peers
        if not (bytes_due or peers_due):
            return None
        if bytes_due:
            self.next_report = now + DIRECT_REPORT_S
        if peers_due:
            self.next_peers_report = now + DIRECT_PEERS_REPORT_S
        self.reported, self.reported_peers = sent, direct
        return encode_control(FRAME_PEERS, {"directBytes": sent, "directPeers": direct})

    def update(self, message: dict, now: float) -> None:
        """A FRAME_PEERS from the server: peers added (or their endpoints updated), peers removed."""
        for address in message.get("remove", []) if isinstance(message.get("remove"), list) else ():
            with contextlib.suppress(ValueError, TypeError):
                self.remove(int(ipaddress.IPv4Address(address)))
        for entry in message.get("add", []) if isinstance(message.get("add"), list) else ():
            info = PeerInfo.decode(entry)
            if info is not None and info.ip != self.ip:
                self.add(info, now)

    def add(self, info: PeerInfo, now: float) -> None:
        peer = self.peers.get(info.ip)
        if peer is not None and peer.share == info.share:
            peer.endpoints = [udp_address(self.sock.sock, host, port) for host, port in info.endpoints]
            peer.gso, peer.grouping.size = info.gso, group_chunk(self.mtu) if info.groups else 0
            peer.restart(now)  # the server says: probe now (the other side does too)
            return
        if peer is not None:
            self.remove(info.ip)
        try:
            pair = PairKeys(self.private, self.share, info.share, self.ip, info.ip)
            peer = DirectPeer(info, pair, self.sock, now, self.mtu)
        except BadDatagram:
            self.counters["direct-bad-share"] += 1
            return
        self.peers[info.ip] = peer
        self._index(peer)
        log.debug("peer %s introduced: endpoints %s", peer.address, list(info.endpoints))

    def _index(self, peer: DirectPeer) -> None:
        for session_id in [i for i, p in self.by_id.items() if p is peer and i not in peer.ids]:
            del self.by_id[session_id]
        for session_id in peer.ids:
            self.by_id[session_id] = peer

    def remove(self, ip: int) -> None:
        """The server withdrew the peer: its keys go at once, and with them its datagrams."""
        peer = self.peers.pop(ip, None)
        if peer is None:
            return
        self.gone_tx += peer.tx_bytes
        for session_id in [i for i, p in self.by_id.items() if p is peer]:
            del self.by_id[session_id]
        log.info("peer %s removed by the server; its datagrams are refused from now on", peer.address)

    def opener(self, session_id: int) -> DatagramKeys | None:
        peer = self.by_id.get(session_id)
        return peer.epochs[peer.ids[session_id]] if peer is not None else None

    def path_for(self, destination: bytes) -> DirectPeer | None:
        """The direct path for a packet to this overlay address (4 bytes), if one is up."""
        peer = self.peers.get(int.from_bytes(destination, "big"))
        return peer if peer is not None and peer.state == DirectPeer.UP else None

    def path_for_any(self) -> bool:
        """Some peer's direct path is up (the TUN's packets are then sorted by destination)."""
        return any(peer.state == DirectPeer.UP for peer in self.peers.values())

    def accept(self, keys: DatagramKeys, frames: list[bytes], size: int, source: Any, newest: bool) -> list[bytes]:
        """A peer's authenticated frames: probes answered here, data frames passed on only
        with the peer's overlay address as source and this node's as destination."""
        peer = self.by_id.get(keys.session_id)
        if peer is None:
            return []
        now = time.monotonic()
        peer.received(keys.session_id)
        self._index(peer)
        peer.rx_bytes += size
        passed = []
        for frame in frames:
            if frame[0] == FRAME_DIRECT_PROBE:
                if (line := peer.on_probe(frame[4] if len(frame) > 4 else -1, source, newest, now)) is not None:
                    log.info("%s", line)
            elif frame[0] == FRAME_LINK_REPORT:
                peer.on_report(frame)
            elif frame_addresses(frame) == (peer.ip_bytes, self.ip_bytes):
                passed.append(frame)
            else:
                self.counters["dropped-direct-spoofed"] += 1
        return passed

    def tick(self, now: float) -> None:
        for peer in list(self.peers.values()):
            epochs = len(peer.ids)
            if (line := peer.tick(now)) is not None:
                log.warning("%s", line)
            if len(peer.ids) != epochs:
                self._index(peer)

    def status(self) -> list[dict[str, Any]]:
        return [peer.status() for peer in sorted(list(self.peers.values()), key=lambda p: p.ip)]


# ============================================================================
# 11. Network server
#    One epoll loop (NetworkServer) owns the sockets, the server's TUNs and
#    every session; SessionLifecycle takes a session from handshake to close,
#    Switch moves node-to-node packets in userspace. Store work runs on a
#    worker thread so sqlite never stalls packets.
# ============================================================================


# A server gives an unfinished TLS handshake, and then the hello, this long each: a
# real node needs a few round trips, an idle connection only holds a slot.
SERVER_HANDSHAKE_DEADLINE_S = 5.0


MAX_PENDING_HANDSHAKES = 512


MAX_PENDING_PER_SOURCE = 32  # unfinished handshakes from one source (a NAT may hide many nodes)


LOOP_STALL_S = 5.0  # the loop wakes every second; one that has not turned for this long is down


class Phase:
    TLS = "tls"
    HELLO = "hello"
    ADMITTING = "admitting"
    ESTABLISHED = "established"
    CLOSING = "closing"  # an ERROR frame is on its way out; nothing else is
    CLOSED = "closed"


class ServerSession(Link):
    """A node's stream once TLS is done (the Handshaker did that part): hello, then packets."""

    def __init__(
        self,
        sock: ssl.SSLSocket,
        peer: str,
        buffers: BufferPool,
        budget: SendBudget,
        counters: collections.Counter[str],
    ) -> None:
        super().__init__(sock, peer, buffers, budget, counters)
        self.phase = Phase.HELLO
        self.deadline = time.monotonic() + SERVER_HANDSHAKE_DEADLINE_S
        self.cert = peer_cert(sock.getpeercert(binary_form=True) or b"")  # who the node's certificate names
        self.node_token = ""
        self.ip = 0
        self.caps: tuple[str, ...] = ()
        self.gso = False  # the peer takes FRAME_GSO_PACKET
        self.want_out = False  # registered for EPOLLOUT: a write is waiting for room
        self.plane: Plane | None = None  # the overlay network it is on, once admitted
        self.detached = False  # no longer in the routing tables
        self.close_reason = ""
        self.rx_packets = self.tx_packets = 0  # data frames from and to the node
        self.host_name = self.version = self.asked_name = ""  # what the node's hello said
        self.since = time.time()
        self.udp: ServerDatagramPath | None = None  # the UDP data path, when the hello agreed on "udp"
        self.direct_key = b""  # the node's share for pair keys, when the hello agreed on "direct"
        self.endpoints: tuple[tuple[str, int], ...] = ()  # the LAN endpoints the node reported (FRAME_PEERS)
        self.direct_bytes = 0  # bytes the node reports it sent on direct paths (FRAME_PEERS), for the metrics
        self.direct_peers: tuple[str, ...] = ()  # introduced peers it reports it reaches directly, for the node list
        self.said: set[int] = set()  # control frame kinds the node sent this session: the first of each is free

    def __repr__(self) -> str:
        return f"session({self.node_token or '?'} from {self.peer})"

    def on_stream(self, now: float) -> bool:
        """Data for this node goes on its TLS stream now, not as datagrams."""
        return self.udp is None or not self.udp.carrying(now)


def session_traffic(session: ServerSession) -> dict[str, int]:
    paths: list[PeerPath] = [session] if session.udp is None else [session, session.udp]
    return {
        "rx_bytes": sum(path.rx_bytes for path in paths),
        "tx_bytes": sum(path.tx_bytes for path in paths),
        "rx_packets": session.rx_packets,
        "tx_packets": session.tx_packets,
        "direct_tx_bytes": session.direct_bytes,  # what the node reports it sent straight to peers
    }


def reported_direct_peers(value: Any, introduced: Callable[[str], bool]) -> tuple[str, ...] | None:
    """A node's `directPeers` as the node list shows them: those of its entries that are
    the overlay address of a peer the server introduced to it (`introduced`), each once;
    anything else in the list is left out. None (keep what it said before) for anything
    but a list of at most MAX_DIRECT_PEERS_REPORTED: the work is bounded by the list,
    whatever the size of the network."""
    if not isinstance(value, list) or len(value) > MAX_DIRECT_PEERS_REPORTED:
        return None
    return tuple(dict.fromkeys(a for a in value if isinstance(a, str) and introduced(a)))


RESERVE_SHARE = 4  # a source holding fewer slots than this may still take one of a port's last eighth


class SourceSlots:
    """What one listening port holds (connections, unfinished handshakes), counted per
    source (source_key: an IPv6 /64 is one source). A source gets at most per_source,
    everyone together at most cap; and the last eighth of cap is kept for sources holding
    fewer than RESERVE_SHARE, so sources at their limit cannot fill the port between
    them and a new host still gets in."""

    def __init__(self, cap: int, per_source: int, prefix6: int = DEFAULT_SOURCE_PREFIX6) -> None:
        self.cap, self.per_source, self.prefix6 = cap, per_source, prefix6
        self.reserve = max(1, cap // 8)
        self.held: collections.Counter[str] = collections.Counter()
        self.total = 0
        self.top = ""  # the source holding most (kept as slots are taken; found again when it empties)

    def key(self, ip: str) -> str:
        return source_key(ip, self.prefix6)

    def take(self, key: str, unlimited: bool = False) -> tuple[str, str] | None:
        """Count one more slot for key (unlimited: no per-source limit, as for loopback);
        None when counted, else (the source to blame, why): key itself past its own
        limit, else the source holding most, never a newcomer the crowd kept out."""
        held = self.held.get(key, 0)
        if not unlimited and held >= self.per_source:
            return key, f"{held} from {key}, its limit"
        if self.total >= self.cap or (self.total >= self.cap - self.reserve and held >= RESERVE_SHARE):
            top = self.top
            return top, f"{self.total} of {self.cap} taken, the most ({self.held.get(top, 0)}) from {top}"
        self.held[key] = held + 1
        self.total += 1
        if held + 1 > self.held.get(self.top, 0):
            self.top = key
        return None

    def release(self, key: str) -> None:
        held = self.held.get(key, 0)
        if held <= 0:
            return
        self.total -= 1
        if held > 1:
            self.held[key] = held - 1
            return
        del self.held[key]
        if key == self.top:
            self.top = max(self.held, key=self.held.__getitem__, default="")


class PendingHandshake:
    __slots__ = ("deadline", "peer", "source", "tls")

    def __init__(self, tls: ssl.SSLSocket, peer: str, source: str) -> None:
        self.tls, self.peer, self.source = tls, peer, source
        self.deadline = time.monotonic() + SERVER_HANDSHAKE_DEADLINE_S


class Handshaker(threading.Thread):
    """Owns the data-plane listener: accepts, runs TLS handshakes on its own epoll, and
    hands finished ones to the packet loop. A source (an address, an IPv6 /64) gets
    MAX_PENDING_PER_SOURCE unfinished handshakes, everyone what SourceSlots leave it of
    MAX_PENDING_HANDSHAKES, each for SERVER_HANDSHAKE_DEADLINE_S; so one flooding source
    cannot lock nodes out, and the handshake's crypto (OpenSSL drops the GIL for it)
    never runs on the packet loop."""

    def __init__(
        self,
        listener: socket.socket,
        tls: ssl.SSLContext,
        deliver: Callable[[ssl.SSLSocket, str], None],
        prefix6: int = DEFAULT_SOURCE_PREFIX6,
    ) -> None:
        super().__init__(name="network-handshakes", daemon=True)
        self.listener = listener
        self.tls = tls
        self.deliver = deliver
        self.counters: collections.Counter[str] = collections.Counter()
        self.note = RateLimitedLog()
        self.pending: dict[int, PendingHandshake] = {}
        self.slots = SourceSlots(MAX_PENDING_HANDSHAKES, MAX_PENDING_PER_SOURCE, prefix6)
        self.stopping = threading.Event()
        self.epoll = select.epoll()
        self.paused_until = 0.0  # accept() ran out of file descriptors; try again then
        self.observe: Callable[[float], None] = lambda _seconds: None  # a finished handshake's duration
        self.fds = FdBudget(FD_RESERVE_DATA)

    def stop(self) -> None:
        self.stopping.set()
        if self.is_alive():
            self.join(timeout=10.0)
        for pending in list(self.pending.values()):
            self._drop(pending)
        self.epoll.close()
        self.fds.close()

    def run(self) -> None:
        listener = self.listener.fileno()
        self.epoll.register(listener, select.EPOLLIN)
        next_sweep = time.monotonic() + 1.0
        while not self.stopping.is_set():
            for fd, _ in self.epoll.poll(0.25):
                if fd == listener:
                    self._accept()
                elif (pending := self.pending.get(fd)) is not None:
                    try:
                        self._step(pending)
                    except Exception:  # a bug must cost one connection, never the listener
                        log.exception("handshake with %s failed unexpectedly; closing it", pending.peer)
                        self._drop(pending)
            now = time.monotonic()
            if now >= next_sweep:
                next_sweep = now + 0.5
                self._expire(now)

    def _accept(self) -> None:
        for _ in range(64):
            try:
                accepted = self.fds.accept(self.listener)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and no spare: pause accepting for a second, keep serving
                self.note("accept", "accept failed: %s; pausing new connections", e.strerror)
                self.epoll.modify(self.listener.fileno(), 0)
                self.paused_until = time.monotonic() + 1.0
                return
            if accepted is None:
                self.counters["refused-fds"] += 1
                self.note(
                    "fds",
                    "out of file descriptors (%d kept free for nc adm and the store): refusing new connections",
                    self.fds.reserve,
                )
                continue
            sock, address = accepted
            peer = unmapped(address[0])
            source = self.slots.key(peer)
            refusal = self.slots.take(source)
            if refusal is not None:
                self._refuse_busy(sock, refusal)
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                tls = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            except OSError:  # reset before we looked at it
                self.slots.release(source)
                sock.close()
                continue
            pending = PendingHandshake(tls, host_port(peer, address[1]), source)
            self.pending[tls.fileno()] = pending
            self.epoll.register(tls.fileno(), select.EPOLLIN)
            self._step(pending)

    def _refuse_busy(self, sock: socket.socket, refusal: tuple[str, str]) -> None:
        """Close at once, with a reset: the slot stays free and no FIN_WAIT lingers."""
        self.counters["refused-busy"] += 1
        blamed, why = refusal
        self.note("busy:" + blamed, "unfinished TLS handshakes: %s; refusing more", why)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    def _step(self, pending: PendingHandshake) -> None:
        try:
            pending.tls.do_handshake()
        except ssl.SSLWantReadError:
            self.epoll.modify(pending.tls.fileno(), select.EPOLLIN)
            return
        except ssl.SSLWantWriteError:
            self.epoll.modify(pending.tls.fileno(), select.EPOLLOUT)
            return
        except (ssl.SSLError, OSError) as e:
            self.counters["tls-failures"] += 1
            log.debug("TLS handshake from %s failed: %s", pending.peer, getattr(e, "reason", None) or e)
            self._drop(pending)
            return
        self._forget(pending)
        self.observe(time.monotonic() - pending.deadline + SERVER_HANDSHAKE_DEADLINE_S)
        log.debug("TLS from %s: %s", pending.peer, pending.tls.cipher())
        self.deliver(pending.tls, pending.peer)

    def _expire(self, now: float) -> None:
        if self.paused_until and now >= self.paused_until:
            self.paused_until = 0.0
            self.epoll.modify(self.listener.fileno(), select.EPOLLIN)
        for pending in [p for p in self.pending.values() if now > p.deadline]:
            self.counters["handshake-timeouts"] += 1
            self._drop(pending)

    def _forget(self, pending: PendingHandshake) -> None:
        fd = pending.tls.fileno()
        if self.pending.pop(fd, None) is None:
            return
        with contextlib.suppress(OSError, ValueError):
            self.epoll.unregister(fd)
        self.slots.release(pending.source)

    def _drop(self, pending: PendingHandshake) -> None:
        self._forget(pending)
        with contextlib.suppress(OSError):
            pending.tls.close()


class StoreWorker(threading.Thread):
    """Runs store jobs in order, off the packet loop; results come back via call_soon."""

    def __init__(self, deliver: Callable[[Callable[[], None]], None]) -> None:
        super().__init__(name="store-worker", daemon=True)
        self.jobs: queue.SimpleQueue[
            tuple[Callable[[], Any], Callable[[Any, BaseException | None], None] | None] | None
        ] = queue.SimpleQueue()
        self.deliver = deliver

    def submit(self, job: Callable[[], Any], done: Callable[[Any, BaseException | None], None] | None = None) -> None:
        self.jobs.put((job, done))

    def stop(self) -> None:
        self.jobs.put(None)
        self.join(timeout=10.0)

    def run(self) -> None:
        while (item := self.jobs.get()) is not None:
            job, done = item
            result, error = None, None
            try:
                result = job()
            except Exception as e:  # reported to the loop; unexpected ones logged here
                error = e
                if not isinstance(e, NcError):
                    log.exception("store job failed")
            if done is not None:
                self.deliver(lambda d=done, r=result, e=error: d(r, e))


class Plane:
    """The data plane of one overlay network: its TUN device (holding the
    server's address there) and which session owns which address."""

    def __init__(self, overlay: Overlay, config: ServerConfig) -> None:
        self.overlay = overlay
        self.name = overlay.name
        self.server_ip = int(overlay.server_ip)
        self.first = int(overlay.network.network_address)
        self.last = int(overlay.network.broadcast_address)
        self.by_ip: dict[int, ServerSession] = {}
        self.tun = Tun(overlay.tun_name, offload=config.offload)
        self.reader = TunReader(self.tun)
        self.nat: GatewayNat | None = None
        try:
            self.tun.configure(ipaddress.IPv4Interface(f"{overlay.server_ip}/{overlay.network.prefixlen}"), config.mtu)
            if config.gateway:
                self.nat = GatewayNat(overlay.network, self.tun.name)
                self.nat.enable()
        except BaseException:
            self.close()
            raise
        log.info("network %s: TUN %s %s/%d", overlay.name, self.tun.name, overlay.server_ip, overlay.network.prefixlen)

    def contains(self, ip: int) -> bool:
        return self.first <= ip <= self.last

    def close(self) -> None:
        if self.nat is not None:
            self.nat.disable()
            self.nat = None
        self.tun.close()


@dataclasses.dataclass
class Arrivals:
    """What one session's datagrams brought in one loop turn."""

    keys: DatagramKeys  # that opened the latest of them
    path: tuple[Any, Any] | None = None  # (node address, local address) of the newest, if newer than any before
    frames: list[bytes] = dataclasses.field(default_factory=list)
    size: int = 0


class Switch:
    """Where packets go, on the server's loop: the planes (a TUN per overlay network, and
    which session holds which address there) and the UDP socket (and which session each
    datagram session id belongs to). Packets come from nodes (over TLS, handed over by
    the session lifecycle, or as datagrams) and from this host's kernel; they leave to a
    TUN or on another node's path."""

    def __init__(
        self,
        config: ServerConfig,
        epoll: Poller,
        dirty: set[ServerSession],
        counters: collections.Counter[str],
        note: RateLimitedLog,
        budgets: Budgets,
    ) -> None:
        self.config = config
        self.epoll = epoll
        self.dirty = dirty  # sessions with frames queued: flushed once per loop turn
        self.counters = counters
        self.note = note
        self.budgets = budgets  # malformed frames (per session) and control frames (per node)
        self.planes: dict[str, Plane] = {}
        self.tun_planes: dict[int, Plane] = {}
        self.udp: DatagramSocket | None = None  # the UDP data path's socket, unless transport is tcp
        self.udp_sessions: dict[int, ServerSession] = {}  # by datagram session id
        self.tun_batches: dict[Plane, list[bytes]] | None = None  # while a datagram batch is read: TUN writes held
        self.udp_out: dict[ServerSession, list[bytes]] = {}  # frames for nodes on UDP, sent at the end of the turn
        # The lifecycle's: a node whose datagrams break the rules is refused like one whose frames do.
        self.refuse: Callable[[ServerSession, Refusal], None] = lambda _session, _refusal: None
        self.addressed: Callable[[ServerSession], None] = lambda _s: None  # the lifecycle's: peers learn a NAT mapping

    def attach_plane(self, plane: Plane) -> None:
        self.planes[plane.name] = plane
        self.tun_planes[plane.tun.fd] = plane
        self.epoll.register(plane.tun.fd, select.EPOLLIN)

    def route_from_node(self, session: ServerSession, view: memoryview, kind: int, start: int, end: int) -> None:
        """One packet from a node: to the server's kernel, to another node, or dropped.
        A GSO frame's virtio_net_hdr is replaced in the receive buffer by the one
        gso_header rebuilt, so whatever goes on (to a TUN, a peer, or the segmenter)
        carries only checked fields; raises BadFrame for a malformed frame."""
        if kind == FRAME_GSO_PACKET:
            view[start : start + VNET_HDR_LEN] = gso_header(view[start:end], self.config.mtu)
            src, dst = check_packet(view[start + VNET_HDR_LEN : end], MAX_PAYLOAD)  # gso_header bounded its size
        else:
            src, dst = check_packet(view[start:end], self.config.mtu)
        plane = session.plane
        if src != session.ip:
            self.counters["dropped-spoofed"] += 1
            self.note(
                "spoof:" + session.node_token,
                "node %s sent a packet with a forged source address; dropped",
                session.node_token,
            )
            return
        if dst == plane.server_ip:
            self._write_tun(plane, view, kind, start, end)
            return
        peer = plane.by_ip.get(dst)
        if peer is not None:
            if plane.overlay.interconnection:
                self._forward(peer, view, kind, start, end)
            else:
                self.counters["dropped-interconnection"] += 1
        elif self.config.gateway and not any(p.contains(dst) for p in self.planes.values()):
            self._write_tun(plane, view, kind, start, end)  # to the world; never into another overlay
        else:
            self.counters["dropped-no-route"] += 1

    def bad_frame(self, session: ServerSession, error: BadFrame) -> None:
        """Drop and count a malformed frame; end the session of a peer that keeps sending
        them (OverBudget)."""
        self.counters["dropped-" + error.reason] += 1
        self.budgets.bad_frames.spend(session, f"node {session.node_token}", now=self.epoll.now, last=error)
        self.note(
            "bad-frame:" + session.node_token, "node %s sent a malformed frame (%s); dropped", session.node_token, error
        )

    def _forward(self, peer: ServerSession, view: memoryview, kind: int, start: int, end: int) -> None:
        """Queue a node's frame for another node, as-is when the peer can take it."""
        as_is = kind == FRAME_PACKET or peer.gso
        self.counters["relayed-bytes"] += end - start
        self._queue_frames(peer, [bytes(view[start - 4 : end])] if as_is else plain_frames(view[start:end]))

    def _queue_frames(self, peer: ServerSession, frames: list[bytes]) -> None:
        if not peer.on_stream(self.epoll.now):
            peer.tx_packets += len(frames)  # as handed to the socket: a datagram lost later is not known
            self._queue_datagrams(peer, frames)
            return
        peer.tx_packets += peer.send(frames)
        self.dirty.add(peer)

    def _write_tun(self, plane: Plane, view: memoryview, kind: int, start: int, end: int) -> None:
        """Hand a node's packet to this host's kernel (the server's own IP, or the gateway)."""
        tun = plane.tun
        if self.tun_batches is not None and tun.offload:
            buffer = ZERO_VNET_HDR + bytes(view[start:end]) if kind == FRAME_PACKET else bytes(view[start:end])
            self.tun_batches.setdefault(plane, []).append(buffer)
            return
        try:
            if not tun.offload:
                for packet in plain_packets(view[start:end]) if kind == FRAME_GSO_PACKET else [view[start:end]]:
                    os.write(tun.fd, packet)
            elif kind == FRAME_GSO_PACKET:
                os.write(tun.fd, view[start:end])
            else:
                os.writev(tun.fd, [ZERO_VNET_HDR, view[start:end]])
        except OSError as e:
            self._tun_write_failed(e)

    def _tun_write_failed(self, error: OSError) -> None:
        self.counters["dropped-tun-write"] += 1
        self.note("tun-write", "TUN write failed: %s", error.strerror)

    def read_tun(self, plane: Plane) -> None:
        """Packets from this host's kernel to the nodes of one overlay."""
        offset = VNET_HDR_LEN if plane.tun.offload else 0
        reader = plane.reader
        for _ in range(1 if self.epoll.woke else 256):
            try:
                length = reader.read()
            except (BlockingIOError, InterruptedError):
                return
            packet = reader.packet(length)
            endpoints = ipv4_endpoints(packet[offset:])
            peer = plane.by_ip.get(endpoints[1]) if endpoints else None
            if peer is None:
                self.counters["dropped-no-route"] += 1
            elif peer.on_stream(self.epoll.now):  # what it cannot write now goes at the turn's end
                peer.tx_packets += peer.send_read(reader, length, peer.gso)
                self.dirty.add(peer)
            else:
                self._queue_frames(peer, reader.frames(length, peer.gso))

    # -- the UDP data path: datagrams in; out through each node's ServerDatagramPath ----------

    # -- UDP sessions: their keys, agreed and renewed over the TLS session ---------------

    def agree_udp(
        self, session: ServerSession, node_share: bytes, counters: collections.Counter[str], note: RateLimitedLog
    ) -> ServerDatagramPath | None:
        """The session's datagram path, keyed from the node's share; None if the share is unusable."""
        private, share = new_x25519()
        session_id = self.new_udp_session_id()
        try:
            keys = datagram_keys(
                private, node_share, datagram_transcript(node_share, share, session_id, session.node_token)
            )
        except BadDatagram:
            return None
        sealer = DatagramKeys.for_server(session_id, *keys)
        assert self.udp is not None  # "udp" is offered only with a socket
        return ServerDatagramPath(
            self.udp, sealer, share, self.config.mtu, session.gso, session.node_token, counters, note
        )

    def rekey_udp(self, session: ServerSession, udp: ServerDatagramPath, udp_key: Any) -> dict[str, Any]:
        """Fresh keys for the node's new share, under a new session id; returns the reply.
        An earlier rekey the node never used is forgotten."""
        node_share = decode_x25519_share(udp_key)
        if not node_share:
            raise ProtocolError("rekey without a valid udpKey")
        private, share = new_x25519()
        session_id = self.new_udp_session_id()
        transcript = datagram_transcript(node_share, share, session_id, session.node_token)
        try:
            keys = DatagramKeys.for_server(session_id, *datagram_keys(private, node_share, transcript))
        except BadDatagram:
            raise ProtocolError("rekey with an unusable udpKey") from None
        for old_id in udp.retire_all_but(udp.sealer):
            self.udp_sessions.pop(old_id, None)
        udp.openers[session_id] = keys
        self.udp_sessions[session_id] = session
        return {"udpKey": base64.b64encode(share).decode(), "udpSession": session_id}

    def new_udp_session_id(self) -> int:
        while True:
            session_id = secrets.randbits(32)
            if session_id and session_id not in self.udp_sessions:
                return session_id

    def read_udp(self, limit: int = 0) -> None:
        """Read, open and deliver up to limit datagrams (0: a turn's, UDP_DATAGRAMS_PER_TURN)."""
        assert self.udp is not None
        self.tun_batches = {}
        arrivals: dict[ServerSession, Arrivals] = {}
        limit = limit or (1 if self.epoll.woke else UDP_DATAGRAMS_PER_TURN)
        try:
            for datagrams, address, local in self.udp.receive(limit):
                self._open_datagrams(datagrams, (address, local), arrivals)
            for session, arrived in arrivals.items():
                self._on_session_datagrams(session, arrived)
        finally:
            batches, self.tun_batches = self.tun_batches, None
            for plane, packets in batches.items():
                write_tun_batch(plane.tun, packets, self._tun_write_failed)

    def _queue_datagrams(self, session: ServerSession, frames: list[bytes]) -> None:
        """Frames for a node on UDP leave at the end of the loop turn, together: the acks
        of a bulk flow from the TUN go out in one send instead of one each."""
        pending = self.udp_out.setdefault(session, [])
        pending += frames
        if batch_full(pending):
            self._send_datagrams(session, self.udp_out.pop(session))

    def flush_datagrams(self) -> None:
        while self.udp_out:
            self._send_datagrams(*self.udp_out.popitem())

    @staticmethod
    def _send_datagrams(session: ServerSession, frames: list[bytes]) -> None:
        if session.udp is not None and not session.detached:
            session.udp.send(frames)

    def _drop_datagram(self, reason: str, address: Any) -> None:
        self.counters["udp-" + reason] += 1
        self.note(
            "udp:" + reason,
            "UDP datagram from %s dropped (%s); %d so far",
            unmapped(str(address[0])),
            reason,
            self.counters["udp-" + reason],
        )

    def _open_datagrams(
        self, datagrams: list[memoryview], path: tuple[Any, Any], arrivals: dict[ServerSession, Arrivals]
    ) -> None:
        """One read's datagrams, from one (node address, local address): what authenticates
        joins its session's arrivals, the path only with a datagram newer than any before
        (open_newest)."""
        for keys, frames, size, newest in open_newest(
            datagrams, self._udp_opener, lambda reason: self._drop_datagram(reason, path[0])
        ):
            session = self.udp_sessions[keys.session_id]
            arrived = arrivals.get(session) or arrivals.setdefault(session, Arrivals(keys))
            arrived.keys = keys
            if newest:
                arrived.path = path
            arrived.frames += frames
            arrived.size += size

    def _udp_opener(self, session_id: int) -> DatagramKeys | None:
        session = self.udp_sessions.get(session_id)
        return session.udp.openers.get(session_id) if session is not None and session.udp is not None else None

    def _on_session_datagrams(self, session: ServerSession, arrived: Arrivals) -> None:
        """A session's authenticated frames of one turn: only they move its path (to the
        newest datagram's node and local address) or reach the switch, a burst's TCP
        pieces joined into one super-packet first."""
        udp = session.udp
        if not arrived.frames or udp is None:
            return
        if arrived.keys is not udp.sealer:  # the node uses a rekey's keys: the old ones retire
            for old_id in udp.retire_all_but(arrived.keys):
                self.udp_sessions.pop(old_id, None)
        frames, token = arrived.frames, session.node_token
        if arrived.path is not None:
            if udp.addr is not None and arrived.path[0] != udp.addr:
                self.note("udp-moved:" + token, "node %s: UDP now from %s", token, unmapped(str(arrived.path[0][0])))
            moved = arrived.path[0] != udp.addr
            udp.addr, udp.local = arrived.path
            if moved and session.direct_key:
                self.addressed(session)
        session.last_rx = self.epoll.now
        if (report := udp.heard(self.epoll.now, arrived.size)) is not None:
            self._queue_datagrams(session, [report])  # the node learns whether it may group
        session.rx_packets += len(frames)  # less the keepalives, below
        for frame in coalesce_pieces(frames):
            if session.detached:
                return  # refused for a frame before this one
            kind = frame[0]
            if kind == FRAME_PACKET or (kind == FRAME_GSO_PACKET and session.gso):
                try:  # writable: a GSO frame's header is rebuilt in place
                    view = memoryview(frame if isinstance(frame, bytearray) else bytearray(frame))
                    self.route_from_node(session, view, kind, 4, len(frame))
                except BadFrame as e:
                    try:
                        self.bad_frame(session, e)
                    except OverBudget as error:
                        self.refuse(session, Refusal("protocol", str(error), retry=False))
            elif kind == FRAME_KEEPALIVE:
                session.rx_packets -= 1
                self._queue_datagrams(session, [encode_frame(FRAME_KEEPALIVE)])  # the node's probe, answered
            elif not udp.on_report(frame):
                self._drop_datagram("not-a-packet", udp.addr or ("?", 0))

    def drop_plane(self, plane: Plane) -> None:
        """A deleted network's TUN leaves the loop (its sessions were refused first)."""
        self.tun_planes.pop(plane.tun.fd, None)
        with contextlib.suppress(OSError, ValueError):
            self.epoll.unregister(plane.tun.fd)
        plane.close()

    def close_planes(self) -> None:
        for plane in list(self.planes.values()):
            plane.close()
        self.planes.clear()
        self.tun_planes.clear()


class PeerIntroductions:
    """Which nodes may reach which directly, as the switch decides who may talk to whom:
    two established sessions of one network with interconnection on, both on "direct".
    Each is introduced to the other (FRAME_PEERS "add", both in the same loop turn, so
    both probe at once); a session detached is withdrawn from every peer told of it."""

    def __init__(self, dirty: set[ServerSession]) -> None:
        self.dirty = dirty
        self.told: dict[ServerSession, set[ServerSession]] = {}  # a session -> the peers that know of it
        self.last: dict[ServerSession, float] = {}  # when each was last introduced
        self.pending: set[ServerSession] = set()  # moved again within a second: introduced at the next tick
        self.said: dict[ServerSession, list] = {}  # directPeers reports, checked at the next tick

    def said_direct(self, session: ServerSession, value: Any) -> None:
        """A node's directPeers report (a list of at most MAX_DIRECT_PEERS_REPORTED, else
        ignored), checked against what it was told at the next tick: a node that floods
        reports costs the loop one check a second."""
        if isinstance(value, list) and len(value) <= MAX_DIRECT_PEERS_REPORTED:
            self.said[session] = value

    def moved(self, session: ServerSession, now: float) -> None:
        """The session's datagrams come from a new address: its peers learn it, at most
        once a second per session (a node that hops ports costs its peers no more)."""
        if now - self.last.get(session, -1.0) < 1.0:
            self.pending.add(session)
        else:
            self.introduce(session, now)

    def tick(self, now: float) -> None:
        pending, self.pending = self.pending, set()
        for session in pending:
            self.introduce(session, now)
        said, self.said = self.said, {}
        for session, value in said.items():
            if not session.detached:
                session.direct_peers = reported_direct_peers(value, functools.partial(self.introduced, session)) or ()

    @staticmethod
    def reachable(session: ServerSession) -> bool:
        return bool(session.direct_key) and session.phase == Phase.ESTABLISHED and not session.detached

    @staticmethod
    def info(session: ServerSession) -> PeerInfo:
        """The session as its peers learn it: LAN endpoints, then the address the server sees."""
        seen = session.udp.addr if session.udp is not None else None
        endpoints = list(session.endpoints)
        if seen is not None and (unmapped(str(seen[0])), seen[1]) not in endpoints:
            endpoints.append((unmapped(str(seen[0])), seen[1]))
        groups = CAP_GROUPS in session.caps
        return PeerInfo(session.ip, session.direct_key, tuple(endpoints[:MAX_PEER_ENDPOINTS]), session.gso, groups)

    def introduce(self, session: ServerSession, now: float) -> None:
        plane = session.plane
        if plane is None or not plane.overlay.interconnection or not self.reachable(session):
            return
        self.last[session] = now
        peers = [p for p in plane.by_ip.values() if p is not session and self.reachable(p)]
        if not peers:
            return
        mine = {"add": [self.info(session).encode()]}
        for peer in peers:
            peer.queue(encode_control(FRAME_PEERS, mine))
            self.dirty.add(peer)
            self.told.setdefault(session, set()).add(peer)
            self.told.setdefault(peer, set()).add(session)
        for start in range(0, len(peers), MAX_PEERS_PER_FRAME):
            chunk = peers[start : start + MAX_PEERS_PER_FRAME]
            session.queue(encode_control(FRAME_PEERS, {"add": [self.info(p).encode() for p in chunk]}))
        self.dirty.add(session)

    def introduced(self, session: ServerSession, address: str) -> bool:
        """`address` (a canonical dotted quad) is that of a peer this session was told of
        and that was not withdrawn since."""
        try:
            ip = ipaddress.IPv4Address(address)
        except ValueError:
            return False
        peer = session.plane.by_ip.get(int(ip)) if session.plane is not None else None
        return str(ip) == address and peer is not None and peer in self.told.get(session, ())

    def withdraw(self, session: ServerSession) -> None:
        """Every peer told of this session forgets it (and it is no longer told of them);
        the node list shows no direct path to it from now on."""
        address = str(ipaddress.IPv4Address(session.ip))
        gone = {"remove": [address]}
        self.last.pop(session, None)
        self.pending.discard(session)
        self.said.pop(session, None)
        session.direct_peers = ()
        for peer in self.told.pop(session, set()):
            self.told.get(peer, set()).discard(session)
            peer.direct_peers = tuple(a for a in peer.direct_peers if a != address)
            if not peer.detached:
                peer.queue(encode_control(FRAME_PEERS, gone))
                self.dirty.add(peer)


class SessionRecords:
    """What the store keeps of sessions, written on the store worker so the loop never
    waits for the disk: connection states, the node list's columns, the pools' idle
    order. A disk that cannot take a write (full, read-only) keeps no node out: states
    are reset at every start anyway. Logged once per outage."""

    def __init__(self, store: Datastore, worker: StoreWorker) -> None:
        self.store, self.worker = store, worker
        self.store_unwritable = False  # the last state write failed for a full or read-only disk

    def connected(
        self, token: str, overlay: Overlay, host_name: str, endpoint: str, version: str, name: str = ""
    ) -> None:
        def job() -> None:
            self._state(token, STATE_CONNECTED)
            overlay.bindings.connected(token)
            self._columns(token, host_name, endpoint, "tcp", version)
            with contextlib.suppress(StoreError):  # unnamed until its next session
                self.store.claim_node_name(token, node_name_from(name or host_name))

        self.worker.submit(job)

    def idle(self, token: str, plane: Plane | None) -> None:
        """The session ended; with its plane (it was admitted), last seen is now."""

        def job() -> None:
            self._state(token, STATE_IDLE)
            if plane is not None:
                plane.overlay.bindings.idle(token)
                self._columns(token, "", "", "", "")

        self.worker.submit(job)

    def _columns(self, token: str, host_name: str, endpoint: str, transport: str, version: str) -> None:
        with contextlib.suppress(StoreError):  # a full disk costs only the node list's columns
            self.store.record_session(token, host_name, endpoint, transport, version)

    def _state(self, token: str, state: int) -> None:
        try:
            self.store.set_state(token, state)
        except StoreFull as e:
            if not self.store_unwritable:
                log.warning("%s; admitting nodes without recording their connection state", e)
                self.store_unwritable = True
            return
        if self.store_unwritable:
            log.info("the database takes writes again; connection states are recorded")
            self.store_unwritable = False


class SessionLifecycle:
    """Every node session from a finished TLS handshake to its close, on the server's loop:
    the hello and the admission (the control plane's decision, taken on the store worker),
    the welcome, keepalives and deadlines, refusals, and the states and node-list columns
    the store records. A session's packets go to the switch."""

    def __init__(
        self,
        config: ServerConfig,
        control: ControlPlane,
        switch: Switch,
        worker: StoreWorker,
        stopping: threading.Event,
        counters: collections.Counter[str],
        note: RateLimitedLog,
    ) -> None:
        self.config = config
        self.control = control
        self.store = control.store
        self.keepalive = config.keepalive
        self.switch = switch
        self.epoll = switch.epoll
        self.dirty = switch.dirty
        self.worker = worker
        self.stopping = stopping
        self.counters = counters
        self.note = note
        self.sessions: dict[int, ServerSession] = {}  # by socket fd
        self.by_token: dict[str, ServerSession] = {}  # admitted ones
        self.unauthenticated: set[ServerSession] = set()  # the hello is still to come
        self.send_budget = SendBudget()
        self.buffers = BufferPool()
        self.records = SessionRecords(control.store, worker)
        self.closed_traffic: collections.Counter[str] = collections.Counter()  # of sessions gone (metrics)
        self.replicas: Callable[[], tuple[str, ...]] = tuple  # replicas on etcd: their addresses, for the welcome
        self.introductions = PeerIntroductions(self.dirty)

    def adopt(self, tls: ssl.SSLSocket, peer: str) -> None:
        if self.stopping.is_set():
            tls.close()
            return
        session = ServerSession(tls, peer, self.buffers, self.send_budget, self.counters)
        self.sessions[session.fd] = session
        self.unauthenticated.add(session)
        self.epoll.register(session.fd, select.EPOLLIN)
        log.debug("TLS from %s: certificate CN %s", peer, loggable(session.cert.common_name))
        self.service(session, select.EPOLLIN)  # the hello may have come with the handshake

    def service(self, session: ServerSession, events: int) -> None:
        try:
            if events & select.EPOLLOUT:
                self._flush(session)
            readable = events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR)
            if readable and session.receive(self._handle_frames, once=self.epoll.woke):
                self.epoll.hold(session.fd)  # OpenSSL read ahead of the budget
        except PeerClosed as e:
            self.close(session, str(e))
        except OverBudget as e:  # counted by its budget, under its own reason
            self.refuse(session, Refusal("protocol", str(e), retry=False))
        except ProtocolError as e:
            self.counters["protocol-errors"] += 1
            self.refuse(session, Refusal("protocol", str(e), retry=False))
        except (OSError, ssl.SSLError) as e:
            self.close(session, f"connection error: {e}")
        except Exception:  # a bug must cost one session, never the loop
            log.exception("unexpected error in %r; closing it", session)
            self.close(session, "internal error")

    def _handle_frames(self, session: ServerSession) -> None:
        view = session.rx.view
        for kind, start, end in session.rx.frames():
            if session.phase == Phase.CLOSING:
                continue  # the session is over; drain without acting
            if session.phase == Phase.ESTABLISHED:
                if kind == FRAME_PACKET or (kind == FRAME_GSO_PACKET and session.gso):
                    session.rx_packets += 1
                    try:
                        self.switch.route_from_node(session, view, kind, start, end)
                    except BadFrame as e:
                        self.switch.bad_frame(session, e)
                elif kind in (FRAME_TRANSPORT, FRAME_REKEY) and session.udp is not None:
                    self._on_udp_control(session, session.udp, kind, decode_control(view[start:end]))
                elif kind == FRAME_PEERS and session.direct_key:
                    self._on_endpoints(session, decode_control(view[start:end]))
                elif kind == FRAME_KEEPALIVE or kind >= FRAME_OPTIONAL:
                    continue
                else:
                    raise ProtocolError(f"unexpected frame type {kind:#x} in an established session")
            elif session.phase == Phase.HELLO:
                if kind != FRAME_HELLO:
                    raise ProtocolError("the first frame must be a hello")
                self._on_hello(session, Hello.decode(view[start:end]))
            elif session.phase == Phase.ADMITTING and kind != FRAME_KEEPALIVE and kind < FRAME_OPTIONAL:
                raise ProtocolError("frame sent before the welcome")
            if session.phase == Phase.CLOSED:
                return

    # -- admission --------------------------------------------------------------------

    def _on_hello(self, session: ServerSession, hello: Hello) -> None:
        """Agree on capabilities here; whether the node may connect, and at which
        address, is the control plane's decision (taken on the store worker)."""
        self.unauthenticated.discard(session)
        session.node_token = hello.node_token
        session.host_name, session.version, session.asked_name = hello.host_name, hello.version, hello.name
        # A node refused for its control frames comes back refused until its budget has room
        # again: a reconnect loop costs no admission and no log line per session.
        self.control.budgets.control_frames.spend(hello.node_token, f"node {hello.node_token}", cost=0)
        offered = set(CAPABILITIES) if self.config.offload else set(CAPABILITIES) - {CAP_GSO, CAP_GROUPS}
        if self.switch.udp is None:
            offered.discard(CAP_UDP)
        session.caps = tuple(c for c in hello.caps if c in offered)
        session.gso = CAP_GSO in session.caps
        if CAP_UDP in session.caps:
            session.udp = self.switch.agree_udp(session, hello.udp_key, self.counters, self.note)
            if session.udp is None:  # the node's share is unusable: no UDP for this session
                session.caps = tuple(c for c in session.caps if c != CAP_UDP)
        if CAP_UDP not in session.caps or not session.gso:
            session.caps = tuple(c for c in session.caps if c != CAP_GROUPS)
        if CAP_UDP not in session.caps:
            session.caps = tuple(c for c in session.caps if c != CAP_DIRECT)
        if session.udp is not None and CAP_GROUPS in session.caps:
            session.udp.grouping.size = group_chunk(self.config.mtu)
        session.direct_key = hello.direct_key if CAP_DIRECT in session.caps else b""
        log.debug(
            "hello from %s: node %s, nc %s, offered %s, agreed %s",
            session.peer,
            hello.node_token,
            loggable(hello.version),
            loggable(list(hello.caps)),
            list(session.caps),
        )
        session.phase = Phase.ADMITTING
        cert, token, net_token = session.cert, hello.node_token, hello.net_token
        assert cert is not None
        self.worker.submit(
            lambda: self.control.admit_session(cert, token, net_token),
            lambda result, error: self._on_admitted(session, result, error),
        )

    def _on_udp_control(self, session: ServerSession, udp: ServerDatagramPath, kind: int, message: dict) -> None:
        """Over TLS: where the node wants its data now, or its share for fresh keys. Each
        is spent from the node's control-frame budget (OverBudget past it), and a change
        of path is logged at most once per interval."""
        token = session.node_token
        self._spend_control_frame(session, kind)
        if kind == FRAME_TRANSPORT:
            wanted = message.get("transport") == "udp"
            if wanted != udp.wanted:
                if wanted:
                    udp.wanted = True
                else:
                    self._move_to_stream(udp)
                self.note("transport:" + token, "node %s: data path %s", token, "UDP" if wanted else "TLS/TCP")
            return
        session.queue(encode_control(FRAME_REKEY, self.switch.rekey_udp(session, udp, message.get("udpKey"))))
        self.dirty.add(session)

    def _move_to_stream(self, udp: ServerDatagramPath) -> None:
        """The node asked for its data on the stream: what either side sent as datagrams
        before goes first (UDP_SETTLE_DATAGRAMS). Datagrams queued for the turn's end leave
        now, ahead of stream frames; the node's that wait in the socket are delivered before
        the frames that follow its request on the stream."""
        self.switch.flush_datagrams()
        udp.wanted = False
        self.switch.read_udp(UDP_SETTLE_DATAGRAMS)

    def _spend_control_frame(self, session: ServerSession, kind: int) -> None:
        """Charge the node's control-frame budget (OverBudget past it). The first frame of
        each kind in a session is what the protocol needs (where data goes, the endpoints):
        free, so a node that restarts in a loop is not refused for its restarts."""
        if kind in session.said:
            token = session.node_token
            self.control.budgets.control_frames.spend(token, f"node {token}", now=self.epoll.now)
        session.said.add(kind)

    def _on_endpoints(self, session: ServerSession, message: dict) -> None:
        """Over TLS: the bytes the node sent on direct paths and the peers it reaches
        directly (for the metrics and the node list; cost nothing), or its LAN endpoints:
        it is introduced to its peers now, which is spent from the node's control-frame
        budget like TRANSPORT and REKEY."""
        sent = message.get("directBytes")
        if isinstance(sent, int) and not isinstance(sent, bool) and 0 <= sent < 1 << 63:
            session.direct_bytes = sent
        if "directPeers" in message:
            self.introductions.said_direct(session, message["directPeers"])
        if "endpoints" in message:
            self._spend_control_frame(session, FRAME_PEERS)
            session.endpoints = decode_endpoints(message.get("endpoints"))
            self.introductions.introduce(session, self.epoll.now)

    def _on_admitted(
        self, session: ServerSession, result: tuple[str, ipaddress.IPv4Address] | None, error: BaseException | None
    ) -> None:
        token = session.node_token
        if session.phase in (Phase.CLOSED, Phase.CLOSING):
            if error is None and token not in self.by_token:
                self.records.idle(token, self.switch.planes.get(result[0]) if result else None)
            return
        plane = self.switch.planes.get(result[0]) if result is not None else None
        if error is None and plane is None:
            error = BadRequest("this node's network was deleted")
        if error is not None or result is None or plane is None:
            if isinstance(error, (BadRequest, Unauthenticated)):
                self.counters["refused-hellos"] += 1
                refusal = Refusal("unregistered", str(error), retry=False)
            elif isinstance(error, PoolExhausted):
                refusal = Refusal("overlay-full", str(error), retry=True)
            else:
                refusal = Refusal("server-error", "the server could not admit this node; see its log", retry=True)
            self.refuse(session, refusal)
            return
        old = self.by_token.get(token)
        if old is not None:
            log.info("node %s reconnected from %s; replacing its session from %s", token, session.peer, old.peer)
            self.by_token.pop(token)
            self.refuse(old, Refusal("replaced", "a newer session with this node-token took over", retry=False))
        ip = result[1]
        overlay = plane.overlay
        session.ip = int(ip)
        session.plane = plane
        session.phase = Phase.ESTABLISHED
        self.by_token[token] = session
        plane.by_ip[session.ip] = session
        offer = (b"", 0)
        if session.udp is not None:
            offer = session.udp.offer
            for session_id in session.udp.openers:
                self.switch.udp_sessions[session_id] = session
        welcome = Welcome(
            str(ip),
            overlay.network.prefixlen,
            str(overlay.server_ip),
            self.config.mtu,
            self.keepalive,
            (str(overlay.network),),
            session.caps,
            self.replicas(),
            *offer,
            self.config.udp_port if offer[1] else 0,
        )
        session.queue(welcome.encode())
        self.dirty.add(session)
        self.records.connected(token, overlay, session.host_name, session.peer, session.version, session.asked_name)
        log.info("node %s connected from %s as %s (network %s)", token, session.peer, ip, overlay.name)

    # -- what other threads ask (a copy of a table, then fields only the loop writes) ---------

    def live(self) -> dict[str, dict[str, Any]]:
        """Connected nodes' sessions, for the node list (any thread)."""
        live = {}
        for token, session in list(self.by_token.items()):
            traffic = session_traffic(session)
            live[token] = {"since": session.since, "rx_bytes": traffic["rx_bytes"], "tx_bytes": traffic["tx_bytes"]}
            live[token]["direct_peers"] = list(session.direct_peers)
        return live

    def traffic(self) -> collections.Counter[str]:
        """Bytes and packets per direction since the start, live sessions included (any thread)."""
        total = collections.Counter(self.closed_traffic)
        for session in list(self.sessions.values()):
            total.update(session_traffic(session))
        return total

    def transports(self) -> dict[str, str]:
        """From a gRPC thread: a copy of the table (one C-level step under the GIL), then
        each session's own fields, which only the loop writes."""
        now = time.monotonic()
        return {token: self.path(s, now).name for token, s in dict(self.by_token).items()}

    @staticmethod
    def path(session: ServerSession, now: float) -> PeerPath:
        """Where data for this node goes now: its datagram path while it carries, else its stream."""
        return session.udp if session.udp is not None and session.udp.carrying(now) else session

    # -- output, liveness, teardown -----------------------------------------------------------

    def flush_dirty(self) -> None:
        while self.dirty:
            self._flush(self.dirty.pop())

    def _flush(self, session: ServerSession) -> None:
        if session.phase == Phase.CLOSED:
            return
        try:
            done = session.flush()
        except (OSError, ssl.SSLError) as e:
            self.close(session, f"send failed: {e}")
            return
        if done and session.phase == Phase.CLOSING:
            self.close(session, session.close_reason)
            return
        self._watch_writable(session, not done)

    def _watch_writable(self, session: ServerSession, on: bool) -> None:
        """Ask epoll for EPOLLOUT only while a write is stuck (a syscall saved per flush otherwise)."""
        if session.want_out != on:
            session.want_out = on
            self.epoll.modify(session.fd, select.EPOLLIN | select.EPOLLOUT if on else select.EPOLLIN)

    def tick(self, now: float) -> None:
        """Once a second: deadlines of unfinished hellos and refusals, keepalives, silence."""
        silent_after = 3 * self.keepalive
        for session in list(self.sessions.values()):
            if session.phase == Phase.HELLO and now > session.deadline:
                self.counters["handshake-timeouts"] += 1
                self.close(session, "handshake timed out", quiet=True)
            elif session.phase == Phase.CLOSING and now > session.deadline:
                self.close(session, session.close_reason)
            elif session.phase == Phase.ESTABLISHED:
                if now - session.last_rx > silent_after:
                    self.close(session, f"silent for {silent_after} s")
                elif now - session.last_tx >= self.keepalive:
                    session.queue(encode_frame(FRAME_KEEPALIVE))
                    self.dirty.add(session)
        self.introductions.tick(now)
        self.flush_dirty()

    def refuse_token(self, token: str, refusal: Refusal) -> None:
        session = self.by_token.get(token)
        if session is not None:
            self.refuse(session, refusal)

    def refuse(self, session: ServerSession, refusal: Refusal) -> None:
        """Take the session out of routing, tell the peer why, and close once that
        ERROR frame is written (or after a second, if the peer does not read)."""
        reason = f"refused ({refusal.code}): {refusal.reason}"
        if session.phase in (Phase.TLS, Phase.CLOSED, Phase.CLOSING):
            self.close(session, reason)
            return
        self._detach(session)
        session.drop_queue()  # queued packets are dropped; a started TLS write must finish
        session.queue(refusal.encode())
        session.phase = Phase.CLOSING
        session.deadline = time.monotonic() + 1.0
        session.close_reason = reason
        self._flush(session)

    def _detach(self, session: ServerSession) -> None:
        """Remove the session from routing and record the node as idle (once)."""
        token = session.node_token
        if not token or session.detached:
            return
        session.detached = True
        self.introductions.withdraw(session)
        for session_id in session.udp.openers if session.udp is not None else ():
            if self.switch.udp_sessions.get(session_id) is session:
                del self.switch.udp_sessions[session_id]
        plane = session.plane
        if self.by_token.get(token) is session:
            del self.by_token[token]
            if plane is not None and plane.by_ip.get(session.ip) is session:
                del plane.by_ip[session.ip]
            self.records.idle(token, plane)
        elif session.phase != Phase.ESTABLISHED and token not in self.by_token:
            self.records.idle(token, None)  # undo the handshake's "init" state

    def close(self, session: ServerSession, reason: str | None, quiet: bool = False) -> None:
        if session.phase == Phase.CLOSED:
            return
        self._detach(session)
        session.phase = Phase.CLOSED
        self.sessions.pop(session.fd, None)
        self.unauthenticated.discard(session)
        self.dirty.discard(session)
        with contextlib.suppress(OSError, ValueError):
            self.epoll.unregister(session.fd)
        session.close()
        self.switch.budgets.bad_frames.forget(session)
        self.closed_traffic.update(session_traffic(session))
        if reason is not None:
            if session.ip:
                log.info("node %s disconnected (%s): %s", session.node_token, session.peer, reason)
            elif not quiet:
                self.note("close:" + reason[:40], "connection from %s closed: %s", session.peer, reason)

    def close_all(self) -> None:
        """The loop ends: every node hears why (if its socket takes it), then it is closed."""
        for session in list(self.sessions.values()):
            self.refuse(session, Refusal("server-stopping", "the server is shutting down", retry=True))
            self.close(session, None)


class NetworkServer(Sessions):
    """The data plane of `nc server`: one event loop for every overlay network, and the
    face the rest of the server sees. The loop (this class: the poller, the wake pipe and
    the commands other threads hand it, the once-a-second tick, the listeners and the
    threads) drives two parts: SessionLifecycle, every session from handshake to close,
    and Switch, where each packet goes."""

    def __init__(self, config: ServerConfig, control: ControlPlane) -> None:
        self.config = config
        self.pki = control.pki
        self.overlays = control.overlays
        self.counters: collections.Counter[str] = collections.Counter()
        self.note = RateLimitedLog()
        self.epoll = Poller()
        self.commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.worker = StoreWorker(self.call_soon)
        self.stopping = threading.Event()
        self.switch = Switch(config, self.epoll, set(), self.counters, self.note, control.budgets)
        self.lifecycle = SessionLifecycle(
            config, control, self.switch, self.worker, self.stopping, self.counters, self.note
        )
        self.switch.refuse = self.lifecycle.refuse
        self.switch.addressed = lambda session: self.lifecycle.introductions.moved(session, self.epoll.now)
        self.planes = self.switch.planes  # the same table: run_server reports how many
        self.next_report = 0.0  # when the debug log gets the counters next
        self.thread = threading.Thread(target=self._run, name="network-server", daemon=True)
        self.forwarding = IpForwarding(Path(config.work_dir) / "ip_forward.orig")
        self.listener: socket.socket | None = None  # set by start(); stop() closes what start() made
        self.handshaker: Handshaker | None = None
        self.wake_r = self.wake_w = -1
        self.released = False  # release() ran: addresses and port given up

    @property
    def replicas(self) -> Callable[[], tuple[str, ...]]:
        """Replicas on etcd: their addresses, for the welcome (the lifecycle sends it)."""
        return self.lifecycle.replicas

    @replicas.setter
    def replicas(self, replicas: Callable[[], tuple[str, ...]]) -> None:
        self.lifecycle.replicas = replicas

    # -- start and stop (called from the main thread) ------------------------------

    def start(self) -> None:
        """Port, TUNs, NAT, threads; on any failure what was already made is undone."""
        try:
            self.tls = self._tls_context()
            self.listener = self._listen()
            self.handshaker = Handshaker(self.listener, self.tls, self._deliver_handshake, self.config.source_prefix6)
            self.handshaker.observe = self.lifecycle.control.observe_handshake
            self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self.epoll.register(self.wake_r, select.EPOLLIN)
            if self.config.transport != "tcp":
                self.switch.udp = self._listen_udp()
                self.epoll.register(self.switch.udp.fd, select.EPOLLIN)
            # A killed run's rules, also of networks deleted since or with gateway now off;
            # without iptables there can be none.
            with contextlib.suppress(TunError):
                remove_tagged_rules(lambda _tag: True)
            if self.config.gateway:
                self.forwarding.enable()
                log.info("gateway mode: forwarding and NAT out of this host for the overlays")
            else:
                self.forwarding.restore()  # a killed gateway run's, if any
            for overlay in self.overlays.all():
                self.switch.attach_plane(Plane(overlay, self.config))
        except BaseException:
            self.stop()
            raise
        self.worker.start()
        self.thread.start()
        self.handshaker.start()
        log.info(
            "network service on :%d (TLS 1.3), mtu %d, %d network(s)",
            self.config.port,
            self.config.mtu,
            len(self.planes),
        )

    def release(self) -> None:
        """Give up what another server may need to take over at once, whatever the loop is
        doing: the server addresses (the TUNs go down) and the port (its listener closes).
        The loop is told to end; stop() waits for it and closes the rest."""
        if self.released:
            return
        self.released = True
        self.stopping.set()
        for plane in list(self.switch.planes.values()):
            plane.tun.withdraw()
        if self.handshaker is not None:
            self.handshaker.stop()
        if self.listener is not None:
            self.listener.close()
        if self.thread.is_alive():
            self._wake()

    def stop(self) -> None:
        """Undo start(), a partial one too: only what exists is stopped or closed."""
        self.release()
        if self.thread.is_alive():
            self.thread.join(timeout=10.0)
        if self.worker.is_alive():
            self.worker.stop()
        self._close_planes()
        if self.switch.udp is not None:
            self.switch.udp.close()
        self.epoll.close()
        for fd in (self.wake_r, self.wake_w):
            if fd >= 0:
                os.close(fd)
        self.wake_r = self.wake_w = -1

    def _close_planes(self) -> None:
        self.switch.close_planes()
        self.forwarding.restore()

    def add_overlay(self, overlay: Overlay) -> None:
        """A network created at run time: its TUN is made here (errors reach the
        caller), then the loop starts serving it."""
        plane = Plane(overlay, self.config)
        self.call_soon(lambda: self.switch.attach_plane(plane))

    def remove_overlay(self, name: str) -> None:
        """A deleted network: its nodes are cut off and its TUN removed."""
        self.call_soon(lambda: self._detach_plane(name))

    def _detach_plane(self, name: str) -> None:
        plane = self.switch.planes.pop(name, None)
        if plane is None:
            return
        for session in [s for s in self.lifecycle.sessions.values() if s.plane is plane]:
            self.lifecycle.refuse(session, Refusal("network-deleted", f"network {name} was deleted", retry=False))
        self.switch.drop_plane(plane)

    def _tls_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_cert_chain(self.pki.network.server_cert_path, self.pki.network.server_key_path)
        context.load_verify_locations(cafile=str(self.pki.network.ca_path))
        context.verify_mode = ssl.CERT_REQUIRED
        return context

    def _listen(self) -> socket.socket:
        try:
            sock = listen_any(self.config.port)
        except OSError as e:
            raise NcError(
                f"cannot listen on :{self.config.port} ({e.strerror}); stop what uses it or change server.port"
            ) from None
        sock.setblocking(False)
        return sock

    def _listen_udp(self) -> DatagramSocket:
        try:
            return DatagramSocket(self.config.udp_port, local_source=True)
        except OSError as e:
            raise NcError(
                f"cannot listen on UDP :{self.config.udp_port} ({e.strerror}); stop what uses it, "
                "change server.udpPort, or set server.transport: tcp"
            ) from None

    # -- called from other threads ------------------------------------------------

    def call_soon(self, fn: Callable[[], None]) -> None:
        self.commands.put(fn)
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self.wake_w, b"!")

    def _deliver_handshake(self, tls: ssl.SSLSocket, peer: str) -> None:
        """From the Handshaker: a stream whose TLS is done joins the loop."""
        self.call_soon(lambda: self.lifecycle.adopt(tls, peer))

    def disconnect(self, token: str, reason: str) -> None:
        """End the node's live session (if any), telling it not to come back."""
        self.call_soon(lambda: self.lifecycle.refuse_token(token, Refusal("unregistered", reason, retry=False)))

    def live(self) -> dict[str, dict[str, Any]]:
        return self.lifecycle.live()

    def traffic(self) -> collections.Counter[str]:
        return self.lifecycle.traffic()

    def transports(self) -> dict[str, str]:
        return self.lifecycle.transports()

    def running(self) -> bool:
        """The packet loop is alive and turning (health checks ask this): a loop that is
        stuck, in a bug or in one frame that costs too much, counts as down too."""
        stalled = time.monotonic() - self.epoll.now >= LOOP_STALL_S
        return self.thread.is_alive() and not self.stopping.is_set() and not stalled

    # -- the loop -------------------------------------------------------------------

    def _run(self) -> None:
        lifecycle, switch = self.lifecycle, self.switch
        sessions, tun_planes = lifecycle.sessions, switch.tun_planes
        udp_fd = switch.udp.fd if switch.udp is not None else -1
        next_tick = time.monotonic() + 1.0
        try:
            while not self.stopping.is_set():
                for fd, events in self.epoll.poll(1.0):
                    if (session := sessions.get(fd)) is not None:
                        lifecycle.service(session, events)
                    elif (plane := tun_planes.get(fd)) is not None:
                        switch.read_tun(plane)
                    elif fd == udp_fd:
                        switch.read_udp()
                    elif fd == self.wake_r:
                        self._run_commands()
                switch.flush_datagrams()
                lifecycle.flush_dirty()
                now = self.epoll.now
                if now >= next_tick:
                    self._tick(now)
                    next_tick = now + 1.0
        finally:  # an exception goes on to the supervisor, which ends the process
            lifecycle.close_all()

    def _run_commands(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.wake_r, 4096):
                pass
        while True:
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return
            try:
                command()
            except Exception:  # a bug in one command (one admission, one disconnect) must not end the loop
                log.exception("network command failed")

    def _tick(self, now: float) -> None:
        if now >= self.next_report:
            self.next_report = now + 60.0
            lifecycle = self.lifecycle
            log.debug(
                "%d session(s), %d connected, %d byte(s) queued; counters %s, handshakes %s",
                len(lifecycle.sessions),
                len(lifecycle.by_token),
                lifecycle.send_budget.queued,
                dict(self.counters),
                dict(self.handshaker.counters),
            )
        self.lifecycle.tick(now)


# ============================================================================
# 12. Network client
#    `nc client`, split like the server: which server to try next (ServerFollower),
#    the node's TUN and routes (NodeInterface), one session's packet pump
#    (NodeSession), and the loop that connects and reconnects (NetworkClient).
# ============================================================================


HANDSHAKE_TIMEOUT_S = 10.0  # to connect, and then for the welcome


BACKOFF_CAP_S = 30.0


STABLE_SESSION_S = 10.0  # a session that lasted this long resets the reconnect backoff


RENEW_CHECK_S = 60.0  # how often at most the client looks at its certificates' age


CERTS_RENEWED = "certificates renewed"  # a session ended by this reconnects at once


TRANSPORT_CHANGED = "client.yml names another transport"  # SIGHUP: reconnect at once to apply it


# What SIGHUP applies to a running client; any other field of client.yml needs a restart.
CLIENT_RELOADABLE_FIELDS = ("debug", "transport", "server_addr")


UNEXPECTED_CONNECT_ERROR = "unexpected error while connecting"  # a bug: logged, retried with backoff


class Refused(NcError):
    """The server ended the session and said reconnecting will not help."""

    exit_code = EXIT_REFUSED

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code  # the refusal's code: "unregistered" when the server no longer knows this node


class StopRequested(BaseException):
    """Raised by the signal handler to abandon a blocking connect."""


class ServerFollower:
    """Which server the node tries next: the replicas it knows, in order, the leader a
    standby named, and replicas a welcome names; and how long to wait between rounds."""

    def __init__(self, server_addr: str, port: int, counters: collections.Counter[str]) -> None:
        self.servers = server_addresses(server_addr)  # the replicas this node knows, in trying order
        self.server = self.servers[0] if self.servers else server_addr
        self.port = port
        self.counters = counters
        self.leader_hint = ""  # a standby's refusal named the leader: try it next
        self.backoff = 0.5

    @property
    def address(self) -> str:
        return host_port(self.server, self.port)

    @property
    def connect_timeout(self) -> float:
        return HANDSHAKE_TIMEOUT_S if len(self.servers) < 2 else REPLICA_CONNECT_TIMEOUT_S

    def follow(self) -> bool:
        """After a failed or ended session: move to the leader a standby named, else to
        the next known replica. False with one server (the old single-server retry)."""
        hint, self.leader_hint = self.leader_hint, ""
        if hint and hint != self.server:
            if hint not in self.servers:
                self.servers.append(hint)
            self.server = hint
            return True
        if len(self.servers) < 2:
            return False
        index = self.servers.index(self.server) if self.server in self.servers else -1
        self.server = self.servers[(index + 1) % len(self.servers)]
        self.counters["replica-switches"] += 1
        return self.counters["replica-switches"] % (2 * len(self.servers)) != 0  # a full round: back off once

    def learn(self, replicas: Iterable[str]) -> None:
        """Replicas added since the join, named by a welcome: followed from now on."""
        learned = [r for r in replicas if r not in self.servers]
        if learned:
            self.servers.extend(learned)
            log.info("server replicas: %s", ", ".join(self.servers))

    def reset(self, servers: list[str], connected: bool) -> None:
        """The replica list client.yml names now (SIGHUP). A live session stays where it
        is; the next connect goes to a listed replica."""
        self.servers = servers
        if self.server not in servers:
            if connected:
                self.leader_hint = servers[0]  # follow() moves there when this session ends
            else:
                self.server = servers[0]

    def session_lasted(self, seconds: float) -> None:
        if seconds > STABLE_SESSION_S:
            self.backoff = 0.5

    def next_delay(self) -> float:
        """The wait before the next round: doubling, with jitter, up to a cap (short with
        several replicas: one is normally up within a lease's time)."""
        self.backoff = min(self.backoff * 2, BACKOFF_CAP_S if len(self.servers) < 2 else REPLICA_BACKOFF_CAP_S)
        return random.uniform(0.5, 1.0) * self.backoff


class NodeInterface:
    """The node's side of the kernel: the nc0 TUN (made at the first welcome, kept across
    sessions), its address, and the routes the welcome and redirectGateway ask for."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.tun: Tun | None = None
        self.reader: TunReader | None = None
        self.routes = RouteSet()
        self.address: ipaddress.IPv4Interface | None = None
        self.gso = False  # this session agreed on FRAME_GSO_PACKET
        self.server_mtu = DEFAULT_MTU  # the welcome's: the largest segment the server may send

    def ensure(self, welcome: Welcome) -> Tun:
        """The TUN device, created at the first welcome and kept across sessions."""
        self.gso = CAP_GSO in welcome.caps
        self.server_mtu = welcome.mtu
        if self.tun is None:
            self.tun = Tun(NODE_TUN_NAME, offload=self.gso)
            self.reader = TunReader(self.tun)
        return self.tun

    def configure(self, welcome: Welcome, server_ip: str) -> str | None:
        """Address and routes, set again only when the address changed; returns why
        that failed (the session then ends and is retried from scratch)."""
        assert self.tun is not None
        if self.address == welcome.interface:
            return None
        if self.address is not None:
            log.warning("overlay address changed from %s to %s", self.address, welcome.interface)
        self.routes.close()
        self.address = None  # until it is configured in full
        try:
            self.tun.configure(welcome.interface, min(self.config.mtu, welcome.mtu))
            self._add_welcome_routes(welcome)
            if self.config.redirect_gateway:
                self._redirect_gateway(server_ip)
        except TunError as e:
            self.routes.close()
            return f"cannot configure {self.tun.name}: {e}"
        self.address = welcome.interface
        return None

    def _add_welcome_routes(self, welcome: Welcome) -> None:
        """Routes the server hands out, beyond the overlay subnet itself. One that
        clashes with a route of this host is skipped: the host's own routing wins."""
        assert self.tun is not None
        for route in welcome.routes:
            if ipaddress.IPv4Network(route).subnet_of(welcome.interface.network):
                continue
            try:
                self.routes.add(route, "dev", self.tun.name)
                log.info("routing %s into the tunnel, as the server asks", route)
            except TunError as e:
                log.warning("not routing %s into the tunnel: %s", route, e)

    def _redirect_gateway(self, server_ip: str) -> None:
        """All IPv4 traffic into the tunnel, except the tunnel itself: a host route to an
        IPv4 server via today's path, then 0/1 and 128/1 (more specific than default).
        A tunnel over IPv6 needs no exception: IPv4 routes cannot capture it."""
        assert self.tun is not None
        if ipaddress.ip_address(server_ip).version == 4:
            path = route_to(server_ip)
            spec = [f"{server_ip}/32"] + (["via", path["gateway"]] if "gateway" in path else []) + ["dev", path["dev"]]
            self.routes.replace(*spec)  # the one route a killed run leaves behind
        self.routes.add("0.0.0.0/1", "dev", self.tun.name)
        self.routes.add("128.0.0.0/1", "dev", self.tun.name)

    def close(self) -> None:
        self.routes.close()
        if self.tun is not None:
            self.tun.close()
            self.tun = None
            log.info("removed TUN device and routes")


def peer_table(udp: DatagramPath, private: Any, share: bytes, welcome: Welcome, server_ip: str) -> PeerTable:
    """The session's direct paths over its datagram socket, and the LAN endpoint the
    server is to hear first: the address this host reaches the server from, the socket's port."""
    peers = PeerTable(udp.sock, private, share, int(ipaddress.IPv4Address(welcome.ip)), udp.counters)
    peers.mtu = welcome.mtu
    endpoints = []
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(server_ip).version == 6 else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((server_ip, udp.server[1]))
            endpoints.append([unmapped(probe.getsockname()[0]), udp.sock.sock.getsockname()[1]])
    except (OSError, ValueError):
        pass  # no LAN candidate: peers try the address the server sees
    peers.report = encode_control(FRAME_PEERS, {"endpoints": endpoints})
    return peers


def send_tun_split(session: NodeSession, peers: PeerTable, limit: int) -> None:
    """_read_tun while some peer's direct path is up: up to `limit` packets from the TUN,
    each to its destination's direct path, the rest on the server path as before
    (datagrams while it carries, else the TLS stream), in batches of UDP_SEND_BATCH."""
    reader, offload, udp, mtu = session.reader, session.tun.offload, session.udp, session.server_mtu
    carrying = udp is not None and udp.carrying
    offset = VNET_HDR_LEN + 16 if offload else 16  # the destination address in what the TUN gives
    batches: dict[Any, list[bytes]] = {}
    for _ in range(limit):
        if udp is not None and udp.backlog:
            break
        try:
            length = reader.read()
        except (BlockingIOError, InterruptedError):
            break
        packet = reader.packet(length)
        peer: Any = peers.path_for(bytes(packet[offset : offset + 4])) if length >= offset + 4 else None
        if peer is None and not carrying:
            session.link.send_read(reader, length, session.gso)
            continue
        path = peer if peer is not None else udp
        frames = batches.setdefault(path, [])
        gso = peer.gso if peer is not None else session.gso
        if offload:  # each burst named by the counter its first piece will get
            keys = peer.sealer if peer is not None else udp.keys  # type: ignore[union-attr]
            frames += datagram_frames(packet, mtu, gso, keys.sent + len(frames), path.chunk > 0)
        else:
            frames.append(reader.frame(FRAME_PACKET, length))
        if batch_full(frames):
            path.send(frames)
            batches[path] = []
    for path, frames in batches.items():
        if frames:
            path.send(frames)


class NodeSession:
    """One session's packet pump: TUN to server and back over the TLS link, or over the
    UDP path while it carries; keepalives, the UDP path's probes and rekeys."""

    def __init__(
        self,
        link: Link,
        welcome: Welcome,
        udp: DatagramPath | None,
        interface: NodeInterface,
        client: NetworkClient,
    ) -> None:
        assert interface.tun is not None and interface.reader is not None
        self.link, self.welcome, self.udp = link, welcome, udp
        self.tun, self.reader = interface.tun, interface.reader
        self.gso, self.server_mtu = interface.gso, interface.server_mtu
        self.client = client  # its stop and renewal events, wake pipe, counters, refusal handling
        self.counters = client.counters
        self.chooser = PathChooser(time.monotonic())  # auto: datagrams or the stream, by what the link shows
        self.told = "tcp"  # where the server was last told to send data (a session starts on the stream)
        self.settling = False  # data just moved to the stream: the server's datagrams before it go first

    def pump(self) -> str | None:
        """Move packets until the session ends; returns why (None when stopping)."""
        link, udp, client = self.link, self.udp, self.client
        poller = Poller()
        tun_fd = self.tun.fd
        try:
            poller.register(link.fd, select.EPOLLIN)
            poller.register(tun_fd, select.EPOLLIN)
            poller.register(client.wake_r, select.EPOLLIN)
            udp_fd, udp_stalled = -1, False
            if udp is not None:
                udp_fd = udp.fd
                poller.register(udp_fd, select.EPOLLIN)
                self._tick_datagram_path(udp, time.monotonic())  # the first probe (udp mode: the TRANSPORT frame)
            keepalive = self.welcome.keepalive
            next_tick = time.monotonic() + 1.0
            next_udp_tick = next_choice = time.monotonic() + 0.25
            want_out = False
            self._deliver(link)  # frames that came in the same read as the welcome
            poller.hold(link.fd)  # and records OpenSSL read ahead with it
            while not client.stop.is_set():
                if client.renewed.is_set():
                    with contextlib.suppress(OSError):
                        os.read(client.wake_r, 64)
                    return CERTS_RENEWED
                if client.reload_if_asked():
                    return TRANSPORT_CHANGED
                for fd, events in poller.poll(0.25 if udp is not None else 1.0):
                    if fd == tun_fd:
                        self._read_tun(1 if poller.woke else 256)
                    elif fd == udp_fd:
                        if events & select.EPOLLOUT:
                            udp.flush()  # type: ignore[union-attr]
                        if events & select.EPOLLIN:
                            self._read_datagrams(1 if poller.woke else UDP_DATAGRAMS_PER_TURN)
                    elif fd == link.fd and link.receive(self._deliver, once=poller.woke):
                        poller.hold(link.fd)
                if udp is not None and bool(udp.backlog) != udp_stalled:
                    # A full socket: wait for room before reading more from the TUN, so the
                    # queue stays short and the inner TCP feels the limit instead of losses.
                    udp_stalled = bool(udp.backlog)
                    poller.modify(udp_fd, select.EPOLLIN | select.EPOLLOUT if udp_stalled else select.EPOLLIN)
                    poller.modify(tun_fd, 0 if udp_stalled else select.EPOLLIN)
                now = poller.now
                if udp is not None and now >= next_choice:
                    next_choice = now + AUTO_OBSERVE_S
                    if now >= next_udp_tick:
                        next_udp_tick = now + 0.25
                        self._tick_datagram_path(udp, now)
                    else:
                        self._choose_path(udp, now)
                blocked = not link.flush()
                if blocked != want_out:
                    want_out = blocked
                    poller.modify(link.fd, select.EPOLLIN | select.EPOLLOUT if blocked else select.EPOLLIN)
                if now >= next_tick:
                    next_tick = now + 1.0
                    if now - link.last_rx > 3 * keepalive:
                        return f"server silent for {3 * keepalive} s"
                    if now - link.last_tx >= keepalive:
                        link.queue(encode_frame(FRAME_KEEPALIVE))
            return None
        except PeerClosed:
            return "server closed the connection"
        except (OSError, ssl.SSLError) as e:
            return f"connection error: {e}"
        except ProtocolError as e:
            return f"protocol error: {e}"
        finally:
            poller.close()

    def _tick_datagram_path(self, udp: DatagramPath, now: float) -> None:
        """Probe and rekey the UDP path, report on the direct paths, then choose the path."""
        udp.tick(now)
        if udp.peers is not None:
            if udp.peers.report is not None:
                self.link.queue(udp.peers.report)
                udp.peers.report = None
            udp.peers.tick(now)
            if (report := udp.peers.direct_report(now)) is not None:
                self.link.queue(report)
        if (rekey := udp.rekey_request(now)) is not None:
            self.link.queue(rekey)
        self._choose_path(udp, now)

    def _choose_path(self, udp: DatagramPath, now: float) -> None:
        """In auto choose where data goes while the UDP path is up; tell the server of each
        change of path (over TLS)."""
        if udp.mode == "auto" and udp.state == DatagramPath.UP:
            why = self.chooser.observe(now, udp.loss_sample(), stream_counters(self.link.sock))
            # Datagrams the full socket still holds go first: packets of one flow that took
            # the stream past them would arrive reordered, and cost it retransmissions.
            udp.preferred = self.chooser.datagrams or (udp.preferred and bool(udp.backlog))
            if why is not None:
                log.info("auto: %s", why)
        wanted = "udp" if udp.carrying else "tcp"
        if wanted != self.told:
            self.told = wanted
            self.settling = wanted == "tcp" and udp.state == DatagramPath.UP
            self.link.queue(encode_control(FRAME_TRANSPORT, {"transport": wanted}))
            if wanted == "udp":
                log.info("data path: UDP to %s", unmapped(udp.server[0]))
            elif udp.state == DatagramPath.UP:
                log.info("data path: TLS/TCP to %s (the UDP path stays up, probed)", unmapped(udp.server[0]))

    def _read_datagrams(self, limit: int) -> None:
        udp = self.udp
        assert udp is not None
        buffers = []  # virtio_net_hdr + packet, checked
        for frame in coalesce_pieces(udp.receive(limit)):
            kind, view = frame[0], memoryview(frame)[4:]
            try:
                if kind == FRAME_PACKET:
                    check_packet(view, self.server_mtu)
                    buffers.append(ZERO_VNET_HDR + view)
                elif kind == FRAME_GSO_PACKET and self.gso:
                    buffers.append(gso_header(view, self.server_mtu) + view[VNET_HDR_LEN:])
                elif kind == FRAME_LINK_REPORT:  # the server's: peers' reports stay in PeerTable.accept
                    udp.on_report(frame)
            except BadFrame as e:
                self.counters["dropped-" + e.reason] += 1
        write_tun_batch(self.tun, buffers, self._tun_write_failed)
        if udp.state == DatagramPath.PROBING and udp.last_rx >= udp.since:
            self._tick_datagram_path(udp, time.monotonic())  # the probe answered: switch now

    def _tun_write_failed(self, _error: OSError) -> None:
        self.counters["dropped-tun-write"] += 1

    def _read_tun(self, limit: int) -> None:
        if self.udp is not None and self.udp.peers is not None and self.udp.peers.path_for_any():
            send_tun_split(self, self.udp.peers, limit)
            return
        udp = self.udp if self.udp is not None and self.udp.carrying else None
        if udp is not None:
            self._send_tun_datagrams(udp, limit)
            return
        reader = self.reader
        for _ in range(limit):
            try:
                length = reader.read()
            except (BlockingIOError, InterruptedError):
                return
            self.link.send_read(reader, length, self.gso)  # what it drops, it counts

    def _send_tun_datagrams(self, udp: DatagramPath, limit: int) -> None:
        """Up to `limit` packets from the TUN as datagrams, sent UDP_SEND_BATCH at a time
        (the acks of a bulk download in one send, not one each); a full socket stops the
        reads, and the rest waits in the TUN's queue."""
        reader, offload, frames = self.reader, self.tun.offload, []
        for _ in range(limit):
            if udp.backlog:
                break
            try:
                length = reader.read()
            except (BlockingIOError, InterruptedError):
                break
            if offload:  # each burst named by the counter its first piece will get
                packet, burst = reader.packet(length), udp.keys.sent + len(frames)
                frames += datagram_frames(packet, self.server_mtu, self.gso, burst, udp.chunk > 0)
            else:
                frames.append(reader.frame(FRAME_PACKET, length))
            if batch_full(frames):
                udp.send(frames)
                frames = []
        if frames:
            udp.send(frames)

    def _deliver(self, link: Link) -> None:
        view, frames = link.rx.view, link.rx.frames()
        for kind, start, end in self._settled(frames) if self.settling else frames:
            self._deliver_frame(view, kind, start, end)

    def _settled(self, frames: Iterator[tuple[int, int, int]]) -> Iterator[tuple[int, int, int]]:
        """frames, while data has just moved to the stream: the first packet on it comes after
        the server's switch, so the datagrams it sent before are here already; they are
        delivered ahead of it (UDP_SETTLE_DATAGRAMS)."""
        for frame in frames:
            if self.settling and frame[0] in (FRAME_PACKET, FRAME_GSO_PACKET):
                self.settling = False
                self._read_datagrams(UDP_SETTLE_DATAGRAMS)
            yield frame

    def _deliver_frame(self, view: memoryview, kind: int, start: int, end: int) -> None:
        """One frame from the server, off the TLS stream or out of a datagram."""
        fd, offload = self.tun.fd, self.tun.offload
        try:
            if kind == FRAME_PACKET:
                check_packet(view[start:end], self.server_mtu)
                if offload:
                    os.writev(fd, [ZERO_VNET_HDR, view[start:end]])
                else:
                    os.write(fd, view[start:end])
            elif kind == FRAME_GSO_PACKET and self.gso:
                view[start : start + VNET_HDR_LEN] = gso_header(view[start:end], self.server_mtu)
                if offload:
                    os.write(fd, view[start:end])
                else:
                    for packet in plain_packets(view[start:end]):
                        os.write(fd, packet)
            elif kind == FRAME_ERROR:
                self.client.on_refusal(Refusal.decode(view[start:end]))
                raise PeerClosed("server ended the session")
            elif kind == FRAME_REKEY and self.udp is not None:
                self.udp.on_rekey(decode_control(view[start:end]), time.monotonic())
            elif kind == FRAME_PEERS and self.udp is not None and self.udp.peers is not None:
                self.udp.peers.update(decode_control(view[start:end]), time.monotonic())
            elif kind != FRAME_KEEPALIVE and kind < FRAME_OPTIONAL:
                raise ProtocolError(f"unexpected frame type {kind:#x}")
        except BadFrame as e:  # the kernel never sees a virtio_net_hdr it was not meant to
            self.counters["dropped-" + e.reason] += 1
        except OSError:
            self.counters["dropped-tun-write"] += 1


def node_tls_context(config: ClientConfig) -> ssl.SSLContext:
    """The node's TLS 1.3 context for the data port: its network certificate, the network CA."""
    certs = Path(config.network_cert_dir)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        context.load_verify_locations(cafile=str(certs / "ca.crt"))
        context.load_cert_chain(certs / "client.crt", certs / "client.key")
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(
            f"{certs}: cannot load the network certificates ({e}); join again or fix client.networkCertDir"
        ) from None
    return context


class NetworkClient:
    """`nc client`'s connection to the server: connect (TLS, hello, welcome, the UDP path's
    keys), run a NodeSession on the node's interface, and reconnect forever, following
    replicas, until stopped or refused for good."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.stop = threading.Event()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.interface = NodeInterface(config)
        self.udp: DatagramPath | None = None  # this session's UDP data path, if the server agreed
        self.udp_private: Any = None  # this session's X25519 key, offered in the hello
        self.connecting = False  # inside _connect: a stop request interrupts it
        self.counters: collections.Counter[str] = collections.Counter()
        self.follower = ServerFollower(config.server_addr, config.port, self.counters)
        finish_credential_update(config)
        self.context = node_tls_context(self.config)
        self.renewed = threading.Event()  # the renewer saved new certificates: reconnect with them
        self.server_ip = ""  # serverAddr as resolved for the current session
        self.link: Link | None = None  # the live session, for `nc status`
        self.connected_since = 0.0  # epoch seconds; 0 while not connected
        self.last_error = ""
        self.config_path = str(Path(config.work_dir) / "client.yml")  # what SIGHUP re-reads
        self.reload_wanted = threading.Event()
        self.wake = threading.Event()  # ends a wait between attempts early: a stop or a reload

    def on_renewed(self) -> None:
        """Called by the renewer: the next session uses the new certificates."""
        self.renewed.set()
        with contextlib.suppress(OSError):
            os.write(self.wake_w, b"!")

    def request_reload(self) -> None:
        """Signal handler (SIGHUP): re-read client.yml at the loop's next turn."""
        self.reload_wanted.set()
        self.wake.set()
        with contextlib.suppress(OSError):
            os.write(self.wake_w, b"!")

    def reload_if_asked(self) -> bool:
        """Apply a pending SIGHUP; True when the session must reconnect to apply it."""
        if not self.reload_wanted.is_set():
            return False
        self.reload_wanted.clear()
        with contextlib.suppress(OSError):
            os.read(self.wake_r, 64)
        return reload_client_config(self.config, self.config_path, self.follower, self.link is not None)

    def _pause(self, seconds: float) -> None:
        """The wait between attempts: a stop ends it, a reload is applied at once."""
        deadline = time.monotonic() + seconds
        while not self.stop.is_set() and (left := deadline - time.monotonic()) > 0:
            self.wake.wait(left)
            self.wake.clear()
            self.reload_if_asked()

    def request_stop(self) -> None:
        """Signal handler: stop now. A connect in progress may block for seconds
        (an unreachable server), so it is interrupted rather than waited for."""
        self.stop.set()
        self.wake.set()
        with contextlib.suppress(OSError):
            os.write(self.wake_w, b"!")
        if self.connecting:
            raise StopRequested

    def run(self) -> int:
        """Connect, pump, reconnect: forever, until stopped or refused for good. The wait
        between attempts doubles (with jitter, capped) until a session has stayed up for a
        while, so a server that accepts and drops at once is not hammered."""
        try:
            while not self.stop.is_set():
                self.reload_if_asked()
                reason, session_ended = self._one_attempt()
                if reason is None:
                    break  # asked to stop
                if reason in (CERTS_RENEWED, TRANSPORT_CHANGED):
                    log.info("reconnecting: %s", reason)
                    continue
                if reason != UNEXPECTED_CONNECT_ERROR and self.follower.follow():
                    if session_ended:
                        self.last_error = reason
                        log.warning("%s; trying replica %s", reason, self.follower.server)
                    else:
                        log.info("%s; trying replica %s", reason, self.follower.server)
                        self._pause(random.uniform(0.05, 0.2))  # another replica: no backoff
                    continue
                self.last_error = reason
                delay = self.follower.next_delay()
                log.warning("%s; retrying in %.1f s", reason, delay)
                self._pause(delay)
        finally:
            self.stop.set()
            self.interface.close()
        return 0

    def _one_attempt(self) -> tuple[str | None, bool]:
        """Connect once and run the session; returns why it ended (None: asked to stop),
        and whether a session had started (False: the connect failed)."""
        check_certificate_alive(self.config)
        if self.renewed.is_set():
            self.renewed.clear()
            self.context = node_tls_context(self.config)
        try:
            self.connecting = True
            try:
                link, welcome = self._connect()
            finally:
                self.connecting = False
        except StopRequested:
            return None, False
        except Refused:
            raise
        except (OSError, ssl.SSLError, ProtocolError, TunError) as e:
            return f"cannot connect to {self.follower.address}: {e}", False
        except Exception:  # a bug must not end a client that should reconnect forever
            log.exception("unexpected error while connecting")
            return UNEXPECTED_CONNECT_ERROR, False
        started = time.monotonic()
        try:
            self.interface.ensure(welcome)  # a host that cannot make one ends the client
            self.follower.learn(welcome.replicas)
            reason = self.interface.configure(welcome, self.server_ip)
            if reason is None:
                self._log_connected(welcome)
                self.link, self.connected_since = link, time.time()
                reason = NodeSession(link, welcome, self.udp, self.interface, self).pump()
        finally:
            self.link, self.connected_since = None, 0.0
            link.close()
            self._close_datagram_path()
        if reason is None or reason in (CERTS_RENEWED, TRANSPORT_CHANGED):
            return reason, True
        self.follower.session_lasted(time.monotonic() - started)
        log.debug("session counters %s", dict(self.counters))
        return f"disconnected: {reason}", True

    def _log_connected(self, welcome: Welcome) -> None:
        mtu = min(self.config.mtu, welcome.mtu)
        log.info("connected to %s as %s (mtu %d)", self.follower.address, welcome.interface, mtu)
        log.debug(
            "welcome: server %s, routes %s, keepalive %d s, capabilities %s",
            welcome.server_ip,
            list(welcome.routes),
            welcome.keepalive,
            list(welcome.caps),
        )

    def status(self) -> dict[str, Any]:
        """What `nc status` shows (asked from the status socket's thread)."""
        link, since, udp, address = self.link, self.connected_since, self.udp, self.interface.address
        connected = link is not None and since > 0
        paths: list[PeerPath] = [p for p in (link, udp) if p is not None] if connected else []
        carrying = udp if udp is not None and udp.carrying else link
        return {
            "state": "connected" if connected else "connecting",
            "nodeToken": self.config.token,
            "overlayIp": str(address.ip) if connected and address else "",
            "server": self.follower.address,
            "transport": carrying.name if connected and carrying is not None else "",
            "connectedSince": datetime.datetime.fromtimestamp(since).astimezone().isoformat(timespec="seconds")
            if connected
            else None,  # a time never reached is null in nc's JSON
            **self._round_trip(carrying if connected else None),
            "rxBytes": sum(path.rx_bytes for path in paths),
            "txBytes": sum(path.tx_bytes for path in paths),
            "lastError": "" if connected else self.last_error,
            "version": VERSION,
            "peers": udp.peers.status() if connected and udp is not None and udp.peers is not None else [],
        }

    def _round_trip(self, carrying: PeerPath | None) -> dict[str, Any]:
        """The round trip on the path in use: on UDP the keepalive echo, timed over the
        datagrams themselves; on TLS (or before an echo came back) the kernel's TCP estimate."""
        udp = self.udp
        if carrying is not None and carrying is udp and udp is not None and udp.rtt_s is not None:
            return {"rttMs": round(udp.rtt_s * 1000, 2), "rttSource": "udp-echo"}
        rtt = tcp_rtt_ms(self.link.sock) if carrying is not None and self.link is not None else None
        return {"rttMs": rtt, "rttSource": "tcp-estimate" if rtt is not None else ""}

    def _connect(self) -> tuple[Link, Welcome]:
        follower = self.follower
        self.server_ip = resolve_host(follower.server, self.config.port)  # each time: the server may move
        raw = socket.create_connection((self.server_ip, self.config.port), timeout=follower.connect_timeout)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = self.context.wrap_socket(raw, server_hostname=SERVER_TLS_NAME)
        except BaseException:
            raw.close()
            raise
        link = Link(sock, follower.address, counters=self.counters)
        self._close_datagram_path()  # a failed connect's
        try:
            caps = (
                CAPABILITIES
                if self.config.offload
                else tuple(c for c in CAPABILITIES if c not in (CAP_GSO, CAP_GROUPS))
            )
            share = b""
            if self.config.transport == "tcp":
                caps = tuple(c for c in caps if c not in (CAP_UDP, CAP_DIRECT, CAP_GROUPS))
            else:
                self.udp_private, share = new_x25519()
            direct_private, direct_share = new_x25519() if CAP_UDP in caps else (None, b"")
            if not self.config.direct_paths or not direct_share:
                caps, direct_share = tuple(c for c in caps if c != CAP_DIRECT), b""
            hello = Hello(
                self.config.token,
                caps=caps,
                net_token=self.config.net_token,
                host_name=socket.gethostname(),
                udp_key=share,
                name=self.config.name,
                direct_key=direct_share,
            )
            sock.sendall(hello.encode())
            welcome = self._await_welcome(link)
            self._check_welcome(welcome)
            self.udp = self._datagram_path(share, welcome)
            if self.udp is not None and CAP_DIRECT in welcome.caps and direct_share:
                self.udp.peers = peer_table(self.udp, direct_private, direct_share, welcome, self.server_ip)
        except BaseException:
            link.close()
            raise
        sock.setblocking(False)
        return link, welcome

    def _datagram_path(self, share: bytes, welcome: Welcome) -> DatagramPath | None:
        """The UDP path the welcome agreed on (keys from both shares), or None."""
        if CAP_UDP not in welcome.caps or not share:
            return None
        transcript = datagram_transcript(share, welcome.udp_key, welcome.udp_session, self.config.token)
        try:
            keys = datagram_keys(self.udp_private, welcome.udp_key, transcript)
        except BadDatagram:
            raise ProtocolError("the welcome's udpKey is unusable") from None
        port = welcome.udp_port if self.config.udp_port == DEFAULT_NETWORK_PORT else self.config.udp_port
        path = DatagramPath(
            self.server_ip,  # the replica this session reached, as resolved for it
            port,
            DatagramKeys.for_node(welcome.udp_session, *keys),
            self.config.transport,
            self.config.token,
        )
        path.counters, path.grouping.size = self.counters, group_chunk(welcome.mtu) if CAP_GROUPS in welcome.caps else 0
        return path

    def _close_datagram_path(self) -> None:
        if self.udp is not None:
            self.udp.close()
            self.udp = None

    def _await_welcome(self, link: Link) -> Welcome:
        """The server's welcome, within HANDSHAKE_TIMEOUT_S in all: frames it may send
        first (keepalives) do not extend the wait."""
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
        while True:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise socket.timeout
                link.sock.settimeout(left)
                space = link.rx.space()
                count = link.sock.recv_into(space, len(space))
            # The deadline, whether it passed here or during the read. socket.timeout, not
            # TimeoutError: on 3.9 a socket's timeout is its own OSError, not a TimeoutError.
            except socket.timeout:
                raise ProtocolError(f"no welcome from the server within {HANDSHAKE_TIMEOUT_S:.0f} s") from None
            if count == 0:
                raise ProtocolError("server closed the connection during the handshake")
            link.rx.commit(count)
            for kind, start, end in link.rx.frames():
                payload = link.rx.view[start:end]
                if kind == FRAME_WELCOME:
                    return Welcome.decode(payload)
                if kind == FRAME_ERROR:
                    self.on_refusal(Refusal.decode(payload))
                    raise ProtocolError("server refused the session")
                if kind < FRAME_OPTIONAL and kind != FRAME_KEEPALIVE:
                    raise ProtocolError(f"unexpected frame {kind:#x} before the welcome")

    def on_refusal(self, refusal: Refusal) -> None:
        """A refusal from the server: follow the leader it names; one that says retrying
        will not help ends the client."""
        if refusal.leader:
            self.follower.leader_hint = refusal.leader
        if not refusal.retry:
            raise Refused(
                f"server refused this node ({loggable(refusal.code)}): {loggable(refusal.reason)}", refusal.code
            )
        log.warning("server ended the session (%s): %s", loggable(refusal.code), loggable(refusal.reason))

    def _check_welcome(self, welcome: Welcome) -> None:
        """Refuse a welcome whose subnet or routes would send the tunnel into itself."""
        server = ipaddress.ip_address(self.server_ip)
        if server.version != 4:
            return
        for network in (welcome.interface.network, *map(ipaddress.IPv4Network, welcome.routes)):
            if server in network:
                raise ProtocolError(f"the welcome routes {network}, the server's own address, into the tunnel")


def reload_client_config(config: ClientConfig, path: str, follower: ServerFollower, connected: bool) -> bool:
    """SIGHUP: re-read client.yml, apply debug, transport and the replica list
    (serverAddr), and say in one line what was applied and what needs a restart.
    True when the session must reconnect to apply it (another transport)."""
    try:
        fresh: ClientConfig = load_config(path, "client")
    except ConfigError as e:
        log.error("SIGHUP: %s; the running configuration stays", e)
        return False
    except Exception:  # a bug in a reload must not end a node that runs
        log.exception("SIGHUP: cannot re-read %s; the running configuration stays", path)
        return False
    if not server_addresses(fresh.server_addr):
        log.error("SIGHUP: %s: client.serverAddr is empty; the running configuration stays", path)
        return False
    changed = [f.name for f in dataclasses.fields(ClientConfig) if getattr(fresh, f.name) != getattr(config, f.name)]
    for name in changed:
        if name in CLIENT_RELOADABLE_FIELDS:
            setattr(config, name, getattr(fresh, name))
    logging.getLogger("nc").setLevel(logging.DEBUG if config.debug else logging.INFO)
    if "server_addr" in changed:
        follower.reset(server_addresses(config.server_addr), connected)
    applied = [camel(name) for name in changed if name in CLIENT_RELOADABLE_FIELDS]
    restart = [camel(name) for name in changed if name not in CLIENT_RELOADABLE_FIELDS]
    log.info(
        "SIGHUP: re-read %s; applied: %s; needs a restart: %s",
        path,
        ", ".join(applied) or "nothing changed",
        ", ".join(restart) or "nothing",
    )
    return "transport" in changed and connected


def node_credential_files(config: ClientConfig) -> dict[str, Path]:
    grpc_dir, network_dir = config.grpc_cert_dir, Path(config.network_cert_dir)
    return {
        "grpc_ca": grpc_dir / "ca.crt",
        "grpc_cert": grpc_dir / "client.crt",
        "grpc_key": grpc_dir / "client.key",
        "network_ca": network_dir / "ca.crt",
        "network_cert": network_dir / "client.crt",
        "network_key": network_dir / "client.key",
    }


def replace_credentials(update: dict[Path, bytes]) -> None:
    """Write every new file beside its target, then rename them all: a crash between
    leaves `.new` files that finish_credential_update completes at the next start."""
    for path, data in update.items():
        write_private(path.with_name(path.name + ".new"), data, 0o600 if path.suffix == ".key" else 0o644)
    for path in update:
        os.replace(path.with_name(path.name + ".new"), path)


def finish_credential_update(config: ClientConfig) -> None:
    for path in node_credential_files(config).values():
        pending = path.with_name(path.name + ".new")
        if pending.exists():
            os.replace(pending, path)
            log.info("completed the update of %s left by an interrupted renewal", path)


def check_certificate_alive(config: ClientConfig) -> None:
    """An expired network certificate cannot connect again: say so once, plainly."""
    path = node_credential_files(config)["network_cert"]
    try:
        not_after = load_cert_file(path).not_valid_after_utc
    except NcError:
        return  # unreadable: the TLS context reports it
    if not_after <= utc_now():
        raise Refused(
            f"this node's certificate ({path}) expired on {not_after:%Y-%m-%d %H:%M} UTC; "
            f"join again with a new token: nc client --join '<join string>' --work-dir {config.work_dir}"
        )


def tcp_rtt_ms(sock: socket.socket) -> float | None:
    """The kernel's smoothed round-trip time of the session's TCP connection (kept fresh
    by keepalives): tcp_info.tcpi_rtt, microseconds at byte 68."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except OSError:
        return None
    return round(struct.unpack_from("I", info, 68)[0] / 1000, 3) if len(info) >= 72 else None


STATUS_SOCKET = "nc-client.sock"


class StatusSocket(threading.Thread):
    """`nc status` asks the running client here: a unix socket in its work dir, for root
    only (mode 0600), that answers every connection with one JSON object and closes."""

    def __init__(self, path: Path, status: Callable[[], dict[str, Any]]) -> None:
        super().__init__(name="status-socket", daemon=True)
        self.path, self.status = path, status
        self.stopping = threading.Event()
        self.path.unlink(missing_ok=True)  # a killed client's; the work-dir lock says none runs
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        os.chmod(path, 0o600)
        self.sock.listen(8)
        self.sock.settimeout(0.5)

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:  # before the OSError below: on 3.9 it is one, not a TimeoutError
                continue
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                conn.sendall(json.dumps(self.status()).encode() + b"\n")

    def close(self) -> None:
        self.stopping.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept now: Ctrl-C ends the client at once
        if self.is_alive():
            self.join(timeout=2.0)
        self.sock.close()
        self.path.unlink(missing_ok=True)


def ask_status(work_dir: Path) -> dict[str, Any]:
    """The running client's status from its socket, or one line saying why not."""
    path = work_dir / STATUS_SOCKET
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5.0)
        try:
            sock.connect(str(path))
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        except PermissionError:
            raise NcError(f"{path}: permission denied; run nc status as root") from None
        except (FileNotFoundError, ConnectionRefusedError):
            raise NcError(
                f"no nc client is running with work dir {work_dir} ({path} does not answer); "
                f"start it with: nc client --config {work_dir / 'client.yml'}"
            ) from None
        except OSError as e:
            raise NcError(f"{path}: {e.strerror or e}") from None
    return json.loads(data)


# ============================================================================
# 13. gRPC services and clients
#    The servicers (thin: each call is one control-plane call) and the
#    client side: join strings and CA pins, joining, renewal, admin calls.
# ============================================================================


class CertRenewer(threading.Thread):
    """Renews the node's certificates over mutual TLS on the control port once two
    thirds of their life has passed; the new keys never leave the node (CSRs)."""

    def __init__(self, config: ClientConfig, stop: threading.Event, on_renewed: Callable[[], None]) -> None:
        super().__init__(name="cert-renewer", daemon=True)
        self.config, self.stop, self.on_renewed = config, stop, on_renewed
        self.files = node_credential_files(config)

    def run(self) -> None:
        while not self.stop.wait(self._next_check()):
            try:
                if self._due():
                    renew_certificates(self.config, self.files)
                    self.on_renewed()
            except NcError as e:
                log.warning("certificate renewal failed: %s; trying again later", e)
            except Exception:
                log.exception("certificate renewal failed; trying again later")

    def _certs(self) -> list[Any]:
        return [load_cert_file(self.files[name]) for name in ("grpc_cert", "network_cert")]

    def _due(self) -> bool:
        now = utc_now()
        return any(renewal_due(c.not_valid_before_utc, c.not_valid_after_utc, now) for c in self._certs())

    def _next_check(self) -> float:
        """Until the earlier certificate is due (at least a second, at most a minute);
        a minute when the files cannot be read."""
        try:
            certs = self._certs()
        except NcError:
            return RENEW_CHECK_S
        due = min(c.not_valid_before_utc + (c.not_valid_after_utc - c.not_valid_before_utc) * 2 / 3 for c in certs)
        return min(RENEW_CHECK_S, max(1.0, (due - utc_now()).total_seconds()))


def new_csr(key: Any, node_token: str) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_token)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def renew_certificates(config: ClientConfig, files: dict[str, Path]) -> None:
    """One renewal: CSRs over new keys, the server's certificates checked against
    them and the CAs, then all four files replaced together."""
    _, pb, pb_grpc = grpc_modules()
    keys = {"grpc": new_key(), "network": new_key()}
    request = pb.RenewCertificatesRequest(
        grpcCsr=new_csr(keys["grpc"], config.token), networkCsr=new_csr(keys["network"], config.token)
    )
    try:
        ca, key, cert = (files[n].read_bytes() for n in ("grpc_ca", "grpc_key", "grpc_cert"))
    except OSError as e:
        raise NcError(f"cannot read the node's gRPC credentials: {e}") from None
    *others, last = server_addresses(config.server_addr)
    for host in [*others, last]:  # replicas: every one serves the control port
        address = host_port(host, config.grpc_port)
        try:
            with secure_channel(address, ca, key, cert) as channel:
                response = check_code(call(channel, pb_grpc.NcNodeServiceStub, "RenewCertificates", request, address))
            break
        except RemoteError:
            if host == last:
                raise
    update: dict[Path, bytes] = {}
    for kind, pem in (("grpc", bytes(response.grpcCert)), ("network", bytes(response.networkCert))):
        check_renewed_cert(pem, keys[kind], load_cert_file(files[f"{kind}_ca"]), config.token, kind)
        update[files[f"{kind}_key"]] = key_pem(keys[kind])
        update[files[f"{kind}_cert"]] = pem
    replace_credentials(update)
    log.info("renewed this node's certificates; valid until %s", peer_cert(update[files["grpc_cert"]]).not_after)
    # The first call with the new certificate tells the server this node switched:
    # it revokes the old one now rather than at the next renewal.
    with secure_channel(address, ca, update[files["grpc_key"]], update[files["grpc_cert"]]) as channel:
        call(channel, pb_grpc.LiteKubeNCServiceStub, "HealthCheck", pb.HealthCheckRequest(), address)


def check_renewed_cert(pem: bytes, key: Any, ca: Any, node_token: str, kind: str) -> None:
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(pem)
        cert.verify_directly_issued_by(ca)
    except Exception:
        raise RemoteError(
            f"the server's renewed {kind} certificate is not from this node's CA; kept the old one"
        ) from None
    if not same_public_key(cert, key) or peer_cert(pem).common_name != node_token:
        raise RemoteError(f"the server's renewed {kind} certificate is not for this node's new key; kept the old one")


@functools.cache
def grpc_modules() -> tuple[Any, Any, Any]:
    """grpc and nc's generated modules, imported on first use (a `nc version` needs none)."""
    import grpc

    from proto import nc_pb2, nc_pb2_grpc

    return grpc, nc_pb2, nc_pb2_grpc


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def caller(control: ControlPlane, context: Any) -> Identity:
    """The live identity behind a mutual-TLS call's client certificate."""
    pems = context.auth_context().get("x509_pem_cert") or []
    if not pems:
        raise Unauthenticated("a client certificate is required")
    return control.identify(peer_cert(pems[0]), "grpc")


def guarded(response_name: str, *, denied_as_status: bool = False) -> Callable[[Callable], Callable]:
    """Run a handler: a refused request becomes code 400 in the response (or, where
    the message has no code, an INVALID_ARGUMENT status), a caller that is no live
    identity UNAUTHENTICATED, anything else 500 and a log line. NcAdminService
    answers a permission denial with the PERMISSION_DENIED status."""

    def wrap(method: Callable) -> Callable:
        def handler(self: Any, request: Any, context: Any) -> Any:
            grpc, pb, _ = grpc_modules()
            response_cls = getattr(pb, response_name)
            has_code = "code" in response_cls.DESCRIPTOR.fields_by_name
            try:
                return method(self, request, context)
            except Unauthenticated as e:
                status, detail = grpc.StatusCode.UNAUTHENTICATED, str(e)
            except BadRequest as e:
                if has_code and not (denied_as_status and isinstance(e, PermissionDenied)):
                    return response_cls(code=CODE_BAD_REQUEST, message=str(e))
                denied = isinstance(e, PermissionDenied)
                status = grpc.StatusCode.PERMISSION_DENIED if denied else grpc.StatusCode.INVALID_ARGUMENT
                detail = str(e)
            except NcError as e:
                log.warning("%s: %s", method.__name__, loggable(e, 400))
                if has_code:
                    return response_cls(code=CODE_SERVER_ERROR, message=str(e))
                status, detail = grpc.StatusCode.INTERNAL, str(e)
            except Exception:
                log.exception("%s failed", method.__name__)
                if has_code:
                    return response_cls(code=CODE_SERVER_ERROR, message="internal error; see the server log")
                status, detail = grpc.StatusCode.INTERNAL, "internal error; see the server log"
            context.abort(status, detail)  # outside the try: abort raises to unwind the call

        handler.__name__ = method.__name__
        return handler

    return wrap


def health_code(control: ControlPlane) -> str:
    """The original HealthCheck's answer: 500 while the data plane is down."""
    return CODE_OK if control.sessions.running() else CODE_SERVER_ERROR


# The services a port offers, as grpc.health.v1 and reflection name them ("" is the whole server).
BOOTSTRAP_SERVICES = ("pb.LiteKubeNCBootstrapService",)


CONTROL_SERVICES = ("pb.LiteKubeNCService", "pb.NcNodeService", "pb.NcAdminService")


HEALTH_WATCH_INTERVAL_S = 1.0


def standard_health(running: Callable[[], bool], services: tuple[str, ...]) -> Any:
    """grpc.health.v1.Health for probes (Kubernetes, load balancers, grpc_health_probe):
    SERVING while the data plane runs, NOT_SERVING otherwise, for the whole server and
    each of its services. Asked live on every call, so it never lags the data plane."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    grpc = grpc_modules()[0]
    known = {"", *services, "grpc.health.v1.Health"}

    def status_of(service: str, context: Any) -> int:
        if service not in known:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {loggable(service)}")
        serving = health_pb2.HealthCheckResponse.SERVING
        return serving if running() else health_pb2.HealthCheckResponse.NOT_SERVING

    class Health(health_pb2_grpc.HealthServicer):
        def Check(self, request: Any, context: Any) -> Any:  # noqa: N802
            return health_pb2.HealthCheckResponse(status=status_of(request.service, context))

        def Watch(self, request: Any, context: Any) -> Iterator[Any]:  # noqa: N802
            last = None
            while context.is_active():
                status = status_of(request.service, context)
                if status != last:
                    yield health_pb2.HealthCheckResponse(status=status)
                    last = status
                time.sleep(HEALTH_WATCH_INTERVAL_S)

    return health_pb2_grpc, Health()


class ReflectionPool:
    """The default descriptor pool, plus method names: the upb pool cannot find the file
    of `pb.Service.Method`, which `grpcurl describe` asks for; the service's file holds it."""

    def __init__(self) -> None:
        from google.protobuf import descriptor_pool

        self.pool = descriptor_pool.Default()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)

    def FindFileContainingSymbol(self, symbol: str) -> Any:  # noqa: N802
        try:
            return self.pool.FindFileContainingSymbol(symbol)
        except KeyError:
            service = self.pool.FindServiceByName(symbol.rpartition(".")[0])  # KeyError again: not found
            if service.FindMethodByName(symbol.rpartition(".")[2]) is None:
                raise
            return service.file


def add_standard_services(server: Any, running: Callable[[], bool], services: tuple[str, ...]) -> None:
    """grpc.health.v1 and server reflection, so grpcurl and probes work without the .proto."""
    from grpc_reflection.v1alpha import reflection

    health_pb2_grpc, health = standard_health(running, services)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = (*services, "grpc.health.v1.Health", reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server, pool=ReflectionPool())


def expire_text(expire_time: str) -> str:
    return "never" if expire_time == NEVER_EXPIRES else rfc3339(expire_time)


class BootstrapService:
    """LiteKubeNCBootstrapService (bootstrap port, server TLS only): joins."""

    def __init__(self, control: ControlPlane) -> None:
        self.control = control

    def HealthCheck(self, request: Any, context: Any) -> Any:  # noqa: N802
        return grpc_modules()[1].HealthCheckResponse(code=health_code(self.control))

    @guarded("GetTokenResponse")
    def GetToken(self, request: Any, context: Any) -> Any:  # noqa: N802
        ctl = self.control
        node_token, creds = ctl.admit_join(request.bootStrapToken)
        return grpc_modules()[1].GetTokenResponse(
            code=CODE_OK,
            message="ok",
            token=node_token,
            networkServerIp=ctl.advertised_ip,
            networkServerPort=str(ctl.config.port),
            GrpcServerIp=ctl.control_ip_for(node_token),
            GrpcServerPort=str(ctl.config.grpc_port),
            GrpcCaCert=b64(creds.grpc_ca),
            GrpcClientKey=b64(creds.grpc.key_pem),
            GrpcClientCert=b64(creds.grpc.cert_pem),
            NetworkCaCert=b64(creds.network_ca),
            NetworkClientKey=b64(creds.network.key_pem),
            NetworkClientCert=b64(creds.network.cert_pem),
        )


class ControlService:
    """LiteKubeNCService (control port, mutual TLS): the original's calls, for the
    admin and for nodes within the permission table."""

    def __init__(self, control: ControlPlane) -> None:
        self.control = control

    def _greeted(self, context: Any) -> None:
        self.control.authorize(caller(self.control, context), "greet")

    @guarded("HelloWorldResponse")
    def HelloWorld(self, request: Any, context: Any) -> Any:  # noqa: N802
        self._greeted(context)
        return grpc_modules()[1].HelloWorldResponse(thanks_text=f"thanks for {request.hello_text!s}, from nc {VERSION}")

    @guarded("HealthCheckResponse")
    def HealthCheck(self, request: Any, context: Any) -> Any:  # noqa: N802
        self._greeted(context)
        return grpc_modules()[1].HealthCheckResponse(code=health_code(self.control))

    @guarded("GetBootStrapTokenResponse")
    def GetBootStrapToken(self, request: Any, context: Any) -> Any:  # noqa: N802
        ctl = self.control
        token, _, _ = ctl.create_bootstrap_token(caller(ctl, context), int(request.expireTime))
        return grpc_modules()[1].GetBootStrapTokenResponse(
            code=CODE_OK,
            message="ok",
            bootStrapToken=token,
            cloudIp=ctl.advertised_ip,
            port=str(ctl.config.bootstrap_port),
        )

    @guarded("CheckConnResponse")
    def CheckConnState(self, request: Any, context: Any) -> Any:  # noqa: N802
        row = self.control.node_state(caller(self.control, context), request.token)
        return grpc_modules()[1].CheckConnResponse(
            code=CODE_OK, message=ORIGINAL_OK, connState=row.state, bindIp=row.bind_ip
        )

    @guarded("UnRegisterResponse")
    def UnRegister(self, request: Any, context: Any) -> Any:  # noqa: N802
        self.control.unregister(caller(self.control, context), request.token)
        return grpc_modules()[1].UnRegisterResponse(code=CODE_OK, message=ORIGINAL_OK, result=True)

    @guarded("GetRegistedIpResponse")
    def GetRegistedIp(self, request: Any, context: Any) -> Any:  # noqa: N802
        # A node that never connected has no address yet: 200 with an empty ip, as the original.
        row = self.control.node_state(caller(self.control, context), request.token)
        return grpc_modules()[1].GetRegistedIpResponse(code=CODE_OK, message=ORIGINAL_OK, ip=row.bind_ip)


class NodeService:
    """NcNodeService (control port, mutual TLS): what a node asks for itself."""

    def __init__(self, control: ControlPlane) -> None:
        self.control = control

    @guarded("RenewCertificatesResponse")
    def RenewCertificates(self, request: Any, context: Any) -> Any:  # noqa: N802
        grpc_pem, network_pem = self.control.renew(
            caller(self.control, context), bytes(request.grpcCsr), bytes(request.networkCsr)
        )
        return grpc_modules()[1].RenewCertificatesResponse(
            code=CODE_OK, message="renewed", grpcCert=grpc_pem, networkCert=network_pem
        )


class AdminService:
    """NcAdminService (control port, mutual TLS): the admin identity only."""

    def __init__(self, control: ControlPlane) -> None:
        self.control = control

    def _admin(self, context: Any) -> Identity:
        """The whole service is the admin's: a node's mint goes through GetBootStrapToken,
        where its limits apply, never through CreateBootstrapToken."""
        who = caller(self.control, context)
        self.control.authorize(who, "administer")
        return who

    @guarded("CreateBootstrapTokenResponse", denied_as_status=True)
    def CreateBootstrapToken(self, request: Any, context: Any) -> Any:  # noqa: N802
        ctl = self.control
        token, expire, overlay = ctl.create_bootstrap_token(
            self._admin(context), int(request.lifeMinutes), bool(request.singleUse), request.network.strip()
        )
        return grpc_modules()[1].CreateBootstrapTokenResponse(
            code=CODE_OK,
            message="ok",
            bootStrapToken=token,
            joinString=ctl.join_string(token, overlay),
            expireTime=expire_text(expire),
            caPin=ctl.pki.ca_pin(),
        )

    @guarded("ListBootstrapTokensResponse", denied_as_status=True)
    def ListBootstrapTokens(self, request: Any, context: Any) -> Any:  # noqa: N802
        pb = grpc_modules()[1]
        tokens = [
            pb.BootstrapTokenInfo(
                tokenId=token_id(row.token),
                expireTime=expire_text(row.expire_time),
                createTime=rfc3339(row.create_time),
                singleUse=row.single_use,
                network=row.network,
                mintedBy=row.minted_by,
                uses=row.uses,
                useLimit=1 if row.single_use else 0,
                state=token_state(row.expire_time, row.single_use, row.uses),
            )
            for row in self.control.list_bootstrap_tokens(self._admin(context))
        ]
        return pb.ListBootstrapTokensResponse(code=CODE_OK, message="ok", tokens=tokens)

    @guarded("DeleteBootstrapTokenResponse", denied_as_status=True)
    def DeleteBootstrapToken(self, request: Any, context: Any) -> Any:  # noqa: N802
        self.control.delete_bootstrap_token(self._admin(context), request.tokenId)
        return grpc_modules()[1].DeleteBootstrapTokenResponse(code=CODE_OK, message="deleted", result=True)

    @guarded("ListNodesResponse", denied_as_status=True)
    def ListNodes(self, request: Any, context: Any) -> Any:  # noqa: N802
        pb = grpc_modules()[1]
        who = self._admin(context)
        rows = self.control.list_nodes(who)
        live = self.control.sessions.live()
        transports = self.control.node_transports(who)
        nodes = []
        for r in rows:
            session = live.get(r.token, {})
            seen = local_time() if session else r.last_seen
            nodes.append(
                pb.NodeInfo(
                    nodeToken=r.token,
                    bindIp=r.bind_ip,
                    connState=r.state,
                    createTime=rfc3339(r.create_time),
                    updateTime=rfc3339(r.update_time),
                    network=r.network,
                    mintedBy=r.minted_by,
                    hostName=r.host_name,
                    endpoint=r.endpoint,
                    transport=transports.get(r.token, "") or r.transport,
                    lastSeen=rfc3339(seen),
                    rxBytes=session.get("rx_bytes", 0),
                    txBytes=session.get("tx_bytes", 0),
                    nodeVersion=r.node_version,
                    reserved=r.token == RESERVED_NODE_TOKEN,
                    name=r.name,
                    directPeers=session.get("direct_peers", []),
                )
            )
        return pb.ListNodesResponse(code=CODE_OK, message="ok", nodes=nodes)

    @guarded("RenameNodeResponse", denied_as_status=True)
    def RenameNode(self, request: Any, context: Any) -> Any:  # noqa: N802
        self.control.rename_node(self._admin(context), request.nodeToken, request.name)
        return grpc_modules()[1].RenameNodeResponse(code=CODE_OK, message="renamed", name=request.name.strip())

    @guarded("PruneNodesResponse", denied_as_status=True)
    def PruneNodes(self, request: Any, context: Any) -> Any:  # noqa: N802
        tokens = self.control.prune_nodes(self._admin(context), int(request.idleForSeconds), bool(request.dryRun))
        return grpc_modules()[1].PruneNodesResponse(code=CODE_OK, message="ok", nodeTokens=tokens)

    def _network_info(self, overlay: Overlay, nodes: int) -> Any:
        return grpc_modules()[1].NetworkInfo(
            name=overlay.name,
            cidr=str(overlay.network),
            interconnection=overlay.interconnection,
            netToken=overlay.net_token,
            serverIp=str(overlay.server_ip),
            nodes=nodes,
            fromConfig=overlay.from_config,
        )

    @guarded("CreateNetworkResponse", denied_as_status=True)
    def CreateNetwork(self, request: Any, context: Any) -> Any:  # noqa: N802
        overlay = self.control.create_network(
            self._admin(context),
            request.name,
            request.cidr,
            not request.noInterconnection,
            request.allowPublic,
        )
        return grpc_modules()[1].CreateNetworkResponse(
            code=CODE_OK, message="created", network=self._network_info(overlay, 0)
        )

    @guarded("ListNetworksResponse", denied_as_status=True)
    def ListNetworks(self, request: Any, context: Any) -> Any:  # noqa: N802
        networks = self.control.list_networks(self._admin(context))
        return grpc_modules()[1].ListNetworksResponse(
            code=CODE_OK, message="ok", networks=[self._network_info(o, nodes) for o, nodes in networks]
        )

    @guarded("DeleteNetworkResponse", denied_as_status=True)
    def DeleteNetwork(self, request: Any, context: Any) -> Any:  # noqa: N802
        removed = self.control.delete_network(self._admin(context), request.name.strip(), bool(request.force))
        return grpc_modules()[1].DeleteNetworkResponse(code=CODE_OK, message="deleted", unregistered=removed)


GRPC_MAX_CONNECTIONS = 4096  # per gRPC port, before the file-descriptor share below


GRPC_FD_SHARE = 0.2  # of RLIMIT_NOFILE, per gRPC port: both together leave 60 % to the data plane


FDS_PER_GRPC_CONNECTION = 3  # the caller's socket, the guard's twin to the private port, gRPC's end of it


GRPC_MAX_CONCURRENT_RPCS = 64  # per server; more are answered RESOURCE_EXHAUSTED at once


def grpc_connection_cap(fd_limit: int) -> int:
    """Connections one gRPC port may hold, so that floods on 6439/6440 cannot take the
    file descriptors the data plane needs for its sessions."""
    return max(16, min(GRPC_MAX_CONNECTIONS, int(fd_limit * GRPC_FD_SHARE) // FDS_PER_GRPC_CONNECTION))


def grpc_server_options(max_connections: int) -> list[tuple[str, int]]:
    """Channel args (grpc core) that bound what one connection, and all of them, may hold.
    grpc core has no per-source limit: the cap is per port, and the short handshake
    timeout is what frees a flooded port again."""
    return [
        ("grpc.max_allowed_incoming_connections", max_connections),  # past it: accepted and closed at once
        ("grpc.server_handshake_timeout_ms", 5_000),  # TCP up but no TLS/HTTP2 preface: closed (default 120 s)
        ("grpc.max_connection_idle_ms", 60_000),  # no call for a minute: GOAWAY (clients reconnect on demand)
        ("grpc.max_connection_age_ms", 600_000),
        ("grpc.max_connection_age_grace_ms", 30_000),
        ("grpc.keepalive_time_ms", 30_000),  # ping a quiet connection, and drop it if no answer
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),  # a client pinging faster gets strikes
        ("grpc.http2.max_ping_strikes", 2),  # and then GOAWAY
        ("grpc.max_concurrent_streams", 32),
        ("grpc.max_receive_message_length", 1024 * 1024),
        ("grpc.enable_channelz", 0),  # no per-connection bookkeeping nobody reads
    ]


GRPC_MAX_PER_SOURCE = 64  # connections one source may hold on one gRPC port (loopback: no limit)


GUARD_CHUNK = 64 * 1024


class Splice:
    """One caller's connection to a public gRPC port and its twin to the private one.
    Bytes pass through untouched (TLS stays end to end); `out` holds what a side
    could not take yet, and its source is not read until that is written."""

    __slots__ = ("backend", "client", "out", "port", "source")

    def __init__(self, port: GuardedPort, client: socket.socket, source: str) -> None:
        self.port, self.client, self.source = port, client, source
        self.backend = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.backend.setblocking(False)
        self.backend.connect_ex(("127.0.0.1", port.backend_port))  # loopback: done at once, or EPOLLOUT
        self.out = {client.fileno(): b"", self.backend.fileno(): b""}

    def side(self, fd: int) -> socket.socket:
        return self.client if fd == self.client.fileno() else self.backend

    def other(self, fd: int) -> socket.socket:
        return self.backend if fd == self.client.fileno() else self.client


class GuardedPort:
    """A public gRPC port: who holds how many connections to it."""

    def __init__(self, listener: socket.socket, name: str, slots: SourceSlots) -> None:
        self.listener, self.name, self.slots = listener, name, slots
        self.backend_port = 0  # the gRPC server's private loopback port, known once it is bound


class GrpcGuard(threading.Thread):
    """The accept side of the gRPC ports, which grpc core cannot limit per address:
    the servers listen on private loopback ports, and this loop accepts on the public
    ones, refuses (with a reset) a source past GRPC_MAX_PER_SOURCE or past what the
    port's SourceSlots leave it, and splices the rest through. gRPC's own handshake and
    idle timeouts still end idle connections: their close passes back through here."""

    def __init__(self, stop: threading.Event, prefix6: int = DEFAULT_SOURCE_PREFIX6) -> None:
        super().__init__(name="grpc-guard", daemon=True)
        self.stop = stop
        self.prefix6 = prefix6
        self.ports: dict[int, GuardedPort] = {}  # listener fd -> port
        self.splices: dict[int, Splice] = {}  # either side's fd -> splice
        self.epoll = select.epoll()
        self.note = RateLimitedLog()
        self.paused_until = 0.0  # accept() ran out of file descriptors; listen again then
        self.refused = 0  # connections reset for a per-address or per-port limit (metrics)
        self.fds = FdBudget(FD_RESERVE_GRPC)

    def listen(self, port: int, name: str, cap: int, field: str) -> GuardedPort:
        try:
            listener = listen_any(port)
        except OSError as e:
            raise NcError(
                f"cannot listen on :{port} ({e.strerror}); stop what uses it or change server.{field}"
            ) from None
        listener.setblocking(False)
        guarded = GuardedPort(listener, name, SourceSlots(cap, GRPC_MAX_PER_SOURCE, self.prefix6))
        self.ports[listener.fileno()] = guarded
        return guarded

    def close(self) -> None:
        for splice in list(self.splices.values()):
            self._close(splice)
        for port in self.ports.values():
            port.listener.close()
        self.epoll.close()
        self.fds.close()

    def run(self) -> None:
        for fd in self.ports:
            self.epoll.register(fd, select.EPOLLIN)
        try:
            while not self.stop.is_set():
                for fd, events in self.epoll.poll(0.5):
                    try:
                        if (port := self.ports.get(fd)) is not None:
                            self._accept(port)
                        elif (splice := self.splices.get(fd)) is not None:
                            self._pump(splice, fd, events)
                    except Exception:  # a bug must cost one connection, never the gRPC ports
                        log.exception("gRPC guard: unexpected error; closing that connection")
                        if (splice := self.splices.get(fd)) is not None:
                            self._close(splice)
                if self.paused_until and time.monotonic() >= self.paused_until:
                    self.paused_until = 0.0
                    for fd in self.ports:
                        self.epoll.modify(fd, select.EPOLLIN)
        finally:
            self.close()

    def _accept(self, port: GuardedPort) -> None:
        for _ in range(64):
            try:
                accepted = self.fds.accept(port.listener)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # out of file descriptors, no spare: stop listening for a second (epoll would spin)
                self.note("accept:" + port.name, "gRPC %s port: accept failed: %s; pausing", port.name, e.strerror)
                for fd in self.ports:
                    self.epoll.modify(fd, 0)
                self.paused_until = time.monotonic() + 1.0
                return
            if accepted is None:
                self.refused += 1
                self.note(
                    "fds:" + port.name, "gRPC %s port: out of file descriptors; refusing new connections", port.name
                )
                continue
            sock, address = accepted
            peer = unmapped(address[0])
            source = port.slots.key(peer)
            refusal = port.slots.take(source, unlimited=ipaddress.ip_address(peer).is_loopback)
            if refusal is not None:
                self.refused += 1
                blamed, why = refusal
                self.note("busy:" + blamed, "gRPC %s port: %s; refusing more", port.name, why)
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
                continue
            sock.setblocking(False)
            try:
                splice = Splice(port, sock, source)
            except OSError:
                port.slots.release(source)
                sock.close()
                continue
            for side in (splice.client, splice.backend):
                self.splices[side.fileno()] = splice
                self.epoll.register(side.fileno(), select.EPOLLIN | select.EPOLLOUT)

    def _pump(self, splice: Splice, fd: int, events: int) -> None:
        this, other = splice.side(fd), splice.other(fd)
        waiting = splice.out[other.fileno()]  # bytes from this side the other has not taken yet
        if events & (select.EPOLLHUP | select.EPOLLERR) and (waiting or not events & select.EPOLLIN):
            self._close(splice)  # reset, or gone while its twin lags: nothing more will pass
            return
        try:
            if events & select.EPOLLOUT and splice.out[fd]:
                splice.out[fd] = splice.out[fd][this.send(splice.out[fd]) :]
            if events & select.EPOLLIN and not waiting:
                data = this.recv(GUARD_CHUNK)
                if not data:
                    self._close(splice)
                    return
                try:
                    sent = other.send(data)
                except BlockingIOError:
                    sent = 0
                splice.out[other.fileno()] = data[sent:]
        except BlockingIOError:
            pass
        except OSError:
            self._close(splice)
            return
        for side in (this, other):  # read a side only while its twin can take more
            twin = splice.other(side.fileno())
            reading = 0 if splice.out[twin.fileno()] else select.EPOLLIN
            self.epoll.modify(side.fileno(), reading | (select.EPOLLOUT if splice.out[side.fileno()] else 0))

    def _close(self, splice: Splice) -> None:
        if splice.source:  # the caller's count goes first: a splice gone means its count is too
            splice.port.slots.release(splice.source)
        splice.source = ""  # counted down once
        for side in (splice.client, splice.backend):
            if self.splices.pop(side.fileno(), None) is not None:
                with contextlib.suppress(OSError, ValueError):
                    self.epoll.unregister(side.fileno())
            side.close()


def start_grpc_servers(
    control: ControlPlane, guard: GrpcGuard, bind_host: str = "127.0.0.1", fd_limit: int = 1024
) -> list[Any]:
    """The bootstrap server (server TLS) and the control server (mutual TLS), on private
    loopback ports behind the guard's public ones."""
    from concurrent import futures

    grpc, _, pb_grpc = grpc_modules()
    cfg, pki = control.config, control.pki
    grpc_key = pki.grpc.server_key_path.read_bytes()
    chain = pki.grpc.server_chain_pem()
    ca = pki.grpc.ca_path.read_bytes()

    cap = grpc_connection_cap(fd_limit)
    options = grpc_server_options(cap)
    public_bootstrap = guard.listen(cfg.bootstrap_port, "bootstrap", cap, "bootstrapPort")
    public_control = guard.listen(cfg.grpc_port, "control", cap, "grpcPort")
    bootstrap = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="grpc-bootstrap"),
        options=options,
        maximum_concurrent_rpcs=GRPC_MAX_CONCURRENT_RPCS,
    )
    pb_grpc.add_LiteKubeNCBootstrapServiceServicer_to_server(BootstrapService(control), bootstrap)
    add_standard_services(bootstrap, lambda: control.sessions.running(), BOOTSTRAP_SERVICES)
    creds = grpc.ssl_server_credentials([(grpc_key, chain)])
    public_bootstrap.backend_port = bind(bootstrap, host_port(bind_host, 0), creds, "bootstrapPort")

    control_server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="grpc-control"),
        options=options,
        maximum_concurrent_rpcs=GRPC_MAX_CONCURRENT_RPCS,
    )
    pb_grpc.add_LiteKubeNCServiceServicer_to_server(ControlService(control), control_server)
    pb_grpc.add_NcNodeServiceServicer_to_server(NodeService(control), control_server)
    pb_grpc.add_NcAdminServiceServicer_to_server(AdminService(control), control_server)
    add_standard_services(control_server, lambda: control.sessions.running(), CONTROL_SERVICES)
    mtls = grpc.ssl_server_credentials([(grpc_key, chain)], root_certificates=ca, require_client_auth=True)
    public_control.backend_port = bind(control_server, host_port(bind_host, 0), mtls, "grpcPort")

    bootstrap.start()
    control_server.start()
    log.info(
        "gRPC bootstrap service on :%d (TLS), control service on :%d (mutual TLS); %d connections each, %d per source",
        cfg.bootstrap_port,
        cfg.grpc_port,
        cap,
        GRPC_MAX_PER_SOURCE,
    )
    return [bootstrap, control_server]


def bind(server: Any, address: str, creds: Any, field: str) -> int:
    try:
        port = server.add_secure_port(address, creds)
    except RuntimeError:
        port = 0
    if port == 0:
        raise NcError(f"cannot listen on {address}: address in use or not available; change server.{field}")
    return port


@dataclasses.dataclass(frozen=True)
class JoinTarget:
    token: str
    host: str
    port: int
    pin: str | None
    net_token: str = ""  # the network the token admits to; empty: the default network
    others: tuple[tuple[str, int], ...] = ()  # more replicas' bootstrap addresses, tried in order

    @property
    def address(self) -> str:
        return host_port(self.host, self.port)

    def alternatives(self) -> list[JoinTarget]:
        """This target and one per other replica address listed in the join string."""
        return [self] + [dataclasses.replace(self, host=h, port=p, others=()) for h, p in self.others]

    @property
    def hosts(self) -> list[str]:
        return list(dict.fromkeys([self.host, *(h for h, _ in self.others)]))


def parse_join_string(text: str) -> JoinTarget:
    """token@host:port[#sha256:<hex>[,net=<net-token>]] (the original form has no pin)."""
    text = text.strip()
    body, _, suffix = text.partition("#")
    pin, *extras = suffix.split(",") if suffix else [""]
    net_token = ""
    for extra in extras:
        key, _, value = extra.partition("=")
        if key == "net" and valid_net_token(value):
            net_token = value
        else:
            raise UsageError(f"join string has an unknown or malformed part {extra!r}; copy it whole")
    token, at, addresses = body.rpartition("@")
    if not at or not token:
        raise UsageError(
            "join string must look like <token>@<ip>:<port>#sha256:<hex>; copy it whole from `nc adm token create`"
        )
    listed = addresses.split(",")  # replicas: a:6439,b:6439
    if len(listed) > MAX_JOIN_REPLICAS:
        raise UsageError(
            f"join string lists {len(listed)} replica addresses, more than the {MAX_JOIN_REPLICAS} nc accepts; "
            "copy it whole from `nc adm token create`"
        )
    (host, port), *others = [join_address(a) for a in listed]
    if pin and not re.fullmatch(r"sha256:[0-9a-f]{64}", pin):
        raise UsageError("join string CA pin must be sha256:<64 hex digits>")
    return JoinTarget(token, host, port, pin or None, net_token, tuple(others))


def join_address(address: str) -> tuple[str, int]:
    if address.startswith("["):
        host, _, port_text = address[1:].partition("]:")
    else:
        host, _, port_text = address.rpartition(":")
    try:
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise ValueError
        check_host(host, "join string")
    except (ValueError, ConfigError):
        raise UsageError(f"join string address {address!r} is not <ip or name>:<port>") from None
    return host, port


def tls_peer_chain(host: str, port: int) -> list[bytes]:
    """The DER certificates a TLS server presents, leaf first, none of them verified
    (the caller checks them by pin)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    if sys.version_info >= (3, 10):
        with socket.create_connection((host, port), timeout=RPC_TIMEOUT_S) as raw:
            with context.wrap_socket(raw) as tls:
                return [c.public_bytes(ssl._ssl.ENCODING_DER) for c in tls._sslobj.get_unverified_chain()]  # type: ignore[attr-defined]
    return tls12_peer_chain(context, host, port)


def tls12_peer_chain(context: ssl.SSLContext, host: str, port: int) -> list[bytes]:
    """tls_peer_chain for Python 3.9, whose ssl hands over the leaf alone: under TLS 1.2
    the server's Certificate message crosses in the clear, so it is read off the wire
    once OpenSSL has completed the handshake over the same bytes."""
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing)
    received = bytearray()
    with socket.create_connection((host, port), timeout=RPC_TIMEOUT_S) as raw:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                raw.sendall(outgoing.read())
            data = raw.recv(65536)
            if data:
                received += data
                incoming.write(data)
            else:
                incoming.write_eof()  # the next do_handshake raises SSLEOFError
        raw.sendall(outgoing.read())  # the client's Finished
    chain = tls12_certificates(bytes(received))
    if chain is None:
        raise ssl.SSLError("the server's TLS 1.2 handshake carried no Certificate message")
    return chain


def tls12_certificates(records: bytes) -> list[bytes] | None:
    """The certificate_list of the first Certificate message (RFC 5246 7.4.2) in a TLS
    1.2 server's records, or None when there is none before ChangeCipherSpec."""
    handshake = bytearray()
    at = 0
    while at + 5 <= len(records) and records[at] != 20:  # 20: ChangeCipherSpec, encrypted after it
        length = int.from_bytes(records[at + 3 : at + 5], "big")
        if records[at] == 22:  # a handshake record; messages may span records
            handshake += records[at + 5 : at + 5 + length]
        at += 5 + length
    at = 0
    while at + 4 <= len(handshake):
        kind, length = handshake[at], int.from_bytes(handshake[at + 1 : at + 4], "big")
        body = bytes(handshake[at + 4 : at + 4 + length])
        if kind == 11:  # Certificate: a 3-byte list length, then 3-byte-length-prefixed DER certificates
            chain, inner = [], 3
            while inner + 3 <= len(body):
                size = int.from_bytes(body[inner : inner + 3], "big")
                chain.append(body[inner + 3 : inner + 3 + size])
                inner += 3 + size
            return chain
        at += 4 + length
    return None


class UntrustedServer(RemoteError):
    """The server is not the one the join string pins: waiting will not change that."""


class JoinRefused(Refused):
    """The bootstrap service answered, and said no (a bad, used or expired token, a full
    network): trying again with the same join string cannot help."""


def fetch_server_ca(target: JoinTarget) -> bytes:
    """The server's gRPC CA, taken from its TLS chain and checked against the pin.

    This runs before the token leaves the host: with a pin, a server whose CA
    does not match is refused; without one, the CA is trusted on first use.
    """
    from cryptography import x509

    try:
        ders = tls_peer_chain(target.host, target.port)
    except (OSError, ssl.SSLError) as e:
        raise RemoteError(f"cannot reach the bootstrap service at {target.address}: {e}") from None
    certs = [x509.load_der_x509_certificate(der) for der in ders]
    if not certs:
        raise RemoteError(f"{target.address} presented no certificate")
    leaf = certs[0]
    if target.pin is None:
        log.warning("the join string carries no CA pin: the server at %s was NOT verified", target.address)
        candidates = certs[1:] or certs
    else:
        candidates = [c for c in certs if hmac.compare_digest(spki_pin(c), target.pin)]
        if not candidates:
            seen = ", ".join(spki_pin(c) for c in certs[1:]) or "none"
            raise UntrustedServer(
                f"the server at {target.address} is not the one in the join string: CA pin {target.pin} expected, "
                f"server offered {seen}; the token was not sent"
            )
    ca = candidates[-1]
    if ca is not leaf:
        try:
            leaf.verify_directly_issued_by(ca)
        except Exception:
            raise UntrustedServer(
                f"the server at {target.address} presented a certificate its CA did not sign; the token was not sent"
            ) from None
    return cert_pem(ca)


def secure_channel(address: str, ca: bytes, key: bytes | None = None, cert: bytes | None = None) -> Any:
    grpc, _, _ = grpc_modules()
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    return grpc.secure_channel(address, creds, options=[("grpc.ssl_target_name_override", SERVER_TLS_NAME)])


def call(channel: Any, stub_cls: Any, method: str, request: Any, address: str) -> Any:
    """One RPC with a deadline; transport failures become a RemoteError line."""
    grpc, _, _ = grpc_modules()
    try:
        return getattr(stub_cls(channel), method)(request, timeout=RPC_TIMEOUT_S)
    except grpc.RpcError as e:
        code = e.code()
        if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
            raise RemoteError(f"{address}: {e.details()}") from None
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise RemoteError(
                f"cannot reach nc at {address} (is the server running, and are the credentials from its CA?)"
            ) from None
        raise RemoteError(f"{address}: {code.name.lower()}: {e.details()}") from None


def check_code(response: Any) -> Any:
    if response.code != CODE_OK:
        message = getattr(response, "message", "")  # HealthCheckResponse has only a code
        raise RemoteError(f"server refused: {message or 'code ' + response.code}")
    return response


def node_files(work_dir: Path) -> dict[str, Path]:
    """Where a join saves a node's credentials and client.yml."""
    credentials = node_credential_files(ClientConfig(work_dir=str(work_dir)).resolve())
    return {**credentials, "config": work_dir / "client.yml"}


def has_credentials(work_dir: Path) -> bool:
    return all(path.exists() for path in node_files(work_dir).values())


JOIN_MIN_FREE_BYTES = 1 << 20  # credentials, client.yml and a few days of logs


def check_tun_device() -> None:
    """/dev/net/tun can be opened (no device is made until TUNSETIFF)."""
    try:
        os.close(os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC))
    except OSError as e:
        fix = "run nc as root" if e.errno in (errno.EACCES, errno.EPERM) else "load the tun module (modprobe tun)"
        raise TunError(f"/dev/net/tun: {e.strerror}; {fix}, or in a container pass in /dev/net/tun") from None


def check_work_dir_usable(work_dir: Path) -> None:
    """The work dir takes a file and has some room: checked before a bootstrap token is
    spent, as a join that fails after GetToken leaves a used token and a node row."""
    probe = work_dir / f".nc-probe.{os.getpid()}"
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        write_private(probe, b"\0" * 4096)
        probe.unlink()
        stat = os.statvfs(work_dir)
    except OSError as e:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
        raise NcError(os_error_line(e, "pick a writable --work-dir with free space; the token was not spent")) from None
    free = stat.f_bavail * stat.f_frsize
    if free < JOIN_MIN_FREE_BYTES:
        raise NcError(
            f"{work_dir}: only {free // 1024} KiB free, nc needs {JOIN_MIN_FREE_BYTES // 1024} KiB; free space "
            "or pick another --work-dir; the token was not spent"
        )


def check_interface_free(name: str = NODE_TUN_NAME) -> None:
    """No interface of the node's name yet: a second nc client on this host (another work
    dir) would otherwise spend its token and then fail to make the device."""
    try:
        socket.if_nametoindex(name)
    except OSError:
        return
    raise TunError(
        f"interface {name} already exists on this host: another nc client runs here (nc status --work-dir DIR "
        "shows it) or a leftover device; stop it or remove the interface first; the token was not spent"
    )


UNPINNED_JOIN = (
    "the join string has no CA pin (#sha256:...), so nothing proves the server is yours; copy the whole "
    "string from `nc adm token create`, or add --unsafe-skip-ca-pin to trust the server on first use"
)


DEFAULT_JOIN_TIMEOUT_S = 300  # how long `nc client --join` waits for a server that is down or not ready


JOIN_BACKOFF_CAP_S = 10.0  # the longest wait between two join attempts
JOIN_CONFIRM_TIMEOUT_S = 5.0  # the join's confirming call; unanswered, the node's first connect confirms


def join(
    join_string: str, work_dir: Path, unsafe_skip_ca_pin: bool = False, timeout_s: float = 0, name: str = ""
) -> ClientConfig:
    """Fetch this node's token and certificates with a bootstrap token and save them;
    with several replicas in the join string, from the first one that answers. Like
    kubeadm, a join string without a CA pin needs the explicit unsafe flag, and a server
    that cannot be reached (down, starting, failing over) is tried again, one line per
    attempt, for timeout_s; one that refuses the token fails at once."""
    listed = parse_join_string(join_string)
    if listed.pin is None and not unsafe_skip_ca_pin:
        raise UsageError(UNPINNED_JOIN)
    check_work_dir_usable(work_dir)
    deadline, backoff, attempt = time.monotonic() + timeout_s, 0.5, 0
    while True:
        attempt += 1
        try:
            return join_once(listed, work_dir, name)
        except UntrustedServer:
            raise
        except RemoteError as e:
            left = deadline - time.monotonic()
            if left <= 0:
                waited = f" (tried {attempt} times in {format_duration(int(timeout_s))}, --join-timeout)"
                raise RemoteError(f"{e}{waited if timeout_s else ''}") from None
            backoff = min(backoff * 2, JOIN_BACKOFF_CAP_S)
            delay = min(random.uniform(0.75, 1.0) * backoff, left)
            log.info("join attempt %d: %s; trying again in %.0f s (gives up in %.0f s)", attempt, e, delay, left)
            time.sleep(delay)


def join_once(listed: JoinTarget, work_dir: Path, name: str = "") -> ClientConfig:
    """One join attempt: each replica the join string lists, in order."""
    *others, last = listed.alternatives()
    for target in others:
        try:
            return join_at(target, listed, work_dir, name)
        except RemoteError as e:  # unreachable: the next replica
            log.info("%s; trying the next replica", e)  # progress: the last one says why it failed
    return join_at(last, listed, work_dir, name)


def join_at(target: JoinTarget, listed: JoinTarget, work_dir: Path, node_name: str = "") -> ClientConfig:
    _, pb, pb_grpc = grpc_modules()
    ca = fetch_server_ca(target)
    with secure_channel(target.address, ca) as channel:
        try:
            response = call(
                channel,
                pb_grpc.LiteKubeNCBootstrapServiceStub,
                "GetToken",
                pb.GetTokenRequest(bootStrapToken=target.token),
                target.address,
            )
        except RemoteError:
            if target.port != DEFAULT_GRPC_PORT:
                raise
            # It spoke TLS with the pinned CA and would not take the call: the control port,
            # which wants a node's certificate. Waiting would not change that.
            raise UsageError(
                f"{target.address} is nc's control port, not its bootstrap port; a join string names the "
                f"bootstrap port (default {DEFAULT_BOOTSTRAP_PORT}): copy it whole from `nc adm token create`"
            ) from None
    if response.code == CODE_BAD_REQUEST:
        raise JoinRefused(f"join refused: {loggable(response.message)}", "join")
    if response.code != CODE_OK:  # the server could not answer now (a store being failed over)
        raise RemoteError(f"{target.address} could not admit the node now: {loggable(response.message)}")
    if not valid_node_token(response.token):
        raise RemoteError("server answered with an invalid node-token")
    files = node_files(work_dir)
    pieces = {
        "grpc_ca": response.GrpcCaCert,
        "grpc_cert": response.GrpcClientCert,
        "grpc_key": response.GrpcClientKey,
        "network_ca": response.NetworkCaCert,
        "network_cert": response.NetworkClientCert,
        "network_key": response.NetworkClientKey,
    }
    decoded = {}
    for name, value in pieces.items():
        try:
            decoded[name] = base64.b64decode(value, validate=True)
        except ValueError:
            raise RemoteError(f"server sent an undecodable {name}") from None
    confirm_join(target, response, decoded)
    with signals_held():  # Ctrl-C now would leave half a set: it takes effect after the last file
        config = save_node_credentials(files, decoded, target, listed, response, work_dir, node_name)
    log.info("joined as node %s; credentials saved in %s", loggable(response.token), work_dir)
    return config


def confirm_join(target: JoinTarget, response: Any, decoded: dict[str, bytes]) -> None:
    """Tell the server the credentials arrived (one authenticated call on its control port),
    so the token's use counts now. A server that refuses them (a later join with the same
    single-use token superseded this one) refuses the join; one that cannot be asked (an
    older server, a port not reachable from here) learns it at the node's first connect."""
    grpc, pb, pb_grpc = grpc_modules()
    address = host_port(target.host, int(response.GrpcServerPort or DEFAULT_GRPC_PORT))
    with secure_channel(address, decoded["grpc_ca"], decoded["grpc_key"], decoded["grpc_cert"]) as channel:
        try:
            pb_grpc.LiteKubeNCServiceStub(channel).HealthCheck(pb.HealthCheckRequest(), timeout=JOIN_CONFIRM_TIMEOUT_S)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAUTHENTICATED:
                log.info("could not confirm the join at %s (%s); the first connect will", address, e.code().name)
                return
            raise JoinRefused(
                "join refused: bootstrap token was single-use and has already been used (by a join that raced this one)",
                "join",
            ) from None


def save_node_credentials(
    files: dict[str, Path],
    decoded: dict[str, bytes],
    target: JoinTarget,
    listed: JoinTarget,
    response: Any,
    work_dir: Path,
    node_name: str = "",
) -> ClientConfig:
    """The certificates, then client.yml: a work dir holds all of them or no client.yml."""
    for name, data in decoded.items():
        write_private(files[name], data, 0o600 if name.endswith("key") else 0o644)
    server_hosts = [response.networkServerIp or target.host, *listed.hosts] if listed.others else []
    config = ClientConfig(
        server_addr=",".join(dict.fromkeys(server_hosts)) or response.networkServerIp or target.host,
        port=int(response.networkServerPort or DEFAULT_NETWORK_PORT),
        grpc_port=int(response.GrpcServerPort or DEFAULT_GRPC_PORT),
        token=response.token,
        net_token=target.net_token,
        work_dir=str(work_dir),
        name=node_name,  # asked for in the hello (GetToken is the original's message, with no room for it)
    ).resolve()
    write_private(files["config"], client_yaml(config).encode(), 0o600)
    return config


@dataclasses.dataclass
class AdminTarget:
    address: str
    bootstrap_address: str
    data_address: tuple[str, int]
    ca: Path
    cert: Path
    key: Path


def admin_target(args: argparse.Namespace) -> AdminTarget:
    config: ServerConfig = load_config(args.config, "server")
    host = "127.0.0.1"
    grpc_port, bootstrap_port = config.grpc_port, config.bootstrap_port
    if args.server:
        host, _, port_text = args.server.rpartition(":")
        if not host or not port_text.isdigit():
            raise UsageError(f"--server {args.server!r}: expected HOST:PORT of the control service")
        host, grpc_port = host.strip("[]"), int(port_text)
    host, grpc_port = getattr(args, "ip", None) or host, getattr(args, "port", None) or grpc_port  # the original's
    admin = config.admin_dir
    return AdminTarget(
        address=host_port(host, grpc_port),
        bootstrap_address=host_port(host, args.bootstrap_port or bootstrap_port),
        data_address=(host, config.port),
        ca=Path(args.ca) if args.ca else admin / "ca.crt",
        cert=Path(args.cert) if args.cert else admin / "client.crt",
        key=Path(args.key) if args.key else admin / "client.key",
    )


class AdminClient:
    """A mutual-TLS channel to the control port with the admin identity."""

    def __init__(self, target: AdminTarget) -> None:
        self.target = target
        for path, flag in ((target.ca, "--ca"), (target.cert, "--cert"), (target.key, "--key")):
            if not path.exists():
                raise UsageError(f"{path}: no such file; run on the server host (as root) or pass {flag}")
        try:
            ca, cert, key = target.ca.read_bytes(), target.cert.read_bytes(), target.key.read_bytes()
        except PermissionError as e:
            raise UsageError(f"{e.filename}: permission denied; run as root") from None
        self.ca = ca
        self.channel = secure_channel(target.address, ca, key, cert)

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.channel.close()

    def control(self, method: str, request: Any) -> Any:
        _, _, pb_grpc = grpc_modules()
        return call(self.channel, pb_grpc.LiteKubeNCServiceStub, method, request, self.target.address)

    def admin(self, method: str, request: Any) -> Any:
        _, _, pb_grpc = grpc_modules()
        return call(self.channel, pb_grpc.NcAdminServiceStub, method, request, self.target.address)


def admin_rpc(args: argparse.Namespace, method: str, request: Any) -> Any:
    """One NcAdminService call with the admin identity; a refusal becomes an error line."""
    with AdminClient(admin_target(args)) as client:
        return check_code(client.admin(method, request))


def control_rpc(args: argparse.Namespace, method: str, request: Any) -> Any:
    """One LiteKubeNCService call with the admin identity; a refusal becomes an error line."""
    with AdminClient(admin_target(args)) as client:
        return check_code(client.control(method, request))


# ============================================================================
# 14. High availability
#    Replicas on etcd: election by lease, fencing, the standby's port, and
#    the watch that keeps every replica's pools and networks current.
# ============================================================================


# -- replicas on etcd ----------------------------------------------------------------
#
# Every replica serves both gRPC ports from etcd (active/active). One, the leader,
# holds the data plane: the TUNs with the server's overlay addresses and port 6441
# (active/passive). It leads while its campaign key, bound to its lease, is in
# etcd; it gives its data plane up FENCE_AFTER_S after the last renewal that went
# through, at once (addresses and port first, the loop ends in the background), while
# the lease (LEADER_LEASE_TTL_S from that renewal) still keeps everyone else out.
# Like Kubernetes' leader election (lease 15 s, renew deadline 10 s), the margins
# are seconds: an etcd answering in a second or two costs no leadership, and a dead
# leader is replaced about LEADER_LEASE_TTL_S after its last renewal.

LEADER_LEASE_TTL_S = 10


LEASE_RENEW_EVERY_S = 1.0


LEASE_RENEW_TIMEOUT_S = 4.5  # one renewal, in attempts of 1.5 s: a slow etcd is waited for


FENCE_AFTER_S = 7.0  # < LEADER_LEASE_TTL_S: the data plane is given up 3 s before the lease can lapse


LEADER_PROVEN_S = 5.0  # a leader is named to nodes while its heartbeat was seen changing this recently


HA_CALL_TIMEOUT_S = 3.0  # the role's own etcd calls (campaign, key check, heartbeat)


QUORUM_PROBE_EVERY_S = 0.5  # how often a leader whose renewals fail asks the etcd members


# A "no quorum" found at time P counts as a renewal sent at P: whenever etcd gets a quorum
# back it elects a raft leader, which gives every lease its whole TTL again, so no other
# replica can win before P + LEADER_LEASE_TTL_S. The leader keeps its renew deadline from P.
QUORUM_PROOF_S = FENCE_AFTER_S


REPLICA_ROLE_LEADER, REPLICA_ROLE_STANDBY = "leader", "standby"


class StandbyPort:
    """A standby's port 6441: it finishes the TLS handshake and answers every node with
    an ERROR naming the leader, so the node goes there at once."""

    def __init__(self, config: ServerConfig, pki: Pki, leader: Callable[[], str]) -> None:
        self.leader = leader
        self.listener = listen_any(config.port)
        self.listener.setblocking(False)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_cert_chain(pki.network.server_cert_path, pki.network.server_key_path)
        context.load_verify_locations(cafile=str(pki.network.ca_path))
        context.verify_mode = ssl.CERT_REQUIRED
        self.pending: queue.SimpleQueue[ssl.SSLSocket | None] = queue.SimpleQueue()
        self.handshaker = Handshaker(
            self.listener, context, lambda tls, _peer: self.pending.put(tls), config.source_prefix6
        )
        self.thread = threading.Thread(target=self._refuse_all, name="standby-refusals", daemon=True)

    def start(self) -> None:
        self.handshaker.start()
        self.thread.start()

    def stop(self) -> None:
        self.handshaker.stop()
        self.pending.put(None)
        self.thread.join(timeout=5.0)
        self.listener.close()

    def _refuse_all(self) -> None:
        while (tls := self.pending.get()) is not None:
            leader = self.leader()
            reason = f"this replica is a standby; the leader is {leader}" if leader else "no leader is elected yet"
            try:
                tls.setblocking(True)
                tls.settimeout(2.0)
                tls.sendall(Refusal("standby", reason, retry=True, leader=leader).encode())
                with contextlib.suppress(OSError, ssl.SSLError):
                    tls.recv(4096)  # the hello: read before closing, so no reset eats the refusal
            except (OSError, ssl.SSLError):
                pass
            finally:
                tls.close()


class StandbySessions(Sessions):
    """A standby's data plane is the leader's: the standby is healthy (its port refers
    nodes to the leader) while its role loop follows etcd; sessions are not its own."""

    def __init__(self, role: ReplicaRole) -> None:
        self.role = role

    def running(self) -> bool:
        return self.role.is_alive() and not self.role.stop.is_set() and self.role.standby is not None


class ReplicaLease(threading.Thread):
    """This replica's lease, granted and renewed on a thread of its own, so no other etcd
    call (a slow campaign, a heartbeat) delays a renewal. The role reads how fresh it is;
    a lease the role will not lead on is abandoned and revoked, never kept alive."""

    def __init__(self, etcd: Etcd, stop: threading.Event, lost: Callable[[int], None]) -> None:
        super().__init__(name="replica-lease", daemon=True)
        self.etcd, self.stop, self.lost = etcd, stop, lost
        self.id = 0
        self.renewed_at = 0.0  # monotonic time the last renewal that went through was sent
        self._lock = threading.Lock()

    def run(self) -> None:
        while not self.stop.is_set():
            ok = self.renew()
            self.stop.wait(LEASE_RENEW_EVERY_S if ok else LEASE_RENEW_EVERY_S / 4)

    def renew(self) -> bool:
        lease, sent = self.id, time.monotonic()
        try:
            if not lease:
                granted = self.etcd.grant(LEADER_LEASE_TTL_S, timeout=HA_CALL_TIMEOUT_S)
                with self._lock:
                    self.id, self.renewed_at = granted, sent
                return True
            ttl = self.etcd.keep_alive(lease, timeout=LEASE_RENEW_TIMEOUT_S)
        except StoreError as e:
            log.warning("%s", e)
            return False
        if ttl <= 0:
            log.warning("lease %x expired in etcd", lease)
            self.lost(lease)
            return False
        with self._lock:
            if self.id == lease:
                self.renewed_at = max(self.renewed_at, sent)
        return True

    def fresh(self, lease: int = 0, within: float = FENCE_AFTER_S) -> bool:
        """The lease (this one, if given) exists and was renewed within the last `within` s."""
        with self._lock:
            current, renewed_at = self.id, self.renewed_at
        return bool(current) and lease in (0, current) and time.monotonic() - renewed_at <= within

    def abandon(self, lease: int = 0) -> None:
        """Drop the lease (this one, if given): revoked in the background, so whoever
        gives its data plane up never waits on etcd; the next one is granted anew."""
        with self._lock:
            if not self.id or lease not in (0, self.id):
                return
            lease, self.id = self.id, 0
        threading.Thread(target=self.etcd.revoke, args=(lease,), name="lease-revoke", daemon=True).start()


WITNESS_MAGIC = b"ncw1"


WITNESS_HOLDOFF_S = 2.0  # a replica that told a leader "no etcd here" campaigns only this much later


WITNESS_REACH_S = 2.5  # "etcd here": a renewal went through this recently (one a second is sent)


WITNESS_LABEL = b"nc replica witness v1"


def witness_key(cluster_token: str) -> bytes:
    """The key replicas authenticate their "do you reach etcd?" datagrams with."""
    return cluster_key(cluster_token, WITNESS_LABEL)


def witness_mac(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, body, hashlib.sha256).digest()[:16]


class ReplicaWitness(threading.Thread):
    """A replica's answer to a leader whose renewals fail, "do you reach etcd?", on UDP
    at the bootstrap port's number (UDP there has no other use), both ways authenticated
    with a key derived from the clusterToken. A replica that answered "no" campaigns
    only WITNESS_HOLDOFF_S later, so a leader riding out an outage on its "no" hears
    "yes" (it asks every 0.5 s) before that replica could lead."""

    def __init__(self, port: int, key: bytes, reaches: Callable[[], bool], stop: threading.Event) -> None:
        super().__init__(name="replica-witness", daemon=True)
        self.port, self.key, self.reaches, self.stop = port, key, reaches, stop
        self.said_no_at = float("-inf")

    def run(self) -> None:
        try:
            sock = bound_any(socket.SOCK_DGRAM, self.port)
        except OSError as e:
            log.warning(
                "cannot listen on UDP :%d (%s): no leader can ask this replica about etcd", self.port, e.strerror
            )
            return
        with sock:
            sock.settimeout(0.5)
            while not self.stop.is_set():
                try:
                    data, peer = sock.recvfrom(64)
                except (TimeoutError, socket.timeout, OSError):
                    continue
                if len(data) != 36 or not data.startswith(WITNESS_MAGIC):
                    continue
                if not hmac.compare_digest(data[20:], witness_mac(self.key, data[:20])):
                    continue
                reaches = self.reaches()
                if not reaches:
                    self.said_no_at = time.monotonic()
                body = data[:20] + bytes([reaches])
                with contextlib.suppress(OSError):
                    sock.sendto(body + witness_mac(self.key, body), peer)

    def holding_off(self) -> bool:
        return time.monotonic() - self.said_no_at < WITNESS_HOLDOFF_S


def ask_witnesses(key: bytes, peers: list[str], port: int, timeout: float) -> dict[str, bool]:
    """Each peer replica's answer (True: it reaches etcd); a peer that did not answer in
    time is missing."""
    answers: dict[str, bool] = {}
    asks: dict[socket.socket, tuple[str, bytes]] = {}
    try:
        for peer in peers:
            nonce = WITNESS_MAGIC + secrets.token_bytes(16)
            with contextlib.suppress(OSError):
                family = socket.AF_INET6 if ":" in peer else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_DGRAM)
                asks[sock] = (peer, nonce)
                sock.sendto(nonce + witness_mac(key, nonce), (peer, port))
        deadline = time.monotonic() + timeout
        while len(answers) < len(asks) and (left := deadline - time.monotonic()) > 0:
            for sock in select.select(list(asks), [], [], left)[0]:
                peer, nonce = asks[sock]
                with contextlib.suppress(OSError):
                    data = sock.recv(64)
                    if (
                        len(data) == 37
                        and data[:20] == nonce
                        and hmac.compare_digest(data[21:], witness_mac(key, data[:21]))
                    ):
                        answers[peer] = bool(data[20])
    finally:
        for sock in asks:
            sock.close()
    return answers


def no_quorum(answers: list[str], members: int) -> bool:
    """The members' answers (Etcd.member_state) prove etcd has no quorum: a majority down
    or leaderless, at least one saying so itself ("down" alone may be a firewall's
    reject), and none led."""
    without = sum(1 for state in answers if state in ("down", "leaderless"))
    return without >= members // 2 + 1 and "leaderless" in answers and "led" not in answers


class QuorumProbe(threading.Thread):
    """While the leader's renewals fail, asks each etcd member directly whether it has a
    raft leader. A majority down (refusing connections) or leaderless, one of them saying
    so itself, means etcd has no quorum: no lease is granted or renewed anywhere, so no
    other replica can be elected, and the leader may keep its data plane through the
    outage. A member that does not answer (a partition, a dead link) proves nothing, nor
    do refusals alone (a firewall's reject looks the same): then the fence goes ahead."""

    def __init__(
        self, etcd: Etcd, stop: threading.Event, wanted: Callable[[], bool], peers_agree: Callable[[], bool]
    ) -> None:
        super().__init__(name="quorum-probe", daemon=True)
        self.etcd, self.stop, self.wanted, self.peers_agree = etcd, stop, wanted, peers_agree
        self.proved_at = float("-inf")  # when the last probe that found no quorum began

    def run(self) -> None:
        while not self.stop.wait(QUORUM_PROBE_EVERY_S):
            if self.wanted():
                began = time.monotonic()
                if self.quorum_lost() and self.peers_agree():
                    self.proved_at = began

    def quorum_lost(self) -> bool:
        states: dict[str, str] = {}

        def ask(address: str) -> None:
            states[address] = self.etcd.member_state(address, timeout=QUORUM_PROBE_EVERY_S)

        askers = [threading.Thread(target=ask, args=(a,), daemon=True) for a in self.etcd.members]
        for asker in askers:
            asker.start()
        for asker in askers:
            asker.join(timeout=QUORUM_PROBE_EVERY_S * 2)
        return no_quorum(list(states.values()), len(self.etcd.members))

    def proves_no_quorum(self) -> bool:
        return time.monotonic() - self.proved_at <= QUORUM_PROOF_S


class LeaderSightings:
    """What a replica saw of the others' heartbeat entries: a leader is named to nodes
    only while its entry is seen changing. A mute leader's campaign key outlives it by
    its lease; naming it would send nodes to a replica that answers nothing."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[int, float]] = {}  # address -> (mod revision, when it changed)

    def observe(self, entries: list[tuple[dict, int]], now: float) -> None:
        for entry, revision in entries:
            address = str(entry.get("address", ""))
            before = self.seen.get(address)
            if before is None:
                self.seen[address] = (revision, float("-inf"))  # first seen: not proven alive yet
            elif before[0] != revision:
                self.seen[address] = (revision, now)

    def alive(self, address: str, now: float) -> bool:
        seen = self.seen.get(address)
        return seen is not None and now - seen[1] <= LEADER_PROVEN_S


class ReplicaRole(threading.Thread):
    """Campaigns for leadership, runs the data plane while leading (a StandbyPort
    otherwise), heartbeats this replica's entry for `nc adm replica list`, and fences:
    a leader that cannot renew its lease gives its data plane up before the lease ends."""

    def __init__(self, store: EtcdStore, config: ServerConfig, advertised: str, stop: threading.Event) -> None:
        super().__init__(name="replica-role", daemon=True)
        self.store, self.etcd, self.config = store, store.etcd, config
        store.follow()  # a standby until elected: no leader-only write before lead()
        self.control: ControlPlane  # begin() gives it
        self.advertised, self.stop = advertised, stop
        self.campaign_key = self.etcd.key("leader")
        self.campaign_value = json.dumps({"address": advertised, "port": config.port}).encode()  # what it puts there
        self.lease = ReplicaLease(self.etcd, stop, self._lease_lost)
        self.network: NetworkServer | None = None
        self.retiring: threading.Thread | None = None  # a data plane given up, its loop ending
        self.standby: StandbyPort | None = None
        self.leader_address = ""  # what the campaign key names
        self.sightings = LeaderSightings()
        self.became = threading.Event()  # set once the first role (leader or standby) is taken
        self._lock = threading.RLock()  # one role change at a time: the loop's or the fence's
        self.heartbeat_at = 0.0
        self.fence_watch = threading.Thread(target=self._fence_watch, name="replica-fence", daemon=True)
        # From 3 s before the fence, a leader whose renewals fail asks etcd's members why.
        wanted = lambda: self.leading and not self.lease.fresh(within=FENCE_AFTER_S - 3.0)  # noqa: E731
        self.quorum = QuorumProbe(self.etcd, stop, wanted, self._peers_reach_no_etcd)
        self.witness_key = witness_key(config.cluster_token)
        reaches = lambda: self.lease.fresh(within=WITNESS_REACH_S)  # noqa: E731
        self.witness = ReplicaWitness(config.bootstrap_port, self.witness_key, reaches, stop)
        self.replicas: tuple[str, ...] = (advertised,)

    @property
    def leading(self) -> bool:
        return self.network is not None

    def named_leader(self) -> str:
        """The leader a standby names to nodes: the campaign key's, once it proved alive."""
        if self.leading:
            return self.advertised
        address = self.leader_address
        return address if address and self.sightings.alive(address, time.monotonic()) else ""

    # -- its ServerRole part: what serve() asks of it ------------------------------

    def prepare(self, admin_cert: CertRecord) -> None:
        self.store.record_certs(RESERVED_NODE_TOKEN, (admin_cert,))  # every replica's admin identity

    def begin(self, control: ControlPlane, supervisor: Supervisor) -> list[threading.Thread]:
        self.control = control
        control.replicas = lambda: self.replicas
        return [StoreWatch(self.store, control, self.stop), self]

    def ready(self) -> str:
        self.became.wait(10.0)
        return self.describe()

    def data_plane(self) -> NetworkServer | None:
        return self.network

    def describe(self) -> str:
        return REPLICA_ROLE_LEADER if self.leading else REPLICA_ROLE_STANDBY

    def end(self) -> None:
        pass  # its own thread steps down and closes its port when stop is set

    # -- the role loop --------------------------------------------------------------

    def run(self) -> None:
        try:
            self._become_standby()
            self.became.set()
            self.lease.start()
            self.witness.start()
            self.quorum.start()
            self.fence_watch.start()
            while not self.stop.is_set():
                if not self.leading and self.lease.fresh() and not self.witness.holding_off():
                    self._campaign()
                self._check_data_plane()
                self._check_campaign_key()
                self._heartbeat()
                self.stop.wait(LEASE_RENEW_EVERY_S if self.leading else LEASE_RENEW_EVERY_S / 4)
        finally:
            self._finish()

    def _finish(self) -> None:
        """Shutdown: the data plane is given up first, then the lease is revoked, so the
        others need not wait for its TTL."""
        if self.leading:
            with self._lock:
                self._step_down()
        for thread in (self.fence_watch, self.lease):
            if thread.is_alive():
                thread.join(timeout=5.0)
        if self.retiring is not None:
            self.retiring.join(timeout=15.0)
        if self.standby is not None:
            self.standby.stop()
            self.standby = None
        if self.lease.id:
            self.etcd.revoke(self.lease.id)

    def _fence_watch(self) -> None:
        """Apart from the loop and the renewals, whose etcd calls may block: the data plane
        is given up FENCE_AFTER_S after the last renewal, whatever anything else waits for,
        unless etcd is proved to have no quorum (then nobody else can be elected). At
        shutdown it is given up at once, here: the loop may wait seconds on an etcd call,
        and once stopping nothing else fences before the lease can lapse."""
        riding = False
        while not self.stop.wait(0.1):
            if not (self.leading and not self.lease.fresh()):
                if riding and self.leading:
                    log.warning("etcd answers again; this replica kept the data plane through the outage")
                riding = False
                continue
            if self.quorum.proves_no_quorum():
                if not riding:
                    log.warning("etcd has no quorum: no replica can be elected, so the data plane stays up")
                riding = True
                continue
            with self._lock:
                if self.leading and not self.lease.fresh():
                    log.warning("lease not renewed for %.1f s: giving the data plane up (fencing)", FENCE_AFTER_S)
                    self._step_down()
                    self.lease.abandon()
        with self._lock:
            if self.leading:
                self._step_down()

    def _peers_reach_no_etcd(self) -> bool:
        """Every other replica this one knows answered, and none reaches etcd: none can be
        elected (a partition that lets one reach a quorum makes it answer "yes")."""
        peers = [address for address in self.replicas if address != self.advertised]
        answers = ask_witnesses(self.witness_key, peers, self.config.bootstrap_port, timeout=QUORUM_PROBE_EVERY_S)
        return len(answers) == len(peers) and not any(answers.values())

    def _lease_lost(self, lease: int) -> None:
        with self._lock:
            if self.leading and self.lease.id == lease:
                self._step_down()
            self.lease.abandon(lease)

    def _campaign(self) -> None:
        """Put the campaign key if absent. A key already there on this replica's own lease
        is this replica's: an earlier campaign whose answer was lost went through."""
        pb, lease = self.etcd.pb, self.lease.id
        absent = pb.Compare(result=pb.Compare.EQUAL, target=pb.Compare.CREATE, key=self.campaign_key, create_revision=0)
        get = pb.RequestOp(request_range=pb.RangeRequest(key=self.campaign_key))
        try:
            request = pb.TxnRequest(
                compare=[absent], success=[self.etcd.put_op(self.campaign_key, self.campaign_value, lease)]
            )
            request.failure.append(get)
            response = self.etcd.call(self.etcd.kv.Txn, request, timeout=HA_CALL_TIMEOUT_S)
        except StoreError as e:
            log.warning("%s", e)
            return
        revision = response.header.revision
        if not response.succeeded:
            kvs = response.responses[0].response_range.kvs
            if not (kvs and kvs[0].lease == lease and kvs[0].value == self.campaign_value):
                self.leader_address = json.loads(kvs[0].value).get("address", "") if kvs else ""
                return
            revision = kvs[0].create_revision
            log.info("the campaign key is this replica's own (an earlier campaign went through)")
        self._lead(lease, revision)

    def _lead(self, lease: int, revision: int) -> None:
        if not self.lease.fresh(lease):
            log.warning("elected with a lease too old to lead on; revoking it and campaigning again")
            self.lease.abandon(lease)
            return
        self.store.lead((self.campaign_key, revision))
        log.info("elected leader (campaign revision %d): taking the data plane", revision)
        self._prepare_store()
        with self._lock:
            if not self.lease.fresh(lease):
                self.store.follow()
                self.lease.abandon(lease)
                return
            self.leader_address = self.advertised
            try:
                self._become_leader()
            except NcError as e:
                log.error("cannot take the data plane: %s; giving the leadership up", e)
                self._step_down()
                self.lease.abandon(lease)

    def _prepare_store(self) -> None:
        """The old leader's sessions are gone; the reserved node is bound. Outside the role
        lock (etcd may be slow), and not worth a leadership when etcd cannot take it now."""
        server_ip = str(self.config.server_overlay_ip)
        try:
            self.store.reset_states(STATE_CONNECTED)
            if self.store.ensure_reserved_node(server_ip):
                log.info("reserved node-token %s bound to %s", RESERVED_NODE_TOKEN, server_ip)
        except NotLeader:
            pass
        except StoreError as e:
            log.warning("%s; the connection states are reset later", e)

    def _become_leader(self) -> None:
        if self.retiring is not None:  # the last data plane's TUNs and ports are this one's
            self.retiring.join(timeout=30.0)
            if self.retiring.is_alive():
                raise NcError("the previous data plane has not ended yet")
            self.retiring = None
        if self.standby is not None:
            self.standby.stop()
            self.standby = None
        network = NetworkServer(self.config, self.control)
        network.replicas = lambda: self.replicas  # refreshed by the heartbeat: no etcd call on the packet loop
        network.start()
        self.network = network
        self.control.sessions = network

    def _step_down(self) -> None:
        """At once, whatever the packet loop does: the addresses and the port are given up
        first, the loop ends in the background; nothing here waits on etcd."""
        network, self.network = self.network, None
        self.store.follow()
        self.leader_address = ""
        self.control.sessions = StandbySessions(self)
        if network is not None:
            network.release()
            log.info("data plane given up (addresses and port); this replica is a standby")
            self.retiring = threading.Thread(target=network.stop, name="data-plane-stop", daemon=True)
            self.retiring.start()
        if not self.stop.is_set():
            self._become_standby()

    def _become_standby(self) -> None:
        try:
            self.standby = StandbyPort(self.config, self.control.pki, self.named_leader)
            self.standby.start()
            self.control.sessions = StandbySessions(self)
        except OSError as e:
            raise NcError(f"cannot listen on :{self.config.port} ({e.strerror}); stop what uses it") from None

    def _check_data_plane(self) -> None:
        network = self.network
        if network is not None and not (network.thread.is_alive() and network.worker.is_alive()):
            raise NcError("the data plane stopped unexpectedly")

    def _check_campaign_key(self) -> None:
        """A leader leads only while the campaign key is its own: held by its lease, naming
        it. Anything else (a plain put by whoever can write to etcd, a key taken over) makes
        it step down at once and say so; the fence covers an etcd it cannot reach."""
        if not self.leading:
            return
        try:
            request = self.etcd.pb.RangeRequest(key=self.campaign_key)
            kvs = self.etcd.call(self.etcd.kv.Range, request, timeout=HA_CALL_TIMEOUT_S).kvs
        except StoreError:
            return
        if kvs and kvs[0].lease == self.lease.id and kvs[0].value == self.campaign_value:
            return
        found = f"lease {kvs[0].lease:x}, {loggable(kvs[0].value.decode(errors='replace'))}" if kvs else "no key"
        log.warning(
            "the leader key %s is not this replica's any more (%s); stepping down",
            self.campaign_key.decode(),
            found,
        )
        with self._lock:
            if self.leading:
                self._step_down()

    def _heartbeat(self) -> None:
        if not self.lease.id or time.monotonic() - self.heartbeat_at < LEASE_RENEW_EVERY_S * 0.9:
            return
        self.heartbeat_at = time.monotonic()
        entry = {
            "address": self.advertised,
            "role": REPLICA_ROLE_LEADER if self.leading else REPLICA_ROLE_STANDBY,
            "heartbeat": utc_now().isoformat(timespec="seconds"),
            "port": self.config.port,
            "grpcPort": self.config.grpc_port,
            "bootstrapPort": self.config.bootstrap_port,
        }
        key = self.etcd.key("replica", self.advertised)
        with contextlib.suppress(StoreError):
            entries = replica_entries_seen(self.etcd, timeout=HA_CALL_TIMEOUT_S)
            self.sightings.observe(entries, time.monotonic())
            self.replicas = tuple(entry["address"] for entry, _ in entries) or (self.advertised,)
            self.etcd.call(
                self.etcd.kv.Put,
                self.etcd.pb.PutRequest(key=key, value=json.dumps(entry).encode(), lease=self.lease.id),
                timeout=HA_CALL_TIMEOUT_S,
            )


def replica_entries_seen(etcd: Etcd, timeout: float = ETCD_RPC_TIMEOUT_S) -> list[tuple[dict, int]]:
    """Every replica's heartbeat entry with its mod revision, by address."""
    prefix = etcd.key("replica", "")
    response = etcd.call(etcd.kv.Range, etcd.pb.RangeRequest(key=prefix, range_end=prefix_end(prefix)), timeout)
    return sorted(((json.loads(kv.value), kv.mod_revision) for kv in response.kvs), key=lambda e: e[0]["address"])


def replica_entries(etcd: Etcd, timeout: float = ETCD_RPC_TIMEOUT_S) -> list[dict]:
    return [entry for entry, _ in replica_entries_seen(etcd, timeout)]


class StoreWatch(threading.Thread):
    """For replicas: follows the store in etcd by Watch. A node key changed: the pools
    are reloaded, so a binding another replica made is known here at once. A network
    key changed: networks created or deleted on another replica are served or dropped
    here too (the leader makes or removes their TUNs)."""

    def __init__(self, store: EtcdStore, control: ControlPlane, stop: threading.Event) -> None:
        super().__init__(name="store-watch", daemon=True)
        self.store, self.control, self.overlays, self.stop = store, control, control.overlays, stop

    def run(self) -> None:
        etcd = self.store.etcd
        nodes, networks = etcd.key("node", ""), etcd.key("network", "")
        while not self.stop.is_set():
            try:
                revision = etcd.range(nodes).header.revision
                self._sync_networks()
                self._reload()
                for events in etcd.watch(etcd.prefix, revision + 1, self.stop):
                    keys = [event.kv.key for event in events]
                    if any(key.startswith(networks) for key in keys):
                        self._sync_networks()
                    if any(key.startswith(nodes) for key in keys):
                        self._reload()
            except StoreError as e:
                log.warning("%s; watching again in 1 s", e)
                self.stop.wait(1.0)

    def _reload(self) -> None:
        for overlay in self.overlays.all():
            overlay.bindings.reload()

    def _sync_networks(self) -> None:
        rows = {row.name: row for row in self.store.networks()}
        known = {overlay.name for overlay in self.overlays.all()}
        for name in sorted(rows.keys() - known):
            overlay = self.overlays.adopt(rows[name])
            if overlay is not None:
                log.info("network %s (%s) was created on another replica", name, overlay.network)
                with contextlib.suppress(NcError):
                    self.control.sessions.add_overlay(overlay)
        for name in sorted(known - rows.keys() - {DEFAULT_NETWORK}):
            log.info("network %s was deleted on another replica", name)
            self.overlays.remove(name)
            self.control.sessions.remove_overlay(name)


# ============================================================================
# 15. Server and client assembly
#    ONE assembly for a single server and a replica (a role decides where the
#    data plane runs): start-up, supervision, notify, reload, metrics, stop.
# ============================================================================


def run_client(config: ClientConfig, config_path: str | None = None) -> int:
    if os.geteuid() != 0:
        raise NcError("nc client must run as root (it creates a TUN device and routes)")
    os.umask(0o077)
    client = NetworkClient(config)
    client.config_path = config_path or client.config_path
    renewer = CertRenewer(config, client.stop, client.on_renewed)
    interrupted = threading.Event()  # Ctrl-C, not SIGTERM: exit 130
    signal.signal(signal.SIGTERM, lambda *_: client.request_stop())
    signal.signal(signal.SIGINT, lambda *_: (interrupted.set(), client.request_stop()))
    signal.signal(signal.SIGHUP, lambda *_: client.request_reload())
    log.info("nc %s client: node %s, server %s", VERSION, config.token, host_port(config.server_addr, config.port))
    status = StatusSocket(Path(config.work_dir) / STATUS_SOCKET, client.status)
    status.start()
    sd_notify("READY=1\nSTATUS=connecting")  # the client runs and answers `nc status`; it connects on its own
    renewer.start()
    try:
        code = client.run()
        return EXIT_INTERRUPTED if interrupted.is_set() else code
    except Refused as e:
        if e.code != "unregistered":
            raise
        again = f"nc client --join '<join string from nc adm token create>' --work-dir {shlex.quote(config.work_dir)}"
        raise Refused(f"{e}; to join again: {again}", e.code) from None
    finally:
        status.close()
        if renewer.is_alive():
            renewer.join(timeout=RPC_TIMEOUT_S)  # client.run() set stop on its way out


def reload_networks(config: ServerConfig, fresh: ServerConfig, control: ControlPlane) -> tuple[list[str], bool]:
    """Serve the networks the file gained; returns their names, and False when it also
    removed or changed one (that needs a restart: its nodes hold addresses in it)."""
    running = {spec.name: spec for spec in config.networks}
    added = []
    for spec in fresh.networks:
        if spec.name in running:
            continue
        try:
            control.add_config_network(spec)
        except NcError as e:
            log.error("SIGHUP: network %s not added: %s", spec.name, e)
            continue
        config.networks.append(spec)
        added.append(spec.name)
    wanted = {spec.name: spec for spec in fresh.networks}
    kept = all(wanted.get(name) == spec for name, spec in running.items())
    return added, kept


# What SIGHUP applies to a running server (read at each use); anything else needs a restart.
RELOADABLE_FIELDS = ("debug", "nodes_may_mint", "node_mint_rate", "node_token_max_life", "node_cert_life")


def reload_server_config(config: ServerConfig, path: str | None, control: ControlPlane | None = None) -> None:
    """SIGHUP: re-read the config file, apply what can change without dropping sessions,
    and say in one line what was applied and what needs a restart."""
    if path is None:
        log.info("SIGHUP: running on the embedded defaults (no --config); nothing to re-read")
        return
    try:
        fresh: ServerConfig = load_config(path, "server")
    except ConfigError as e:
        log.error("SIGHUP: %s; the running configuration stays", e)
        return
    changed = [f.name for f in dataclasses.fields(ServerConfig) if getattr(fresh, f.name) != getattr(config, f.name)]
    applied = [camel(name) for name in changed if name in RELOADABLE_FIELDS]
    for name in changed:
        if name in RELOADABLE_FIELDS:
            setattr(config, name, getattr(fresh, name))
    logging.getLogger("nc").setLevel(logging.DEBUG if config.debug else logging.INFO)
    restart = [camel(name) for name in changed if name not in (*RELOADABLE_FIELDS, "networks")]
    if "networks" in changed and control is not None:
        added, kept = reload_networks(config, fresh, control)
        applied += [f"networks (+{name})" for name in added]
        restart += [] if kept else ["networks (removed or changed ones)"]
    log.info(
        "SIGHUP: re-read %s; applied: %s; needs a restart: %s",
        path,
        ", ".join(applied) or "nothing changed",
        ", ".join(restart) or "nothing",
    )


# NetworkServer counters ("dropped-<reason>", handshaker's) -> nc_refusals_total reasons.
REFUSAL_COUNTERS = {
    "refused-hellos": "session",
    "dropped-spoofed": "spoofing",
    "protocol-errors": "protocol",
    "refused-busy": "handshake-limit",
    "tls-failures": "handshake",
    "handshake-timeouts": "handshake-timeout",
}


LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


METRICS_MAX_CLIENTS = 32  # HTTP clients held at once; one more displaces the one waiting longest


METRICS_CLIENT_TIMEOUT_S = 10.0  # to send a request and take the answer


METRICS_MAX_REQUEST = 8192  # bytes of request line and headers


class MetricsClient:
    __slots__ = ("deadline", "received", "sock", "unsent")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.received = b""
        self.unsent = b""
        self.deadline = time.monotonic() + METRICS_CLIENT_TIMEOUT_S


class MetricsHttp(threading.Thread):
    """GET /metrics over HTTP/1.0, every client on one epoll loop: a slow or idle client
    costs a socket, never a thread (prometheus_client's server starts one per
    connection). At most METRICS_MAX_CLIENTS at once, the longest waiting closed for a
    newcomer, each for METRICS_CLIENT_TIMEOUT_S."""

    def __init__(self, listener: socket.socket, render: Callable[[], tuple[bytes, str]]) -> None:
        super().__init__(name="metrics-http", daemon=True)
        self.listener, self.render = listener, render
        self.listener.setblocking(False)
        self.clients: dict[int, MetricsClient] = {}  # in order of arrival
        self.stopping = threading.Event()
        self.epoll = select.epoll()
        self.paused_until = 0.0  # accept() ran out of file descriptors; listen again then

    def close(self) -> None:
        self.stopping.set()
        if self.is_alive():
            self.join(timeout=5.0)
        for client in list(self.clients.values()):
            self._close(client)
        self.listener.close()
        self.epoll.close()

    def run(self) -> None:
        self.epoll.register(self.listener.fileno(), select.EPOLLIN)
        while not self.stopping.is_set():
            for fd, events in self.epoll.poll(0.5):
                if fd == self.listener.fileno():
                    self._accept()
                elif (client := self.clients.get(fd)) is not None:
                    try:
                        self._step(client, events)
                    except OSError:
                        self._close(client)
            now = time.monotonic()
            for client in [c for c in self.clients.values() if now > c.deadline]:
                self._close(client)
            if self.paused_until and now >= self.paused_until:
                self.paused_until = 0.0
                self.epoll.modify(self.listener.fileno(), select.EPOLLIN)

    def _accept(self) -> None:
        for _ in range(64):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # out of file descriptors: stop listening for a second (epoll would spin)
                self.epoll.modify(self.listener.fileno(), 0)
                self.paused_until = time.monotonic() + 1.0
                return
            if len(self.clients) >= METRICS_MAX_CLIENTS:
                self._close(next(iter(self.clients.values())))
            sock.setblocking(False)
            self.clients[sock.fileno()] = MetricsClient(sock)
            self.epoll.register(sock.fileno(), select.EPOLLIN)

    def _step(self, client: MetricsClient, events: int) -> None:
        if events & select.EPOLLIN and not client.unsent:
            data = client.sock.recv(4096)
            client.received += data
            if not data or len(client.received) > METRICS_MAX_REQUEST:
                self._close(client)
                return
            if b"\r\n\r\n" not in client.received and b"\n\n" not in client.received:
                return
            client.unsent = self._answer(client.received)
            self.epoll.modify(client.sock.fileno(), select.EPOLLOUT)
        if client.unsent:
            try:
                sent = client.sock.send(client.unsent)
            except BlockingIOError:
                return
            client.unsent = client.unsent[sent:]
            if not client.unsent:
                self._close(client)

    def _answer(self, request: bytes) -> bytes:
        method, _, rest = request.partition(b" ")
        path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            status, body, kind = "405 Method Not Allowed", b"only GET\n", "text/plain"
        elif path not in (b"/", b"/metrics"):
            status, body, kind = "404 Not Found", b"metrics are at /metrics\n", "text/plain"
        else:
            try:
                body, kind = self.render()
                status = "200 OK"
            except Exception:  # a collector's bug costs one scrape, never the metrics port
                log.exception("metrics: collecting failed")
                status, body, kind = "500 Internal Server Error", b"collecting failed\n", "text/plain"
        head = f"HTTP/1.0 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        return head.encode() + (b"" if method == b"HEAD" else body)

    def _close(self, client: MetricsClient) -> None:
        if self.clients.pop(client.sock.fileno(), None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self.epoll.unregister(client.sock.fileno())
        client.sock.close()


DROP_REASONS = (  # every nc_drops_total reason, there (at 0) from the first scrape so rate() has a baseline
    *("queue-full", "udp-send", "udp-full", "spoofed", "interconnection", "no-route", "tun-write"),  # the loop's
    *("oversized", "not-ipv4", "runt", "gso-type", "gso-hdr-len", "gso-csum", "gso-size", "gso-segments"),  # BadFrame
    *("udp-malformed", "udp-unknown-session", "udp-forged", "udp-replayed", "udp-not-one-frame", "udp-not-a-packet"),
    "udp-group-incomplete",  # a datagram that does not continue the group being received (one before it lost)
)


def certificate_files(config: ServerConfig) -> dict[str, Path]:
    """The server's certificates an operator must renew in time, by the name metrics and
    `nc adm ca status` give them."""
    return {
        "grpc-ca": Path(config.grpc_cert_dir) / "ca.crt",
        "network-ca": Path(config.network_cert_dir) / "ca.crt",
        "grpc-server": Path(config.grpc_cert_dir) / "server.crt",
        "network-server": Path(config.network_cert_dir) / "server.crt",
        "admin": config.admin_dir / "client.crt",
    }


class ServerMetrics:
    """Prometheus metrics of a running server, served on metricsAddr. Most are read live
    from the parts at scrape time (nothing on the packet path but plain integer counters);
    the two latency histograms are fed by hooks of the control plane and the handshaker."""

    def __init__(self, control: ControlPlane, role: ServerRole) -> None:
        from prometheus_client import CollectorRegistry, Histogram, PlatformCollector, ProcessCollector

        self.control, self.role = control, role
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.join_seconds = Histogram(
            "nc_join_duration_seconds",
            "Time to admit a join (GetToken)",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.handshake_seconds = Histogram(
            "nc_handshake_duration_seconds",
            "Data-plane TLS handshake time",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(self)
        control.observe_join = self.join_seconds.observe
        control.observe_handshake = self.handshake_seconds.observe
        self.httpd: MetricsHttp | None = None
        self.guard: GrpcGuard | None = None  # its refusals count as "grpc-limit"

    def serve(self, address: str) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        host, port = split_host_port(address, "server.metricsAddr")
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            listener = socket.create_server((host, port), family=family, backlog=128)
        except OSError as e:
            raise NcError(
                f"cannot serve metrics on {address} ({e.strerror}); change server.metricsAddr or set it empty"
            ) from None
        self.httpd = MetricsHttp(listener, lambda: (generate_latest(self.registry), CONTENT_TYPE_LATEST))
        self.httpd.start()
        log.info("Prometheus metrics on http://%s/metrics", address)

    def close(self) -> None:
        if self.httpd is not None:
            self.httpd.close()

    def describe(self) -> list[Any]:
        return []  # families are known only at scrape time; an empty describe keeps registration cheap

    def _certificate_expiry(self) -> Any:
        """Seconds until each of the server's certificates expires (negative: expired), read
        from its file at each scrape, so a renewal or a restore shows at once."""
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(
            "nc_certificate_expiry_seconds",
            "Seconds until a certificate of this server expires",
            labels=["certificate"],
        )
        now = utc_now()
        for name, path in certificate_files(self.control.config).items():
            with contextlib.suppress(PkiError, OSError):
                family.add_metric([name], (load_cert_file(path).not_valid_after_utc - now).total_seconds())
        return family

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        nodes = GaugeMetricFamily("nc_nodes", "Registered nodes by network and state", labels=["network", "state"])
        counts = collections.Counter(
            (row.network, STATE_NAMES.get(row.state, "unknown"))
            for row in self.control.store.nodes()
            if row.token != RESERVED_NODE_TOKEN
        )
        pool = GaugeMetricFamily("nc_pool_addresses", "Overlay addresses by network", labels=["network", "state"])
        for overlay in self.control.overlays.all():
            for state in STATE_NAMES.values():
                nodes.add_metric([overlay.name, state], counts.get((overlay.name, state), 0))
            bound = len(overlay.bindings.pool)
            pool.add_metric([overlay.name, "bound"], bound)
            pool.add_metric([overlay.name, "free"], overlay.bindings.pool.capacity - bound)
        yield nodes
        yield pool
        info = GaugeMetricFamily("nc_server", "This server: its version and role", labels=["version", "role"])
        info.add_metric([VERSION, self.role.describe()], 1)
        yield info
        build = GaugeMetricFamily(
            "nc_build_info", "The nc build and the Python it runs on", labels=["version", "python"]
        )
        build.add_metric([VERSION, platform_python()], 1)
        yield build
        yield self._certificate_expiry()
        network = self.role.data_plane()  # None on a standby: the leader carries the traffic
        sessions = GaugeMetricFamily("nc_sessions", "Live data-plane sessions by transport", labels=["transport"])
        by_transport = collections.Counter(network.transports().values() if network else ())
        for transport in ("tcp", "udp"):
            sessions.add_metric([transport], by_transport[transport])
        yield sessions
        traffic = network.traffic() if network else collections.Counter()
        data = CounterMetricFamily("nc_data", "Data-plane traffic with nodes", labels=["direction"], unit="bytes")
        packets = CounterMetricFamily("nc_packets", "Data frames with nodes", labels=["direction"])
        for direction in ("rx", "tx"):
            data.add_metric([direction], traffic[f"{direction}_bytes"])
            packets.add_metric([direction], traffic[f"{direction}_packets"])
        yield data
        yield packets
        between = CounterMetricFamily(
            "nc_node_to_node", "Node-to-node traffic: relayed by this server, or direct (as nodes report)",
            labels=["path"], unit="bytes",
        )  # fmt: skip
        between.add_metric(["relayed"], network.counters["relayed-bytes"] if network else 0)
        between.add_metric(["direct"], traffic["direct_tx_bytes"])
        yield between
        counters = collections.Counter(network.counters if network else ())
        if network is not None and network.handshaker is not None:
            counters.update(network.handshaker.counters)
        drops = CounterMetricFamily("nc_drops", "Packets dropped by reason", labels=["reason"])
        dropped = dict.fromkeys(DROP_REASONS, 0)
        for name, value in counters.items():
            if name.startswith("dropped-"):
                dropped[name.removeprefix("dropped-")] = value
            elif name.startswith("udp-"):  # datagrams that did not authenticate, or carried no packet
                dropped[name] = value
        for reason, value in sorted(dropped.items()):
            drops.add_metric([reason], value)
        yield drops
        refusals = CounterMetricFamily("nc_refusals", "Joins and connections refused by reason", labels=["reason"])
        reasons = collections.Counter(self.control.refusals)
        for name, reason in REFUSAL_COUNTERS.items():
            reasons[reason] += counters.get(name, 0)
        reasons["grpc-limit"] += self.guard.refused if self.guard is not None else 0
        for budget in self.control.budgets.all():
            reasons[budget.reason] += budget.refused
        for reason in ("token", "network-full"):
            reasons[reason] += 0  # present from the start, so rate() has a baseline
        for reason, value in sorted(reasons.items()):
            refusals.add_metric([reason], value)
        yield refusals


def platform_python() -> str:
    return sys.version.split()[0]


def run_server(config: ServerConfig, config_path: str | None = None) -> int:
    check_root("server")
    fd_limit = raise_open_file_limit()
    limit_malloc_arenas()  # before gRPC starts its threads
    os.umask(0o077)  # keys, the database and logs are for root only
    try:
        return serve(config, fd_limit, config_path)
    except OSError as e:  # files of the workDir: a read-only or full disk
        fix = f"give nc a writable workDir with free space (server.workDir {config.work_dir})"
        raise NcError(os_error_line(e, fix)) from None


class ServerRole(Protocol):
    """Where the data plane runs: on a single server always (SingleRole); on a replica
    on etcd while it leads, its port referring nodes to the leader otherwise (ReplicaRole).
    Everything else about a server is the same for both and lives in serve()."""

    def prepare(self, admin_cert: CertRecord) -> None:
        """The store's part of the start (the reserved node-token), before the pools load it."""

    def begin(self, control: ControlPlane, supervisor: Supervisor) -> list[threading.Thread]:
        """Start the data plane (or the campaign for it); returns the threads serve() starts,
        watches and joins."""
        ...

    def ready(self) -> str:
        """Wait until the data plane (or a first role) is taken; what STATUS= says then."""
        ...

    def data_plane(self) -> NetworkServer | None:
        """The data plane running here now, if any."""
        ...

    def describe(self) -> str:
        """single, leader or standby: for logs and the metrics' role label."""
        ...

    def end(self) -> None:
        """Stop what begin() started that its threads do not stop themselves."""


class SingleRole:
    """A server alone on its sqlite store: the data plane runs here from start to stop."""

    def __init__(self, config: ServerConfig, store: Datastore, stop: threading.Event) -> None:
        self.config, self.store, self.stop = config, store, stop
        self.network: NetworkServer | None = None

    def prepare(self, admin_cert: CertRecord) -> None:
        reset = self.store.reset_states(STATE_CONNECTED)
        if reset:
            log.info("reset %d stale connection state(s) to idle", reset)
        ensure_reserved(self.store, str(self.config.server_overlay_ip), admin_cert)

    def begin(self, control: ControlPlane, supervisor: Supervisor) -> list[threading.Thread]:
        network = NetworkServer(self.config, control)
        for thread in (network.thread, network.worker):
            supervisor.watch_thread(thread)  # before they start, so an early death is theirs to report
        network.start()
        self.network = control.sessions = network
        return [CacheSync(control.overlays, self.stop)]

    def ready(self) -> str:
        return f"serving {len(self.network.planes) if self.network else 0} network(s)"

    def data_plane(self) -> NetworkServer | None:
        return self.network

    def describe(self) -> str:
        return "single"

    def end(self) -> None:
        if self.network is not None:
            self.network.stop()
        with contextlib.suppress(StoreError):  # a damaged or full store is reported once, above
            self.store.reset_states(STATE_IDLE)


def run_start_up_step(name: str, step: Callable[[], None]) -> None:
    """Start-up work that the design runs in a thread of its own (the reserved-token
    check): run it there and wait; its failure fails the start instead of leaving a
    server that runs without, say, its admin identity."""
    failures: list[BaseException] = []

    def body() -> None:
        try:
            step()
        except BaseException as e:  # handed to the main thread, which raises it
            failures.append(e)

    thread = threading.Thread(target=body, name=name)
    thread.start()
    thread.join()
    if failures:
        raise failures[0]


def reload_and_watchdog(config: ServerConfig, config_path: str | None, control: ControlPlane) -> Callable[[], None]:
    """The server's tick, once a second while every part lives: a reload SIGHUP asked
    for, and the watchdog, fed while the data plane (a standby: its referrals) runs."""
    watchdog, reload = Watchdog(), threading.Event()
    signal.signal(signal.SIGHUP, lambda *_: reload.set())

    def tick() -> None:
        if reload.is_set():
            reload.clear()
            sd_notify("RELOADING=1")
            reload_server_config(config, config_path, control)
            sd_notify("READY=1")
        watchdog.ping(control.sessions.running())

    return tick


def serve(config: ServerConfig, fd_limit: int, config_path: str | None = None) -> int:
    """`nc server`: alone on its sqlite store, or (datastoreEndpoint) one replica of several
    on etcd. The same start-up, supervision (every long-lived part watched), READY=1 and
    watchdog, SIGHUP reload, metrics and shutdown for both; the role decides only where
    the data plane runs."""
    kind = "replica" if config.datastore_endpoint else "server"
    with work_dir_lock(Path(config.work_dir)):
        advertised = config.ip or detect_server_ip()
        underlay_ip = resolve_host(advertised)  # a DNS name: for certificates and the CIDR rules
        server_ip = str(config.server_overlay_ip)
        where = f"overlay {config.overlay} (server {server_ip})" + (
            f", datastore {config.datastore_endpoint}" if config.datastore_endpoint else ""
        )
        log.info("nc %s %s starting: advertised address %s, %s", VERSION, kind, advertised, where)
        store = open_store(config)
        stop = threading.Event()
        threads: list[threading.Thread] = []
        servers: list[Any] = []
        role: ServerRole | None = None
        metrics: ServerMetrics | None = None
        supervisor = Supervisor()
        threading.excepthook = supervisor.on_thread_exception
        code = 0
        try:
            pki = Pki(config)
            if isinstance(store, EtcdStore):
                share_pki(store.etcd, pki, config.cluster_token)
            admin_cert = pki.ensure((underlay_ip, "127.0.0.1", server_ip))
            chosen: ServerRole = (
                ReplicaRole(store, config, advertised, stop)
                if isinstance(store, EtcdStore)
                else SingleRole(config, store, stop)
            )
            run_start_up_step("reserved-check", lambda: chosen.prepare(admin_cert))
            overlays = Overlays(store, config)
            control = ControlPlane(config, store, pki, overlays, advertised)
            control.underlay_ip = underlay_ip
            control.check_config_networks()
            metrics = ServerMetrics(control, chosen) if config.metrics_addr else None
            role = chosen
            threads = [*role.begin(control, supervisor), TokenSweeper(store, stop), MemoryTrimmer(stop)]
            guard = GrpcGuard(stop, config.source_prefix6)
            try:
                servers = start_grpc_servers(control, guard, fd_limit=fd_limit)
            except BaseException:
                guard.close()  # its public ports; the thread never started
                raise
            threads.insert(0, guard)
            if metrics is not None:
                metrics.guard = guard
            for thread in threads:
                supervisor.watch_thread(thread)
                thread.start()
            if metrics is not None:
                metrics.serve(config.metrics_addr)
            for name, server in zip(("gRPC bootstrap server", "gRPC control server"), servers):
                supervisor.watch(name, lambda s=server: s.wait_for_termination(0))  # True: still serving
            status = role.ready()
            log.info("nc %s ready (%s); join string pin %s", kind, status, pki.ca_pin())
            sd_notify(f"READY=1\nSTATUS={status}")  # every port listens now
            code = wait_for_stop_signal(stop, supervisor, reload_and_watchdog(config, config_path, control))
        finally:
            stop.set()
            if metrics is not None:
                metrics.close()
            for server in servers:
                server.stop(grace=1.0).wait(3.0)
            if role is not None:
                role.end()
            for thread in threads:
                if thread.ident is not None:  # a start that failed early never started them
                    thread.join(timeout=10.0)
            store.close()
            threading.excepthook = THREAD_EXCEPTHOOK
            log.info("nc %s stopped", kind)
    return code


def ensure_reserved(store: Datastore, server_ip: str, admin_cert: CertRecord) -> None:
    """The reserved node-token: bound to the server's overlay IP, and held by the
    admin certificate on disk (any older admin certificate is revoked)."""
    if store.ensure_reserved_node(server_ip):
        log.info("reserved node-token %s bound to %s", RESERVED_NODE_TOKEN, server_ip)
    store.record_certs(RESERVED_NODE_TOKEN, (admin_cert,))
    if store.switch_to_cert(RESERVED_NODE_TOKEN, "grpc", admin_cert.serial):
        log.info("revoked the previous admin certificate")


# ============================================================================
# 16. Admin commands, logging and main
#    `nc adm ...` and one printer for its tables and JSON, log files that
#    rotate daily, argparse, and where an NcError becomes one stderr line.
# ============================================================================


@dataclasses.dataclass
class Table:
    """Rows for a terminal, under a header of column names."""

    header: list[str]
    rows: list[list[Any]]

    def lines(self) -> list[str]:
        cells = [[loggable(cell) for cell in row] for row in [self.header, *self.rows]]  # peers wrote some of them
        widths = [max(len(cell) for cell in column) for column in zip(*cells)]
        return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells]


def show(args: argparse.Namespace, document: Any, text: str | Table) -> None:
    """The one way a command prints its result: with `-o json` the JSON document (camelCase
    keys, as the gRPC fields), else the text: a line (or lines) or a table."""
    if getattr(args, "output", "text") == "json":
        print(json.dumps(document, indent=2))
    elif isinstance(text, Table):
        print("\n".join(text.lines()))
    else:
        print(text)


TIME_KEYS = {"createTime", "updateTime", "expireTime", "lastSeen"}  # as the stores write them: local, no zone


def message_json(message: Any) -> dict:
    """A gRPC message as nc's CLI prints it: every field under its camelCase name, 64-bit
    counters as numbers (protobuf's own JSON writes them as strings), times RFC 3339 with
    a zone (an older server sends its local time without one), a state's name beside its
    code. The message itself keeps its types: this is the CLI's document, not the wire's."""
    from google.protobuf import json_format

    document = json_format.MessageToDict(message, always_print_fields_with_no_presence=True)
    for field in message.DESCRIPTOR.fields:
        key, value = field.json_name, getattr(message, field.name)
        if key not in document:
            continue
        if field.message_type is not None:
            document[key] = [message_json(m) for m in value] if isinstance(document[key], list) else message_json(value)
        elif field.cpp_type in (field.CPPTYPE_INT64, field.CPPTYPE_UINT64):
            document[key] = list(value) if isinstance(document[key], list) else int(value)
        elif key in TIME_KEYS:
            document[key] = rfc3339(value) or None
        if key == "connState":
            document["connStateName"] = STATE_NAMES.get(value, "unknown")
    return document


def token_life_minutes(text: str) -> int:
    """--life: whole minutes as the original wrote it (negative: never expires), or a
    duration such as 90m, 12h or 30d; the server decides what lives it grants."""
    with contextlib.suppress(ValueError):
        return int(text)
    seconds = parse_duration(text, "--life", error=UsageError, number_unit=60)
    if seconds % 60:
        raise UsageError(f"--life: {text!r} is not whole minutes; write it like 90m, 12h or 30d")
    return seconds // 60


def adm_token_create(args: argparse.Namespace) -> int:
    _, pb, _ = grpc_modules()
    life = token_life_minutes(args.life)
    request = pb.CreateBootstrapTokenRequest(lifeMinutes=life, singleUse=args.single_use, network=args.net or "")
    response = admin_rpc(args, "CreateBootstrapToken", request)
    command = join_command(response.joinString)
    fields = {k: v for k, v in message_json(response).items() if k not in ("code", "message")}
    if args.print_join_command:
        show(args, {**fields, "joinCommand": command}, command)
    else:
        show(args, fields, response.joinString)
    return 0


def join_command(join_string: str) -> str:
    """The line to run on a new node, quoted for a POSIX shell (kubeadm's --print-join-command)."""
    return f"nc client --join {shlex.quote(join_string)} --work-dir {DEFAULT_CLIENT_WORK_DIR}"


def adm_token_list(args: argparse.Namespace) -> int:
    _, pb, _ = grpc_modules()
    response = admin_rpc(args, "ListBootstrapTokens", pb.ListBootstrapTokensRequest())
    rows = [
        [
            t.tokenId,
            t.network,
            t.state or "-",  # an older server does not say
            f"{t.uses}/{t.useLimit or 'unlimited'}" if t.state else ("1" if t.singleUse else "-"),
            short_time(t.expireTime),
            short_time(t.createTime),
            t.mintedBy or "admin",
        ]
        for t in response.tokens
    ]
    table = Table(["TOKEN-ID", "NETWORK", "STATE", "USES", "EXPIRES", "CREATED", "MINTED-BY"], rows)
    show(args, [message_json(t) for t in response.tokens], table)
    return 0


def short_time(text: str) -> str:
    """A time for a table: local, to the second, without the zone (the JSON has it)."""
    with contextlib.suppress(ValueError):
        moment = datetime.datetime.fromisoformat(rfc3339(text))
        return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    return text or "-"


def adm_token_delete(args: argparse.Namespace) -> int:
    _, pb, _ = grpc_modules()
    admin_rpc(args, "DeleteBootstrapToken", pb.DeleteBootstrapTokenRequest(tokenId=args.token_id))
    deleted = args.token_id.split(".", 1)[0]  # the public id, even if the whole token was given
    show(args, {"tokenId": deleted, "deleted": True}, f"deleted bootstrap token {deleted}")
    return 0


def adm_join(args: argparse.Namespace) -> int:
    work_dir = Path(args.work_dir).resolve()
    config = join(original_join_string(args), work_dir, args.unsafe_skip_ca_pin, name=args.name or "")
    copies = {"network": args.network_certs_dir, "grpc": args.grpc_certs_dir}
    for kind, directory in copies.items():
        if directory:
            copy_as_original(work_dir / "tls" / kind, Path(directory))
    document = {"nodeToken": config.token, "workDir": str(work_dir), "config": str(work_dir / "client.yml")}
    show(args, document, config.token)
    return 0


def original_join_string(args: argparse.Namespace) -> str:
    """JOIN, or the original's `--ip IP get-token --bootstrap-token T`: T at the bootstrap
    port of IP, pinned to the gRPC CA in --cacert (the admin's) when that file is here."""
    if args.join_string and args.bootstrap_token:
        raise UsageError("give a join string or --bootstrap-token, not both")
    if args.join_string:
        return args.join_string
    if not args.bootstrap_token:
        raise UsageError("give the join string from `nc adm token create` (or the original's --bootstrap-token)")
    target = admin_target(args)
    ca = target.ca if target.ca.exists() else None
    pin = f"#{spki_pin(load_cert_file(ca))}" if ca is not None else ""
    return f"{args.bootstrap_token}@{target.bootstrap_address}{pin}"


ORIGINAL_CREDENTIAL_NAMES = {"ca.crt": "ca.pem", "client.crt": "client.pem", "client.key": "client-key.pem"}


def copy_as_original(source: Path, directory: Path) -> None:
    """get-token --network-certs-dir / --grpc-certs-dir: the credentials also where the
    original wrote them, under its file names."""
    for name, original in ORIGINAL_CREDENTIAL_NAMES.items():
        write_private(directory / original, (source / name).read_bytes(), 0o600 if name.endswith("key") else 0o644)


def adm_config_check(args: argparse.Namespace) -> int:
    """Validate a server.yml or client.yml (its `mode:` says which) as a start would, without
    starting anything, like `nginx -t`: prints ok, or the one error line and exits 2."""
    path = args.config
    if path is None:
        show(args, {"ok": True, "config": None}, "ok (no --config: the embedded defaults)")
        return 0
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        doc = None  # load_config says what is wrong with the file
    mode = doc.get("mode") if isinstance(doc, dict) else None
    if mode not in ("server", "client"):
        mode = "client" if isinstance(doc, dict) and "client" in doc else "server"
    load_config(path, mode)
    show(args, {"ok": True, "config": path, "mode": mode}, f"ok: {path} is a valid {mode} config")
    return 0


def adm_node_list(args: argparse.Namespace) -> int:
    """The nodes: by default the columns that fit 100 characters; -o wide shows every one."""
    _, pb, _ = grpc_modules()
    response = admin_rpc(args, "ListNodes", pb.ListNodesRequest())
    nodes = list(response.nodes)
    if getattr(args, "output", "text") == "wide":
        header = ["NAME", "NODE-TOKEN", "NETWORK", "BIND-IP", "STATE", "HOST", "ENDPOINT", "TRANSPORT", "LAST-SEEN"]
        header += ["RX", "TX", "DIRECT", "VERSION", "UPDATED", "MINTED-BY"]
        names = {(n.network, n.bindIp): n.name for n in nodes if n.name}
        rows = [[n.name or "-", *node_cells(n, wide=True, names=names)] for n in nodes]
    else:
        header = ["NAME", "NODE-TOKEN", "NETWORK", "BIND-IP", "STATE", "TRANSPORT", "LAST-SEEN"]
        rows = [[clip(n.name or "-", 16), *node_cells(n, wide=False)] for n in nodes]
    show(args, [message_json(n) for n in nodes], Table(header, rows))
    return 0


def node_cells(n: Any, wide: bool, names: dict[tuple[str, str], str] | None = None) -> list[str]:
    """A node's row after its name: the identity and state columns, then (wide) the rest."""
    state = "reserved" if n.reserved else STATE_NAMES.get(n.connState, str(n.connState))
    seen = (short_time(n.lastSeen) if n.lastSeen else "never") if wide else time_ago(n.lastSeen, n.connState)
    cells = [n.nodeToken, n.network if wide else clip(n.network, 10), n.bindIp or "-", state]
    if not wide:
        return [*cells, n.transport or "-", seen]
    cells += [n.hostName or "-", n.endpoint or "-", n.transport or "-", seen, human_bytes(n.rxBytes)]
    cells += [human_bytes(n.txBytes), direct_cell(n, names or {})]
    return [*cells, n.nodeVersion or "-", short_time(n.updateTime), n.mintedBy or "admin"]


def direct_cell(n: Any, names: dict[tuple[str, str], str]) -> str:
    """The peers a node reaches directly now, by name (an unnamed one by its IP): three, then how many more."""
    shown = [names.get((n.network, ip)) or ip for ip in n.directPeers]
    if not shown:
        return "-"
    return ",".join(shown[:3]) + (f"+{len(shown) - 3}" if len(shown) > 3 else "")


def clip(text: str, width: int) -> str:
    """text cut to width for a narrow table, the cut marked with '~' (-o wide shows it whole)."""
    return text if len(text) <= width else text[: width - 1] + "~"


def time_ago(when: str, state: int) -> str:
    """How long ago a node was last seen: now (connected), 45s, 12m, 5h, 3d; never."""
    if state == STATE_CONNECTED:
        return "now"
    try:
        seconds = (utc_now() - datetime.datetime.fromisoformat(rfc3339(when))).total_seconds()
    except ValueError:
        return when or "never"
    for unit, size, from_s in (("d", 86400, 2 * 86400), ("h", 3600, 2 * 3600), ("m", 60, 60)):
        if seconds >= from_s:
            return f"{int(seconds // size)}{unit} ago"
    return f"{max(int(seconds), 0)}s ago"


def human_bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count} B"


def adm_node_prune(args: argparse.Namespace) -> int:
    _, pb, _ = grpc_modules()
    seconds = parse_duration(args.idle_for, "--idle-for", error=UsageError)
    response = admin_rpc(args, "PruneNodes", pb.PruneNodesRequest(idleForSeconds=seconds, dryRun=args.dry_run))
    tokens = list(response.nodeTokens)
    verb = "would remove" if args.dry_run else "removed"
    text = f"{verb} {len(tokens)} node(s) idle for over {args.idle_for}" + "".join(f"\n  {t}" for t in tokens)
    show(args, {"nodeTokens": tokens, "dryRun": args.dry_run}, text)
    return 0


def adm_network_create(args: argparse.Namespace) -> int:
    _, pb, _ = grpc_modules()
    request = pb.CreateNetworkRequest(
        name=args.name, cidr=args.cidr, noInterconnection=args.no_interconnection, allowPublic=args.allow_public
    )
    response = admin_rpc(args, "CreateNetwork", request)
    show(args, message_json(response.network), response.network.netToken)
    return 0


def adm_network_list(args: argparse.Namespace) -> int:
    _, pb, _ = grpc_modules()
    response = admin_rpc(args, "ListNetworks", pb.ListNetworksRequest())
    rows = [
        [
            n.name,
            n.cidr,
            n.serverIp,
            "yes" if n.interconnection else "no",
            str(n.nodes),
            "config" if n.fromConfig else "runtime",
            n.netToken,
        ]
        for n in response.networks
    ]
    table = Table(["NAME", "CIDR", "SERVER-IP", "INTERCONNECTION", "NODES", "DEFINED-IN", "NET-TOKEN"], rows)
    show(args, [message_json(n) for n in response.networks], table)
    return 0


def adm_network_delete(args: argparse.Namespace) -> int:
    _, pb, _ = grpc_modules()
    response = admin_rpc(args, "DeleteNetwork", pb.DeleteNetworkRequest(name=args.name, force=args.force))
    removed = f"; unregistered {len(response.unregistered)} node(s)" if response.unregistered else ""
    document = {"name": args.name, "deleted": True, "unregistered": list(response.unregistered)}
    show(args, document, f"deleted network {args.name}{removed}")
    return 0


def adm_node_state(args: argparse.Namespace) -> int:
    _, pb, _ = grpc_modules()
    token = node_token_of(args, args.node_token)
    response = control_rpc(args, "CheckConnState", pb.CheckConnStateRequest(token=token))
    state = f"{STATE_NAMES.get(response.connState, '?')} ({response.connState})"
    text = f"{loggable(token)}  bind-ip {response.bindIp or '-'}  state {state}"
    show(args, {"nodeToken": token, **message_json(response)}, text)
    return 0


def adm_node_unregister(args: argparse.Namespace) -> int:
    _, pb, _ = grpc_modules()
    token = node_token_of(args, args.node_token)
    response = control_rpc(args, "UnRegister", pb.UnRegisterRequest(token=token))
    show(args, {"nodeToken": token, **message_json(response)}, f"unregistered {loggable(token)}")
    return 0


def adm_node_rename(args: argparse.Namespace) -> int:
    _, pb, _ = grpc_modules()
    token = node_token_of(args, args.node)
    response = admin_rpc(args, "RenameNode", pb.RenameNodeRequest(nodeToken=token, name=args.new_name))
    show(args, {"nodeToken": token, "name": response.name}, f"node {token} is now named {response.name}")
    return 0


def node_token_of(args: argparse.Namespace, ref: str) -> str:
    """A node-token as given, or the token of the node named ref (a name never reads as a
    token: check_node_name). One name in several networks: ask for the token."""
    if valid_node_token(ref):
        return ref
    _, pb, _ = grpc_modules()
    named = [n for n in admin_rpc(args, "ListNodes", pb.ListNodesRequest()).nodes if n.name == ref]
    if not named:
        raise UsageError(f"no node-token or node name {loggable(ref)!r}; `nc adm node list` shows both")
    if len(named) > 1:
        networks = ", ".join(n.network for n in named)
        raise UsageError(f"{ref!r} names a node in each of the networks {networks}; give its node-token")
    return named[0].nodeToken


def adm_ca_status(args: argparse.Namespace) -> int:
    """Expiry of the CAs, the server certificates and the admin identity, read from
    the server's files (this runs on the server host)."""
    config: ServerConfig = load_config(args.config, "server")
    paths = {
        "gRPC CA": Path(config.grpc_cert_dir) / "ca.crt",
        "network CA": Path(config.network_cert_dir) / "ca.crt",
        "gRPC server": Path(config.grpc_cert_dir) / "server.crt",
        "network server": Path(config.network_cert_dir) / "server.crt",
        "admin identity": config.admin_dir / "client.crt",
    }
    if not paths["gRPC CA"].exists():
        raise UsageError(f"{paths['gRPC CA']}: no such file; run on the server host (as root) or pass --config")
    now = utc_now()
    rows = []
    for name, path in paths.items():
        try:
            cert = load_cert_file(path)
        except PkiError as e:
            raise UsageError(str(e)) from None
        left = cert.not_valid_after_utc - now
        rows.append(
            {
                "name": name,
                "path": str(path),
                "notAfter": cert.not_valid_after_utc.isoformat(),
                "daysLeft": round(left.total_seconds() / 86400, 1),
                "expired": left.total_seconds() <= 0,
            }
        )
    table = Table(
        ["CERTIFICATE", "EXPIRES (UTC)", "LEFT"],
        [[r["name"], r["notAfter"], "EXPIRED" if r["expired"] else f"{r['daysLeft']} days"] for r in rows],
    )
    renewal = f"node certificates live {format_duration(config.node_cert_life)}; renewed at two thirds of it"
    show(args, rows, "\n".join([*table.lines(), renewal]))
    return 1 if any(r["expired"] for r in rows) else 0


def adm_health(args: argparse.Namespace) -> int:
    """Readiness (the default, --ready): every port answers, the control port through the
    admin identity the store confirms, so a replica that cannot reach etcd is not ready.
    Liveness (--live): the process works (the bootstrap port and the data port answer,
    the data plane or the standby's port runs) without asking the store: an etcd outage
    makes no replica look dead to a probe that would restart it."""
    _, pb, pb_grpc = grpc_modules()
    target = admin_target(args)
    results: dict[str, str] = {}
    with AdminClient(target) as client:
        if not args.live:
            try:
                results["control"] = check_code(client.control("HealthCheck", pb.HealthCheckRequest())).code
            except NcError as e:
                results["control"] = str(e)
        try:
            with secure_channel(target.bootstrap_address, client.ca) as channel:
                response = call(
                    channel,
                    pb_grpc.LiteKubeNCBootstrapServiceStub,
                    "HealthCheck",
                    pb.HealthCheckRequest(),
                    target.bootstrap_address,
                )
            results["bootstrap"] = check_code(response).code
        except NcError as e:
            results["bootstrap"] = str(e)
    results["data"] = probe_data_port(target.data_address)
    ready = all(v == CODE_OK for v in results.values())
    live = results["bootstrap"] == CODE_OK and results["data"] in (CODE_OK, DATA_PORT_REFUSING)
    healthy = live if args.live else ready
    addresses = {
        "control": target.address,
        "bootstrap": target.bootstrap_address,
        "data": host_port(*target.data_address),
    }
    document = {
        "healthy": healthy,
        "live": live,
        **({} if args.live else {"ready": ready}),
        **{k: {"address": addresses[k], "ok": v == CODE_OK, "detail": v} for k, v in results.items()},
    }
    lines = [f"{name:9} {addresses[name]:21} {'ok' if v == CODE_OK else 'FAILED: ' + v}" for name, v in results.items()]
    show(args, document, "\n".join(lines))
    return 0 if healthy else 1


DATA_PORT_REFUSING = "the data port resets new connections (out of file descriptors, or flooded); see the server log"


def probe_data_port(address: tuple[str, int]) -> str:
    """The data port accepts connections (its TLS needs a node's certificate, which the
    admin has not; whether the packet loop turns, the control HealthCheck says). One
    that resets them is alive but full: not ready, still live."""
    try:
        with socket.create_connection(address, timeout=RPC_TIMEOUT_S):
            return CODE_OK
    except ConnectionResetError:
        return DATA_PORT_REFUSING
    except OSError as e:
        return f"cannot connect to the data port {host_port(*address)}: {e.strerror or e}"


BACKUP_FORMAT = "nc-backup"


BACKUP_VERSION = 1  # a newer nc reads every older version; an older one refuses a newer file


BACKUP_MANIFEST = "manifest.json"


SQLITE_MAGIC = b"SQLite format 3\x00"  # an older nc's backup: the database alone


def pki_files(config: ServerConfig) -> dict[str, Path]:
    """The PKI a backup holds, by its name in the file: both CAs with their keys, the
    server certificates and the admin identity."""
    files = {}
    for kind, folder in (("grpc", Path(config.grpc_cert_dir)), ("network", Path(config.network_cert_dir))):
        for name in ("ca.crt", "ca.key", "server.crt", "server.key"):
            files[f"pki/{kind}/{name}"] = folder / name
    for name in ("client.crt", "client.key", "ca.crt"):
        files[f"pki/admin/{name}"] = config.admin_dir / name
    return files


def pki_file_mode(name: str) -> int:
    """The mode the server gives each file: keys and the admin identity private, the rest public."""
    return 0o600 if name.endswith(".key") or name.startswith("pki/admin/client") else 0o644


def adm_backup(args: argparse.Namespace) -> int:
    """Write one file (mode 0600: it holds the CA keys) that recovers the server's host: a
    consistent copy of the store (sqlite's online backup; on etcd, nc's keys at one
    revision with the sealed PKI), the PKI (CAs, server certificates, admin identity) and
    the server.yml given by --config. Safe while the server runs."""
    config: ServerConfig = load_config(args.config, "server")
    out = Path(backup_path_arg(args)).resolve()
    if out.exists() and not args.force:
        raise UsageError(f"{out} exists; pass --force to overwrite it, or choose another file")
    members = {**store_members(config), **host_members(args.config, config)}
    store = "etcd" if config.datastore_endpoint else "sqlite"
    manifest = {"format": BACKUP_FORMAT, "version": BACKUP_VERSION, "nc": VERSION, "store": store}
    members[BACKUP_MANIFEST] = json.dumps({**manifest, "created": utc_now().isoformat(timespec="seconds")}).encode()
    write_backup(out, members, args.force)
    pki = sum(name.startswith("pki/") for name in members)
    config_note = " and server.yml" if "server.yml" in members else ""
    document = {"file": str(out), "store": store, "contents": sorted(members)}
    show(args, document, f"{out}: the {store} store, {pki} PKI files{config_note}")
    return 0


def backup_path_arg(args: argparse.Namespace) -> str:
    """The file a backup or restore names: positional, or the older --out / --from."""
    path = args.file or getattr(args, "out", None) or getattr(args, "source", None)
    if not path:
        raise UsageError(f"name the backup file: nc adm {args.adm_command} FILE")
    return path


def store_members(config: ServerConfig) -> dict[str, bytes]:
    if config.datastore_endpoint:
        etcd = Etcd(
            config.datastore_endpoint,
            EtcdTls(config.datastore_ca_file, config.datastore_cert_file, config.datastore_key_file),
        )
        try:
            pairs = etcd_snapshot(etcd)
        finally:
            etcd.close()
        encoded = [[base64.b64encode(k).decode(), base64.b64encode(v).decode()] for k, v in pairs]
        return {"etcd.json": json.dumps(encoded).encode()}
    folder = Path(config.db_path).parent
    tmp = folder / f".nc-backup.{os.getpid()}.db"
    try:
        backup_database(config.db_path, tmp)
        return {"nc.db": tmp.read_bytes()}
    finally:
        tmp.unlink(missing_ok=True)


def host_members(config_path: str | None, config: ServerConfig) -> dict[str, bytes]:
    members = {name: path.read_bytes() for name, path in pki_files(config).items() if path.exists()}
    if "pki/grpc/ca.key" not in members:
        raise UsageError(f"{config.grpc_cert_dir}: no CA there; run on the server host (as root) or pass --config")
    if config_path is not None:
        members["server.yml"] = Path(config_path).read_bytes()
    return members


def write_backup(out: Path, members: dict[str, bytes], replace: bool) -> None:
    """A gzip'd tar of members, written beside out and then linked (or, with replace,
    renamed) into place: out is whole or untouched, and never overwritten by accident."""
    import tarfile

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            with tarfile.open(fileobj=handle, mode="w:gz") as archive:
                for name, data in sorted(members.items()):
                    info = tarfile.TarInfo(name)
                    info.size, info.mode, info.mtime = len(data), 0o600, int(time.time())
                    archive.addfile(info, io.BytesIO(data))
            handle.flush()
            os.fsync(handle.fileno())
        if replace:
            os.replace(tmp, out)
        else:
            os.link(tmp, out)  # fails if out appeared meanwhile
    except FileExistsError:
        raise UsageError(f"{out} exists; pass --force to overwrite it, or choose another file") from None
    except OSError as e:
        raise StoreError(os_error_line(e, "choose a backup file in a writable directory with free space")) from None
    finally:
        tmp.unlink(missing_ok=True)


def read_backup(source: Path) -> dict[str, bytes]:
    """The members of a backup file, only those nc writes (no path of the file's choosing
    is ever used); an older nc's backup (the database alone) as its nc.db."""
    import tarfile
    import zlib

    try:
        data = source.read_bytes()
    except FileNotFoundError:
        raise StoreError(f"{source}: no such backup file") from None
    if data.startswith(SQLITE_MAGIC):
        return {"nc.db": data}
    known = {BACKUP_MANIFEST, "nc.db", "etcd.json", "server.yml", *pki_files(ServerConfig().resolve())}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
            members = {
                m.name: archive.extractfile(m).read() for m in archive.getmembers() if m.isfile() and m.name in known
            }
        manifest = json.loads(members[BACKUP_MANIFEST])
    except (tarfile.TarError, EOFError, zlib.error, OSError, KeyError, ValueError):
        raise StoreError(
            f"{source}: not a backup nc wrote (or a damaged one); pick a file `nc adm backup` wrote"
        ) from None
    if manifest.get("format") != BACKUP_FORMAT or not isinstance(manifest.get("version"), int):
        raise StoreError(f"{source}: not a backup nc wrote; pick a file `nc adm backup` wrote")
    if manifest["version"] > BACKUP_VERSION:
        raise StoreError(f"{source}: written by a newer nc ({manifest.get('nc')}); restore it with that version")
    return members


def adm_restore(args: argparse.Namespace) -> int:
    """Put a backup in place, the server stopped (its workDir lock free): the store, the
    PKI and, where --config names no file yet, the server.yml it holds. On a fresh host
    every node comes back with its address and certificates, without joining again."""
    source = Path(backup_path_arg(args)).resolve()
    members = read_backup(source)
    config_path, wrote_config = restore_config(args.config, members, source)
    config: ServerConfig = load_config(config_path, "server")
    with work_dir_lock(Path(config.work_dir)):
        refuse_another_ca(config, members, args.force)
        restored = restore_store(config, members, source)
        pki = pki_files(config)
        for name, path in pki.items():
            if name in members:
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                write_private(path, members[name], pki_file_mode(name))
    lines = [f"restored {restored} from {source}"]
    lines += [f"wrote {config_path} (the backup's server.yml)"] if wrote_config else []
    lines += [f"restored {sum(n in members for n in pki)} PKI files under {config.tls_dir}"]
    lines += [f"start the server: nc server{f' --config {config_path}' if config_path else ''}"]
    show(
        args,
        {"file": str(source), "store": restored, "config": config_path, "wroteConfig": wrote_config},
        "\n".join(lines),
    )
    return 0


def restore_config(config_path: str | None, members: dict[str, bytes], source: Path) -> tuple[str | None, bool]:
    """The server.yml to restore into: --config's (written from the backup when absent)."""
    if config_path is None:
        if "server.yml" in members:
            raise UsageError(
                f"{source} holds the server's server.yml: pass --config PATH (written there when no file is, "
                "else that file is used)"
            )
        return None, False
    path = Path(config_path)
    if path.exists() or "server.yml" not in members:
        return config_path, False
    write_private(path, members["server.yml"])  # it may hold the clusterToken
    return config_path, True


def refuse_another_ca(config: ServerConfig, members: dict[str, bytes], force: bool) -> None:
    """A restore over a host whose CA differs would lock out every node of that CA: only with --force."""
    if force:
        return
    for name, path in pki_files(config).items():
        if name.endswith("/ca.crt") and name in members and path.exists() and path.read_bytes() != members[name]:
            raise UsageError(
                f"{path} holds another CA than the backup; restoring replaces it and nodes admitted by it "
                "must join again: pass --force if that is what you want"
            )


def restore_store(config: ServerConfig, members: dict[str, bytes], source: Path) -> str:
    """The store of the backup into the store config names; returns what it restored."""
    if "etcd.json" in members:
        if not config.datastore_endpoint:
            raise UsageError(
                f"{source} is of replicas on etcd; pass a server.yml whose datastoreEndpoint names an empty etcd"
            )
        pairs = [(base64.b64decode(k), base64.b64decode(v)) for k, v in json.loads(members["etcd.json"])]
        tls = EtcdTls(config.datastore_ca_file, config.datastore_cert_file, config.datastore_key_file)
        etcd = Etcd(config.datastore_endpoint, tls)
        try:
            count = etcd_load(etcd, pairs)
        finally:
            etcd.close()
        return f"{count} keys into etcd at {config.datastore_endpoint}"
    if config.datastore_endpoint:
        raise UsageError(
            f"{source} holds a single server's sqlite store; restore it without datastoreEndpoint, then move it "
            "with `nc adm datastore migrate`"
        )
    if "nc.db" not in members:
        raise StoreError(f"{source}: holds no store; pick a file `nc adm backup` wrote")
    Path(config.db_path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = Path(config.db_path).with_name(f".nc-restore.{os.getpid()}.db")
    try:
        write_private(tmp, members["nc.db"])
        restore_database(tmp, config.db_path)
    finally:
        tmp.unlink(missing_ok=True)
    return config.db_path


def adm_replica_list(args: argparse.Namespace) -> int:
    """The replicas on the datastore: address, role and last heartbeat (read from etcd)."""
    config: ServerConfig = load_config(args.config, "server")
    if not config.datastore_endpoint:
        raise UsageError("this server has no replicas: server.datastoreEndpoint is empty (a single sqlite server)")
    tls = EtcdTls(config.datastore_ca_file, config.datastore_cert_file, config.datastore_key_file)
    etcd = Etcd(config.datastore_endpoint, tls)
    try:
        entries = replica_entries(etcd)
    finally:
        etcd.close()
    table = Table(["ADDRESS", "ROLE", "LAST HEARTBEAT"], [[e["address"], e["role"], e["heartbeat"]] for e in entries])
    show(args, entries, table)
    return 0


def adm_datastore_migrate(args: argparse.Namespace) -> int:
    """Move a stopped single server's store and PKI into etcd; its nodes keep their
    tokens, addresses and certificates, so none has to join again."""
    config: ServerConfig = load_config(args.config, "server")
    if config.datastore_endpoint:
        raise UsageError("this server already uses etcd (server.datastoreEndpoint); nothing to migrate")
    cluster_token = args.cluster_token or config.cluster_token
    if len(cluster_token) < MIN_CLUSTER_TOKEN_LEN:
        raise UsageError(
            f"pass --cluster-token with at least {MIN_CLUSTER_TOKEN_LEN} characters (the replicas' secret)"
        )
    with work_dir_lock(Path(config.work_dir)):
        if not Path(config.db_path).exists():
            raise StoreError(f"{config.db_path}: no database there; pass the server's --config")
        source = Store(config.db_path)
        target = EtcdStore(args.to, cluster_token)
        try:
            counts = target.import_store(source)
            share_pki(target.etcd, Pki(config), cluster_token)
        finally:
            source.close()
            target.close()
    print(", ".join(f"{n} {what}" for what, n in counts.items()) + f" moved to etcd at {args.to}")
    print(f"now set in server.yml: datastoreEndpoint: {args.to}  clusterToken: <the token you passed>")
    return 0


LOG_FORMAT = "%(asctime)s %(levelname)-7s %(threadName)s: %(message)s"


class BelowWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


def under_journald() -> bool:
    """stderr is connected to the journal (JOURNAL_STREAM names its device and inode)."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        info = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return f"{info.st_dev}:{info.st_ino}" == f"{device}:{inode}"


JOURNAL_PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class JournalFormatter(logging.Formatter):
    """The journal stamps each line itself and reads the priority from a <N> prefix."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(threadName)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record).replace("\n", "\n  ")  # a traceback stays one entry
        return f"<{JOURNAL_PRIORITIES.get(record.levelno, 6)}>{text}"


def setup_logging(mode: str | None, log_dir: str | None, debug: bool, quiet_stdout: bool = False) -> None:
    """stdout gets info lines, stderr warnings and errors, and with a log_dir a file
    `nc-<mode>.log` rotated at midnight (seven kept) always holds the latest lines."""
    logging.raiseExceptions = False  # a full disk must not print a traceback for every log line
    root = logging.getLogger("nc")
    root.handlers.clear()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.propagate = False
    formatter = logging.Formatter(LOG_FORMAT)
    if under_journald() and not quiet_stdout:
        journal = logging.StreamHandler(sys.stderr)  # one stream: each line once, in order
        journal.setFormatter(JournalFormatter())
        root.addHandler(journal)
        add_file_log(root, mode, log_dir, formatter)
        return
    errors = logging.StreamHandler(sys.stderr)
    errors.setLevel(logging.WARNING)
    errors.setFormatter(logging.Formatter("nc: %(levelname)s: %(message)s") if quiet_stdout else formatter)
    root.addHandler(errors)
    if not quiet_stdout:
        info = logging.StreamHandler(sys.stdout)
        info.addFilter(BelowWarning())
        info.setFormatter(formatter)
        root.addHandler(info)
    add_file_log(root, mode, log_dir, formatter)


class PrivateLogFile(logging.handlers.TimedRotatingFileHandler):
    """The log file, and each one rotation starts, 0640 whatever the umask: its lines
    name nodes and their addresses, for root and its group only."""

    def _open(self) -> Any:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, LOG_FILE_MODE)
        os.fchmod(fd, LOG_FILE_MODE)  # a file an older nc made wider
        return open(fd, self.mode, encoding=self.encoding, errors=self.errors)


LOG_FILE_MODE = 0o640


LOG_DIR_MODE = 0o750


def add_file_log(root: logging.Logger, mode: str | None, log_dir: str | None, formatter: logging.Formatter) -> None:
    if mode and log_dir:
        try:
            if not Path(log_dir).is_dir():  # one nc makes is its own; a directory given as logDir keeps its mode
                Path(log_dir).mkdir(parents=True, exist_ok=True)
                os.chmod(log_dir, LOG_DIR_MODE)
            handler = PrivateLogFile(Path(log_dir) / f"nc-{mode}.log", when="midnight", backupCount=7, encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"logDir {log_dir}: cannot write logs there ({e.strerror}); set {mode}.logDir") from None
        handler.setFormatter(formatter)
        root.addHandler(handler)


def cmd_server(args: argparse.Namespace) -> int:
    check_root("server")  # before the config and the log directory, which a user may not read
    config: ServerConfig = load_config(args.config, "server")
    setup_logging("server", config.log_dir, config.debug)
    return run_server(config, args.config)


def cmd_client(args: argparse.Namespace) -> int:
    if args.config and args.join:
        raise UsageError("use either --config (saved credentials) or --join (first start), not both")
    check_root("client")
    if args.join:
        work_dir = Path(args.work_dir or DEFAULT_CLIENT_WORK_DIR).resolve()
        setup_logging(None, None, False)
        timeout_s = parse_duration(args.join_timeout, "--join-timeout", shortest=0, error=UsageError)
        with work_dir_lock(work_dir, "client"):
            return join_and_run(args.join, work_dir, args.unsafe_skip_ca_pin, timeout_s, args.name or "")
    if args.config:
        config = load_config(args.config, "client")
    elif args.work_dir and (Path(args.work_dir) / "client.yml").exists():
        config = load_config(str(Path(args.work_dir) / "client.yml"), "client")
    else:
        raise UsageError("nc client needs --join '<join string>' on first start, or --config client.yml after")
    with work_dir_lock(Path(config.work_dir), "client"):
        return run_joined_client(config, args.config)


def join_and_run(
    join_string: str, work_dir: Path, unsafe_skip_ca_pin: bool = False, timeout_s: float = 0, name: str = ""
) -> int:
    """`nc client --join`: join unless the work dir already holds credentials, then run.
    Credentials of a node the server no longer knows (unregistered) are replaced by a
    join with this join string, so `--join NEW` after an unregister just works."""
    if not has_credentials(work_dir):
        if parse_join_string(join_string).pin is None and not unsafe_skip_ca_pin:
            raise UsageError(UNPINNED_JOIN)
        check_tun_device()  # the rest of what a node needs is checked by join(), before the token is spent
        check_interface_free()
        return run_joined_client(join(join_string, work_dir, unsafe_skip_ca_pin, timeout_s, name))
    log.info("%s already holds credentials; not joining again", work_dir)
    config = load_config(str(work_dir / "client.yml"), "client")
    try:
        return run_joined_client(config)
    except Refused as e:
        if e.code != "unregistered":
            raise
        log.warning("the server no longer knows node %s (unregistered); joining again with --join", config.token)
    return run_joined_client(join(join_string, work_dir, unsafe_skip_ca_pin, timeout_s, name or config.name))


def run_joined_client(config: ClientConfig, config_path: str | None = None) -> int:
    setup_logging("client", config.log_dir, config.debug)
    if not config.server_addr or not config.token:
        raise ConfigError("client config needs client.serverAddr and client.token; join first with --join")
    return run_client(config, config_path)


RTT_SOURCES = {"udp-echo": " (UDP keepalive echo)", "tcp-estimate": " (TCP estimate of the TLS channel)"}


def peer_lines(peers: list[dict[str, Any]]) -> str:
    """`nc status`'s peer table: each peer the server introduced, direct or relayed."""
    if not peers:
        return ""
    rows = [
        [
            peer.get("ip"),
            peer.get("path"),
            peer.get("endpoint") or "-",
            peer.get("lastHandshake") or "-",
            f"{human_bytes(peer.get('rxBytes', 0))} / {human_bytes(peer.get('txBytes', 0))}",
        ]
        for peer in peers
    ]
    table = Table(["PEER", "PATH", "ENDPOINT", "LAST HANDSHAKE", "RX / TX"], rows)  # escapes what peers wrote
    return "\n\npeers:\n" + "\n".join("  " + line for line in table.lines())


def cmd_status(args: argparse.Namespace) -> int:
    """The running client's state; exit 1 when it is not connected (scripts wait on it)."""
    work_dir = Path(args.work_dir or DEFAULT_CLIENT_WORK_DIR).resolve()
    status = ask_status(work_dir)
    rtt = status.get("rttMs")
    lines = [
        ("state", status.get("state", "?")),
        ("node", status.get("nodeToken", "")),
        ("overlay ip", status.get("overlayIp") or "-"),
        ("server", status.get("server", "")),
        ("transport", status.get("transport") or "-"),
        ("since", status.get("connectedSince") or "-"),
        ("round trip", f"{rtt} ms{RTT_SOURCES.get(status.get('rttSource', ''), '')}" if rtt is not None else "-"),
        ("rx / tx", f"{human_bytes(status.get('rxBytes', 0))} / {human_bytes(status.get('txBytes', 0))}"),
    ]
    if status.get("lastError"):
        lines.append(("last error", status["lastError"]))
    text = "\n".join(f"{name + ':':12} {loggable(value)}" for name, value in lines)
    show(args, status, text + peer_lines(status.get("peers") or []))
    return 0 if status.get("state") == "connected" else 1


def cmd_install_service(args: argparse.Namespace) -> int:
    """Copy this nc to SERVICE_EXECUTABLE and write a systemd unit that runs it with this
    config (or print both with --print)."""
    mode = args.mode
    default_config = Path(DEFAULT_CLIENT_WORK_DIR) / "client.yml" if mode == "client" else None
    config_path = Path(args.config).resolve() if args.config else default_config
    if config_path is not None and (problem := unit_path_problem("--config", str(config_path))):
        raise UsageError(problem)
    if config_path is not None and not config_path.exists() and not args.print:
        fix = "join first (nc client --join ...) or pass --config" if mode == "client" else "write it first"
        raise UsageError(f"{config_path}: no such file, so the service could not start; {fix} (--print shows the unit)")
    config = load_config(str(config_path), mode) if config_path and config_path.exists() else load_config(None, mode)
    if problem := unit_path_problem(f"{mode}.workDir", config.work_dir):
        raise UsageError(problem)
    problems = [
        f"{path}: the service's sandbox hides {hidden}, so it could not use {what}; "
        "move it (for example under /etc/nc or /var/lib) and run install-service again"
        for what, path in (("the config", config_path), ("its work dir", Path(config.work_dir)))
        if path is not None and (hidden := hidden_from_services(path))
    ]
    archive = running_archive()
    if archive is None:
        raise UsageError("install-service installs the nc file ./build.sh writes; run it from that file")
    interpreter, interpreter_warning = service_interpreter()
    unit = service_unit(mode, SERVICE_EXECUTABLE, config_path, config.work_dir, interpreter)
    root = Path(args.root).resolve() if args.root else Path("/")
    executable = root / SERVICE_EXECUTABLE.relative_to("/")
    unit_path = root / SYSTEMD_DIR.relative_to("/") / f"nc-{mode}.service"
    if args.print:
        copy = f"would copy {archive} to {executable}" if archive != executable.resolve() else f"runs {executable}"
        notes = [*problems, *([interpreter_warning] if interpreter_warning else [])]
        warnings = "".join(f"# warning: {note}\n" for note in notes)
        sys.stdout.write(f"# nc install-service {mode}: {copy} and write {unit_path}\n{warnings}{unit}")
        return 0
    if problems:
        raise UsageError(problems[0])
    if interpreter_warning:
        print(f"nc: warning: {interpreter_warning}", file=sys.stderr)
    if os.geteuid() != 0 and not args.root:
        raise NcError("installing a service needs root; run with sudo, or add --print to see what it would do")
    try:
        install_executable(archive, executable)
        unit_path.parent.mkdir(parents=True, exist_ok=True)
        unit_path.write_text(unit)
    except OSError as e:
        raise NcError(os_error_line(e, "is this a systemd host? add --print to see what it would write")) from None
    print(
        f"installed {executable} and wrote {unit_path}; now: systemctl daemon-reload && systemctl enable --now nc-{mode}"
    )
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    import platform
    from importlib import metadata

    print(f"nc {VERSION}")
    print(f"python {platform.python_version()} ({platform.python_implementation()}, {sys.executable})")
    libc = " ".join(platform.libc_ver()) or "unknown libc"
    print(f"platform {platform.machine()} {platform.system()}, {libc}")
    archive, extraction = running_archive(), shiv_extraction()
    if archive is None or extraction is None:
        print("packages from this Python's own site-packages (ncctl.py runs from source)")
    else:
        index = bundle_index(archive)
        carried = " ".join(sorted(index["sets"], key=lambda tag: int(tag[2:])))
        print(f"packages set {interpreter_tag()} in {extraction / interpreter_tag()}")
        print(f"file {archive}: CPython {index['pythons']} ({carried}) on {index['arch']}, glibc >= {index['glibc']}")
    for dist in (
        "grpcio",
        "grpcio-reflection",
        "grpcio-health-checking",
        "protobuf",
        "cryptography",
        "PyYAML",
        "prometheus-client",
    ):
        try:
            print(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            print(f"{dist} missing")
    return 0


EXIT_CODES_HELP = f"""exit codes:
  {EXIT_OK}    done (nc status: connected)
  {EXIT_FAILURE}    failed, may pass on its own: the server unreachable, a full disk (nc status: not connected)
  {EXIT_USAGE}    the command line or a config file is wrong: fix it first (the unit does not restart)
  {EXIT_REFUSED}    refused for good: the token is bad, used or expired, or the node was unregistered
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C)"""


class CommandLineRefused(SystemExit):
    """argparse refused the command line (exit 2): what it said, for a JSON error object."""

    def __init__(self, line: str) -> None:
        super().__init__(EXIT_USAGE)
        self.line = line


class CommandLine(argparse.ArgumentParser):
    """nc's argparse: a refused command line reads on stderr as argparse writes it, and
    main() also gets the line, to give it as a JSON error object under `-o json`."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self._print_message(f"{self.prog}: error: {message}\n", sys.stderr)
        raise CommandLineRefused(f"{self.prog}: {message}")


def asks_for_json(argv: list[str]) -> bool:
    """-o json anywhere on the command line, as argparse would read it."""
    pairs = zip(argv, argv[1:])
    return any(a in ("-o", "--output") and b == "json" for a, b in pairs) or bool(
        {"-ojson", "--output=json"} & set(argv)
    )


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLine(
        prog="nc",
        description="LiteKube network controller: a TLS overlay network with stable IPs and bootstrap tokens.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"nc {VERSION}", help="print nc's version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    add_server_and_client_commands(commands)
    add_adm_commands(commands)
    add_host_commands(commands)
    return parser


def add_server_and_client_commands(commands: Any) -> None:
    server = commands.add_parser(
        "server",
        help="run the cloud server (foreground)",
        description="Run the nc server in the foreground. Without --config it runs on the embedded defaults.",
    )
    server.add_argument("--config", metavar="FILE", help="server.yml (default: embedded defaults)")
    server.set_defaults(func=cmd_server)

    client = commands.add_parser(
        "client",
        help="run an edge node (foreground, reconnects forever)",
        description="Join the overlay and stay connected. First start: --join; later: --config.",
    )
    client.add_argument("--join", metavar="JOIN", help="join string from `nc adm token create` (first start)")
    client.add_argument(
        "--work-dir", metavar="DIR", help=f"where credentials and client.yml live (default {DEFAULT_CLIENT_WORK_DIR})"
    )
    client.add_argument("--config", metavar="FILE", help="client.yml written by a previous join")
    add_node_name_flag(client)
    client.add_argument(
        "--join-timeout",
        default=format_duration(DEFAULT_JOIN_TIMEOUT_S),
        metavar="DURATION",
        help="how long to keep trying a server that is down or not ready: 30s, 5m, 1h; 0s tries once (default 5m)",
    )
    add_unsafe_skip_ca_pin_flag(client)
    client.set_defaults(func=cmd_client)


def add_adm_commands(commands: Any) -> None:
    """`nc adm ...`: each group of subcommands, sharing the connection flags and -o."""
    adm = commands.add_parser(
        "adm",
        help="administer a server (tokens, nodes, health)",
        description="Administer an nc server. On the server host it needs no flags.",
    )
    add_admin_connection_flags(adm)
    adm_cmds = adm.add_subparsers(dest="adm_command", metavar="COMMAND", required=True)
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("-o", "--output", choices=["text", "json"], default=argparse.SUPPRESS, help="output format")
    add_adm_token_commands(adm_cmds, output)
    add_adm_network_commands(adm_cmds, output)
    add_adm_node_commands(adm_cmds, output)
    add_adm_server_commands(adm_cmds, output)
    add_adm_config_commands(adm_cmds)
    accept_flags_after_the_command(adm)


def add_adm_config_commands(adm_cmds: Any) -> None:
    config = adm_cmds.add_parser("config", help="config files: check")
    config_cmds = config.add_subparsers(dest="config_command", metavar="COMMAND", required=True)
    config_cmds.add_parser(
        "check",
        help="validate a server.yml or client.yml (--config) without starting anything",
        description=adm_config_check.__doc__,
    ).set_defaults(func=adm_config_check)


def accept_flags_after_the_command(adm: argparse.ArgumentParser) -> None:
    """`nc adm node list --config F` as well as `nc adm --config F node list`: each flag of
    `adm` itself also on every command under it, where it overrides only when given."""
    flags = [a for a in adm._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    for leaf in leaf_parsers(adm):
        for action in flags:
            if any(option in leaf._option_string_actions for option in action.option_strings):
                continue  # the command's own flag of that name (-o) wins
            copy = argparse.Action.__new__(type(action))
            copy.__dict__.update(action.__dict__, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
            leaf._add_action(copy)


def leaf_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parsers of every command under parser that has no subcommands (aliases once)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [parser]
    unique = {id(sub): sub for action in subs for sub in action.choices.values()}
    return [leaf for sub in unique.values() for leaf in leaf_parsers(sub)]


def add_adm_token_commands(adm_cmds: Any, output: argparse.ArgumentParser) -> None:
    """Bootstrap tokens, and joining with one (`adm join`, the original's get-token)."""
    token = adm_cmds.add_parser("token", help="bootstrap tokens: create, list, delete")
    token_cmds = token.add_subparsers(dest="token_command", metavar="COMMAND", required=True)
    create = token_cmds.add_parser("create", parents=[output], help="mint a bootstrap token and print its join string")
    add_token_create_flags(create)
    token_cmds.add_parser("list", parents=[output], help="list bootstrap tokens (ids only)").set_defaults(
        func=adm_token_list
    )
    delete = token_cmds.add_parser("delete", parents=[output], help="delete a bootstrap token")
    delete.add_argument("token_id", metavar="TOKEN-ID", help="token id (or the whole token)")
    delete.set_defaults(func=adm_token_delete)
    legacy_create = adm_cmds.add_parser("create-bootstrap-token", parents=[output], help="alias of `token create`")
    add_token_create_flags(legacy_create)

    join_cmd = adm_cmds.add_parser(
        "join", aliases=["get-token"], parents=[output], help="fetch and save node credentials only"
    )
    join_cmd.add_argument("join_string", metavar="JOIN", nargs="?", help="join string from `nc adm token create`")
    join_cmd.add_argument(
        "--bootstrap-token", metavar="T", help="the original's form: a token for --ip's bootstrap port"
    )
    join_cmd.add_argument("--network-certs-dir", metavar="DIR", help="also save the network credentials here (.pem)")
    join_cmd.add_argument("--grpc-certs-dir", metavar="DIR", help="also save the gRPC credentials here (.pem)")
    join_cmd.add_argument(
        "--work-dir",
        default=DEFAULT_CLIENT_WORK_DIR,
        metavar="DIR",
        help=f"where to save them (default {DEFAULT_CLIENT_WORK_DIR})",
    )
    add_unsafe_skip_ca_pin_flag(join_cmd)
    add_node_name_flag(join_cmd)
    join_cmd.set_defaults(func=adm_join)


def add_adm_network_commands(adm_cmds: Any, output: argparse.ArgumentParser) -> None:
    network = adm_cmds.add_parser("network", help="overlay networks: create, list, delete")
    network_cmds = network.add_subparsers(dest="network_command", metavar="COMMAND", required=True)
    create_net = network_cmds.add_parser(
        "create", parents=[output], help="add an isolated overlay network; prints its net-token"
    )
    create_net.add_argument("--name", required=True, help="network name (a-z, 0-9, '-')")
    create_net.add_argument(
        "--cidr", required=True, help="its address range, e.g. 10.2.0.1/24 (the server takes the first host)"
    )
    create_net.add_argument(
        "--no-interconnection", action="store_true", help="nodes reach the server only, not each other"
    )
    create_net.add_argument(
        "--allow-public", action="store_true", help="allow a public (not private, not CGNAT) address range"
    )
    create_net.set_defaults(func=adm_network_create)
    network_cmds.add_parser("list", parents=[output], help="list networks").set_defaults(func=adm_network_list)
    delete_net = network_cmds.add_parser("delete", parents=[output], help="delete a network created at run time")
    delete_net.add_argument("--name", required=True)
    delete_net.add_argument("--force", action="store_true", help="also unregister the network's nodes")
    delete_net.set_defaults(func=adm_network_delete)


def add_adm_node_commands(adm_cmds: Any, output: argparse.ArgumentParser) -> None:
    node = adm_cmds.add_parser("node", help="nodes: list, state, rename, unregister, prune")
    node_cmds = node.add_subparsers(dest="node_command", metavar="COMMAND", required=True)
    listing = node_cmds.add_parser("list", help="list registered nodes (-o wide: every column)")
    listing.add_argument("-o", "--output", choices=["text", "wide", "json"], default=argparse.SUPPRESS)
    listing.set_defaults(func=adm_node_list)
    rename = node_cmds.add_parser("rename", parents=[output], help="give a node another name")
    rename.add_argument("node", metavar="NODE", help="its node-token or its name")
    rename.add_argument("new_name", metavar="NAME", type=node_name_arg, help="a-z, 0-9, '-'; unique in its network")
    rename.set_defaults(func=adm_node_rename)
    prune = node_cmds.add_parser("prune", parents=[output], help="unregister nodes idle for longer than a duration")
    prune.add_argument("--idle-for", required=True, metavar="DURATION", help="30m, 12h, 30d: not connected that long")
    prune.add_argument("--dry-run", action="store_true", help="only list the nodes that would be removed")
    prune.set_defaults(func=adm_node_prune)
    for name, aliases, func, text in (
        ("state", ["check-conn-state"], adm_node_state, "one node's bind IP and connection state"),
        ("unregister", [], adm_node_unregister, "unregister a node: cut it off and free its address"),
    ):
        sub = node_cmds.add_parser(name, parents=[output], help=text)
        sub.add_argument("--node-token", required=True, metavar="NODE", help="its node-token or its name")
        sub.set_defaults(func=func)
        for alias in aliases + ([name] if name == "unregister" else []):
            legacy = adm_cmds.add_parser(alias, parents=[output], help=f"alias of `node {name}`")
            legacy.add_argument("--node-token", required=True, metavar="NODE", help="its node-token or its name")
            legacy.set_defaults(func=func)


def add_adm_server_commands(adm_cmds: Any, output: argparse.ArgumentParser) -> None:
    """The server itself: health, its CAs, its store (backup, restore, migrate) and replicas."""
    health = adm_cmds.add_parser(
        "health", aliases=["check-health"], parents=[output], help="check both gRPC ports and the data port"
    )
    probe = health.add_mutually_exclusive_group()
    probe.add_argument("--ready", action="store_true", help="can it take joins: every port, the store too (default)")
    probe.add_argument("--live", action="store_true", help="does the process work: no store asked (liveness probes)")
    health.set_defaults(func=adm_health)
    ca = adm_cmds.add_parser("ca", help="certificate authorities: status")
    ca_cmds = ca.add_subparsers(dest="ca_command", metavar="COMMAND", required=True)
    ca_cmds.add_parser(
        "status", parents=[output], help="expiry of the CAs, server certificates and admin identity"
    ).set_defaults(func=adm_ca_status)
    backup = adm_cmds.add_parser(
        "backup",
        parents=[output],
        help="one file with the store, the PKI and server.yml (safe while the server runs)",
        description=adm_backup.__doc__,
    )
    backup.add_argument("file", nargs="?", metavar="FILE", help="where to write it (mode 0600)")
    backup.add_argument("--out", metavar="FILE", help=argparse.SUPPRESS)  # the older spelling of FILE
    backup.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    backup.set_defaults(func=adm_backup)
    restore = adm_cmds.add_parser(
        "restore",
        parents=[output],
        help="bring a host back from a backup (server stopped)",
        description=adm_restore.__doc__,
    )
    restore.add_argument("file", nargs="?", metavar="FILE", help="a file `nc adm backup` wrote")
    restore.add_argument("--from", dest="source", metavar="FILE", help=argparse.SUPPRESS)  # the older spelling
    restore.add_argument("--force", action="store_true", help="replace a different CA already on this host")
    restore.set_defaults(func=adm_restore)
    replica = adm_cmds.add_parser("replica", help="server replicas on etcd")
    replica_cmds = replica.add_subparsers(dest="replica_command", metavar="COMMAND", required=True)
    replica_cmds.add_parser(
        "list", parents=[output], help="address, role and last heartbeat of every replica"
    ).set_defaults(func=adm_replica_list)
    datastore = adm_cmds.add_parser("datastore", help="the server's store")
    datastore_cmds = datastore.add_subparsers(dest="datastore_command", metavar="COMMAND", required=True)
    migrate = datastore_cmds.add_parser(
        "migrate", help="move a single server's store and PKI into etcd", description=adm_datastore_migrate.__doc__
    )
    migrate.add_argument("--to", required=True, metavar="ENDPOINTS", help="etcd URLs, comma-separated")
    migrate.add_argument("--cluster-token", default="", metavar="SECRET", help="the replicas' shared clusterToken")
    migrate.set_defaults(func=adm_datastore_migrate)


def add_host_commands(commands: Any) -> None:
    """What runs on the host itself: the client's status, the service unit, versions."""
    status = commands.add_parser(
        "status",
        help="ask the running client on this host how it is connected",
        description="State, overlay IP, server, transport, since when, round trip, traffic. Exit 1 when not connected.",
    )
    status.add_argument("--work-dir", metavar="DIR", help=f"the client's work dir (default {DEFAULT_CLIENT_WORK_DIR})")
    status.add_argument("-o", "--output", choices=["text", "json"], default="text", help="output format")
    status.set_defaults(func=cmd_status)

    service = commands.add_parser(
        "install-service",
        help="install this nc as a systemd service (server or client)",
        description=f"Copy this nc to {SERVICE_EXECUTABLE} and write /etc/systemd/system/nc-MODE.service "
        "(Type=notify, watchdog, restart on failure, reload by SIGHUP, hardened) that runs it; "
        "--print shows both without changing anything.",
    )
    service.add_argument("mode", choices=["server", "client"])
    service.add_argument("--config", metavar="FILE", help="server.yml / client.yml the service runs with")
    service.add_argument("--print", action="store_true", help="print what it would copy and write, change nothing")
    service.add_argument("--root", metavar="DIR", help="install under DIR instead of / (building an image)")
    service.set_defaults(func=cmd_install_service)
    commands.add_parser("version", help="versions of nc, Python and dependencies").set_defaults(func=cmd_version)


def add_admin_connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="the server's server.yml (default: embedded defaults)")
    parser.add_argument("--server", metavar="HOST:PORT", help="control service address (default 127.0.0.1:<grpcPort>)")
    parser.add_argument(
        "--bootstrap-port",
        "--bootport",
        type=int,
        metavar="PORT",
        help="bootstrap port for `health` (default <bootstrapPort>)",
    )
    parser.add_argument("--ip", metavar="HOST", help="the server's address, as the original ncadm takes it")
    parser.add_argument("--port", type=int, metavar="PORT", help="its control port, as the original takes it")
    parser.add_argument("--ca", "--cacert", metavar="FILE", help="gRPC CA certificate (default <tlsDir>/admin/ca.crt)")
    parser.add_argument("--cert", metavar="FILE", help="admin client certificate (default <tlsDir>/admin/client.crt)")
    parser.add_argument("--key", metavar="FILE", help="admin client key (default <tlsDir>/admin/client.key)")
    parser.add_argument("-o", "--output", choices=["text", "json"], default="text", help="output format")


def add_unsafe_skip_ca_pin_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--unsafe-skip-ca-pin",
        action="store_true",
        help="accept a join string without a CA pin: the server is NOT verified (trust on first use)",
    )


def add_node_name_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--name",
        type=node_name_arg,
        metavar="NAME",
        help="this node's name in `nc adm node list` (default: its host name; a name taken in its network gets -2, -3...)",
    )


def node_name_arg(text: str) -> str:
    try:
        check_node_name(text)
    except BadRequest as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_token_create_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--life",
        default=str(DEFAULT_TOKEN_LIFE_MIN),
        metavar="LIFE",
        help="minutes the token lives (not 0), or a duration like 12h or 30d; negative never expires (default 10)",
    )
    parser.add_argument(
        "--print-join-command",
        action="store_true",
        help="print the whole `nc client --join ...` command to run on the new node",
    )
    parser.add_argument("--single-use", action="store_true", help="consumed by its first join")
    parser.add_argument("--net", metavar="NAME", help="network the node joins (default: the default network)")
    parser.set_defaults(func=adm_token_create)


def main(argv: list[str] | None = None) -> int:
    try:
        use_bundled_set()
    except (NcError, OSError, KeyError, ValueError, EOFError) as e:  # a truncated or damaged file
        print(f"nc: error: cannot unpack the packages this nc carries: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # the scratch directory is gone already; the next start unpacks again
        return EXIT_INTERRUPTED
    name_process()
    tidy_shiv_root()
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
    except CommandLineRefused as e:  # argparse said why on stderr; a script reading JSON sees it too
        if asks_for_json(argv):
            print(json.dumps({"error": one_line(e.line), "code": EXIT_USAGE}))
        return EXIT_USAGE
    if args.command in ("server", "client"):
        reload_once_running(args.command)
    if args.command == "adm":
        setup_logging(None, None, False, quiet_stdout=True)
    try:
        return args.func(args)
    except NcError as e:
        return fail(args, one_line(str(e)), e.exit_code)  # one line, whatever a library put into it
    except ImportError as e:  # grpcio, PyYAML, cryptography are imported lazily, when first needed
        return fail(
            args,
            f"cannot load {e.name or 'a bundled library'} on Python {sys.version.split()[0]} ({e}); "
            "copy this nc again, or rebuild it with ./build.sh",
            1,
        )
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 1
    except OSError as e:  # a file nc needs: missing, read-only, or on a full disk
        return fail(args, os_error_line(e, "check the path and the free space there"), 1)


def fail(args: argparse.Namespace, line: str, code: int) -> int:
    """A failed command: its one line on stderr and, under `-o json`, the same as a JSON
    object on stdout, so a script reading stdout sees an error, not an empty document."""
    print(f"nc: error: {line}", file=sys.stderr)
    if getattr(args, "output", "text") == "json":
        print(json.dumps({"error": line, "code": code}))
    return code


if __name__ == "__main__":
    sys.exit(main())
