"""DHCP lease hooks: dnsmasq's ``--dhcp-script`` and ISC Kea's run-script hook bind leases to subscribers.

``tollgate dhcp-hook dnsmasq ACTION MAC IP [HOSTNAME]`` is what dnsmasq runs (through a two-line wrapper,
since ``--dhcp-script`` takes no arguments of its own, see the README): ``add`` and ``old`` (every lease again
when dnsmasq starts) start or confirm the lease's session, ``del`` ends it. The lease's expiry comes from
``DNSMASQ_LEASE_EXPIRES`` (or ``DNSMASQ_LEASE_LENGTH``), its client id from ``DNSMASQ_CLIENT_ID``, the option
82 circuit id from ``DNSMASQ_CIRCUIT_ID``.

``tollgate dhcp-hook kea HOOK`` is what ``libdhcp_run_script.so`` runs, with ``LEASE4_*`` (and for
``leases4_committed``, ``LEASES4_AT<i>_*`` and ``DELETED_LEASES4_AT<i>_*``) in the environment:
``leases4_committed``, ``lease4_renew`` and ``lease4_recover`` start or confirm, ``lease4_release``,
``lease4_expire`` and ``lease4_decline`` end; ``lease4_select`` is not committed yet and changes nothing.
As a real Kea 2.2 runs it (tests/unit/test_dhcp_kea.py holds the environment it gave): a DHCPRELEASE is two
calls at once (``"sync": false`` runs them as two processes), ``lease4_release`` and ``leases4_committed`` with
the released lease in ``DELETED_LEASES4_AT0_*``: both end the session, the second finds it ended and writes
nothing; a client that sends no client id gets ``CLIENT_ID`` set and empty.

Which subscriber: the first of ``--by`` (default ``mac``; also ``client_id``, ``circuit_id``) that the lease has
and that a binding in the ledger names (``tollgate binding add alice --mac 52:54:00:12:34:56``). A lease that no
binding names changes nothing (exit 0; the address stays nobody's). The session is (``dnsmasq`` or ``kea``,
``--server``, the lease's MAC, or its client id without one); it expires ``[sessions] dhcp_grace`` seconds after
the lease, should the ``del`` never come. Each call also closes the sessions whose expiry passed.

Exit codes: 0 done (or nothing to do), 1 the ledger refused (the address is someone else's; the reason on
stderr), 2 garbage arguments or environment (the reason on stderr, nothing written).
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
import time

from accounting.operations import OperationError, Operations

NS = 1_000_000_000
DNSMASQ_ACTIONS = ("add", "old", "del")
DNSMASQ_IGNORED = ("init", "tftp", "arp", "arp-add", "arp-del", "relay-snoop")
KEA_START = ("leases4_committed", "lease4_renew", "lease4_recover")
KEA_STOP = ("lease4_release", "lease4_expire", "lease4_decline")
KEA_IGNORED = ("lease4_select", "pkt4_receive", "pkt4_send", "subnet4_select", "lease6_select")


class HookError(ValueError):
    """Garbage in: the message says what; nothing was written."""


def _address(text: str, what: str = "IP") -> str:
    try:
        ip = ipaddress.ip_address(str(text).strip())
    except ValueError:
        raise HookError(f"{what} {text!r} is not an IP address") from None
    return f"{ip}/{ip.max_prefixlen}"


def _int_env(env: dict, name: str) -> int | None:
    value = env.get(name)
    if value in (None, ""):
        return None
    if not re.fullmatch(r"\d{1,19}", value.strip()):
        raise HookError(f"{name}={value!r} is not a whole number")
    return int(value)


class Lease:
    """One lease as a hook call gives it."""

    def __init__(self, network: str, mac: str | None, client_id: str | None, circuit_id: str | None,
                 expires_ns: int | None) -> None:
        self.network, self.mac, self.client_id, self.circuit_id = network, mac, client_id, circuit_id
        self.expires_ns = expires_ns

    @property
    def key(self) -> str:
        return self.mac or f"client-id:{self.client_id}"


def _mac(text: str | None, what: str) -> str | None:
    if text in (None, ""):
        return None
    t = text.strip()
    if re.fullmatch(r"[0-9A-Fa-f]{1,2}-([0-9A-Fa-f]{2}:){5}[0-9A-Fa-f]{2}", t):  # dnsmasq's "type-mac" (1- Ethernet)
        t = t.split("-", 1)[1]
    try:
        return Operations.mac(t)
    except OperationError:
        raise HookError(f"{what} {text!r} is not a MAC address") from None


def _ident(text: str | None) -> str | None:
    if text in (None, "", "*"):
        return None
    t = text.strip().lower()
    if len(t) > 253 or not re.fullmatch(r"[\x21-\x7e]+", t):
        raise HookError(f"identifier {text!r} is not printable text of 1 to 253 characters")
    return t


def dnsmasq_lease(argv: list[str], env: dict) -> tuple[str, Lease | None]:
    """``(action, lease)`` of a dnsmasq script call; lease None for the actions we do not act on."""
    if not argv:
        raise HookError("dnsmasq gives an action (add, old, del) first")
    action = argv[0]
    if action in DNSMASQ_IGNORED:
        return action, None
    if action not in DNSMASQ_ACTIONS:
        raise HookError(f"unknown dnsmasq action {action!r} (add, old, del)")
    if len(argv) not in (3, 4):
        raise HookError(f"dnsmasq {action} takes MAC IP [HOSTNAME], not {len(argv) - 1} arguments")
    network = _address(argv[2])
    if network.endswith("/128"):  # DHCPv6: the second argument is the DUID, the MAC (if known) is in the env
        mac = _mac(env.get("DNSMASQ_MAC"), "DNSMASQ_MAC")
        client_id = _ident(argv[1])
    else:
        mac = _mac(argv[1], "MAC")
        client_id = _ident(env.get("DNSMASQ_CLIENT_ID"))
    expires = _int_env(env, "DNSMASQ_LEASE_EXPIRES")
    length = _int_env(env, "DNSMASQ_LEASE_LENGTH")
    if expires is not None:
        expires_ns = expires * NS if expires else None  # 0: an infinite lease
    elif length is not None:
        expires_ns = time.time_ns() + length * NS
    else:
        expires_ns = None
    lease = Lease(network, mac, client_id, _ident(env.get("DNSMASQ_CIRCUIT_ID")), expires_ns)
    if lease.mac is None and lease.client_id is None:
        raise HookError("the lease has neither a MAC nor a client id")
    return action, lease


def kea_leases(argv: list[str], env: dict) -> tuple[str, list[Lease], list[Lease]]:
    """``(hook, leases to start, leases to end)`` of a Kea run_script call."""
    if len(argv) != 1:
        raise HookError(f"Kea's run_script gives one argument, the hook point, not {len(argv)}")
    hook = argv[0]
    if hook in KEA_IGNORED:
        return hook, [], []
    if hook not in KEA_START + KEA_STOP:
        raise HookError(f"unknown Kea hook point {hook!r} ({', '.join(KEA_START + KEA_STOP)})")
    circuit = _ident(env.get("QUERY4_OPTION_82_SUB_OPTION_1"))

    def lease(prefix: str) -> Lease:
        if f"{prefix}_ADDRESS" not in env:
            raise HookError(f"{prefix}_ADDRESS is not in the environment")
        network = _address(env[f"{prefix}_ADDRESS"], f"{prefix}_ADDRESS")
        cltt, valid = _int_env(env, f"{prefix}_CLTT"), _int_env(env, f"{prefix}_VALID_LIFETIME")
        expires = None
        if valid is not None and valid != 0xFFFFFFFF:
            expires = ((cltt if cltt else time.time_ns() // NS) + valid) * NS
        hw = env.get(f"{prefix}_HWADDR") or None
        got = Lease(network, _mac(hw, f"{prefix}_HWADDR") if hw else None,
                    _ident(env.get(f"{prefix}_CLIENT_ID")), circuit, expires)
        if got.mac is None and got.client_id is None:
            raise HookError(f"{prefix}: the lease has neither a hardware address nor a client id")
        return got

    def many(base: str) -> list[Lease]:
        n = _int_env(env, f"{base}_SIZE") or 0
        if n > 1000:
            raise HookError(f"{base}_SIZE={n}: more leases than one packet holds")
        return [lease(f"{base}_AT{i}") for i in range(n)]

    if hook == "leases4_committed":
        return hook, many("LEASES4"), many("DELETED_LEASES4")
    if hook in KEA_START:
        return hook, [lease("LEASE4")], []
    return hook, [], [lease("LEASE4")]


def _subscriber(ops: Operations, lease: Lease, by: tuple) -> int | None:
    for kind in by:
        value = getattr(lease, kind)
        if value is not None:
            sid = ops.binding_owner(kind, value)
            if sid is not None:
                return sid
    return None


def apply(ops: Operations, source: str, server: str, start: list[Lease], stop: list[Lease], by: tuple,
          grace_ns: int, out=sys.stderr) -> int:
    """Write what the leases say; returns the exit code."""
    code = 0
    for lease in stop:
        live = [r for r in ops.sessions(live=True, address=lease.network) if r["source"] == source and
                r["client"] == server and r["session_key"] == lease.key and r["network"] == lease.network]
        if live:
            ops.session_stop(source, server, lease.key, reason="released")
    for lease in start:
        sid = _subscriber(ops, lease, by)
        if sid is None:
            print(f"tollgate dhcp-hook: {lease.network} ({lease.key}): no binding names this lease; nothing "
                  "written", file=out)
            continue
        expires = None if lease.expires_ns is None else lease.expires_ns + grace_ns
        try:
            ops.session_start(source, server, lease.key, sid, [lease.network], mac=lease.mac, expires_ns=expires)
        except OperationError as exc:
            print(f"tollgate dhcp-hook: {lease.network} ({lease.key}): refused: {exc}", file=out)
            code = 1
    ops.expire_sessions()
    return code


def main(kind: str, argv: list[str], cfg, open_ledger, server: str | None, by: tuple, env=None) -> int:
    """``tollgate dhcp-hook dnsmasq|kea ...``; exit code as the module says. ``open_ledger()`` is called once
    the call is known to be good (garbage never opens, let alone creates, the ledger)."""
    from gateway.config import SessionSettings

    env = os.environ if env is None else env
    try:
        if kind == "dnsmasq":
            action, lease = dnsmasq_lease(argv, env)
            start = [lease] if lease is not None and action in ("add", "old") else []
            stop = [lease] if lease is not None and action == "del" else []
        else:
            _hook, start, stop = kea_leases(argv, env)
    except HookError as exc:
        print(f"tollgate dhcp-hook {kind}: error: {exc}; nothing written", file=sys.stderr)
        return 2
    if not start and not stop:
        return 0
    grace = (cfg.sessions or SessionSettings()).dhcp_grace * NS
    with open_ledger() as ledger:
        ops = Operations(ledger, cfg, f"dhcp:{kind}")
        return apply(ops, kind, server or kind, start, stop, by, grace)
