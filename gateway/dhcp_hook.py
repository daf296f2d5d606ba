"""DHCP lease hooks: dnsmasq's ``--dhcp-script`` and ISC Kea's run-script hook bind leases to subscribers.

``tollgate dhcp-hook dnsmasq ACTION MAC IP [HOSTNAME]`` is what dnsmasq runs (through a two-line wrapper,
since ``--dhcp-script`` takes no arguments of its own, see the README): ``add`` and ``old`` (every lease again
when dnsmasq starts) start or confirm the lease's session, ``del`` ends it. The lease's expiry comes from
``DNSMASQ_LEASE_EXPIRES`` (or ``DNSMASQ_LEASE_LENGTH``), its client id from ``DNSMASQ_CLIENT_ID``, the option
82 sub-options from ``DNSMASQ_CIRCUIT_ID`` and ``DNSMASQ_REMOTE_ID``.

``tollgate dhcp-hook kea HOOK`` is what ``libdhcp_run_script.so`` runs, with ``LEASE4_*`` / ``LEASE6_*`` (and for
``leases4_committed`` / ``leases6_committed``, ``LEASES4_AT<i>_*`` and ``DELETED_LEASES4_AT<i>_*``, or the same
with 6) in the environment: ``leases4_committed``, ``lease4_renew`` and ``lease4_recover`` start or confirm,
``lease4_release``, ``lease4_expire`` and ``lease4_decline`` end; the same for DHCPv6 with ``lease6_rebind`` as
one more start. ``lease4_select`` is not committed yet and changes nothing. As a real Kea 2.2 runs it
(tests/unit/test_dhcp_kea.py and test_dhcp_kea6.py hold the environments it gave): a release is *two* calls at
once (``"sync": false`` runs them as two processes), ``lease4_release`` and ``leases4_committed`` with the
released lease in ``DELETED_LEASES4_AT0_*`` (the same in v6): both end the session, the second finds it ended
and writes nothing; a client that sends no client id gets ``CLIENT_ID`` set and empty.

DHCPv6 (Kea): each lease is an IA_NA address (``LEASE6_TYPE=IA_NA``, ``LEASE6_PREFIX_LEN=128``) or an IA_PD
delegated prefix (``IA_PD``, ``LEASE6_ADDRESS`` the prefix, ``LEASE6_PREFIX_LEN`` its length, e.g. 56); its
client id is the DUID (``LEASE6_DUID``, hex with colons: DHCPv6's Client Identifier option carries the DUID,
RFC 8415 section 21.2), so ``tollgate binding add alice --client-id 00:03:00:01:52:54:00:12:34:56`` binds by
DUID; ``LEASE6_HWADDR`` is the MAC Kea found (by default from the DUID, the link-local address or the relay).
Each v6 lease is a session of its own, keyed by its network and DUID: a client's address and its prefix
come and go separately (a renumbered client holds the old and the new address until the old one's lifetime
ends), and a dual-stack client's v4 lease (keyed by MAC) never replaces its v6 ones.

Option 82 (RFC 3046, relayed DHCPv4): what the real servers pass differs (seen in the lab, tests/linux/
test_dhcp_relay_lab.py): Kea 2.2 gives ``QUERY4_OPTION_82_SUB_OPTION_1`` (circuit-id) and ``..._2``
(remote-id) as ``0x`` and upper-case hex of the bytes (``0x657468302F31`` for "eth0/1"); dnsmasq 2.90 gives
``DNSMASQ_CIRCUIT_ID`` and ``DNSMASQ_REMOTE_ID`` as the raw bytes, cut at the first zero byte (a binary
circuit-id starting with a zero byte arrives as nothing). Both become one form, the binding's value: the
text, lower-cased, when every byte is printable ASCII (no leading or trailing space), else ``0x`` and
lower-case hex (``0x000400640107``). ``[sessions] dhcp_circuit_id`` says what a lease's ``circuit_id`` is:
the circuit-id (default), the remote-id, or both as ``remote-id|circuit-id``.

Which subscriber: the first of ``--by`` (default ``mac``; also ``client_id``, ``circuit_id``) that the lease has
and that a binding in the ledger names (``tollgate binding add alice --mac 52:54:00:12:34:56``). A lease that no
binding names changes nothing (exit 0; the address stays nobody's). The session is (``dnsmasq`` or ``kea``,
``--server``, the lease's MAC, or its client id without one; a v6 lease as above); it expires ``[sessions]
dhcp_grace`` seconds after the lease, should the ``del`` never come. Each call also closes the sessions whose
expiry passed.

Exit codes: 0 done (or nothing to do), 1 the ledger refused (the address is someone else's; the reason on
stderr), 2 garbage arguments or environment (the reason on stderr, nothing written).
"""

from __future__ import annotations

import hashlib
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
KEA6_START = ("leases6_committed", "lease6_renew", "lease6_rebind", "lease6_recover")
KEA6_STOP = ("lease6_release", "lease6_expire", "lease6_decline")
KEA_IGNORED = ("lease4_select", "pkt4_receive", "pkt4_send", "subnet4_select", "lease6_select", "pkt6_receive",
               "pkt6_send", "subnet6_select")
KEA_HOOKS = KEA_START + KEA_STOP + KEA6_START + KEA6_STOP
IA_TYPES = ("IA_NA", "IA_TA", "IA_PD")
MAX_LEASES = 1000  # more leases than one packet holds: garbage
MOST = 253  # the longest binding value and session key the ledger takes


class HookError(ValueError):
    """Garbage in: the message says what; nothing was written."""


def _address(text: str, what: str = "IP", version: int | None = None) -> str:
    try:
        ip = ipaddress.ip_address(str(text).strip())
    except ValueError:
        raise HookError(f"{what} {text!r} is not an IP address") from None
    if version is not None and ip.version != version:
        raise HookError(f"{what} {text!r} is not an IPv{version} address")
    return f"{ip}/{ip.max_prefixlen}"


def _int_env(env: dict, name: str, most: int = 10**19 - 1) -> int | None:
    value = env.get(name)
    if value in (None, ""):
        return None
    if not re.fullmatch(r"[0-9]{1,19}", value.strip()) or int(value) > most:
        raise HookError(f"{name}={value!r} is not a whole number 0..{most}")
    return int(value)


class Lease:
    """One lease as a hook call gives it. ``key`` names its session: given (a v6 lease), else the MAC, else the
    client id."""

    def __init__(self, network: str, mac: str | None, client_id: str | None, circuit_id: str | None,
                 expires_ns: int | None, key: str | None = None, remote_id: str | None = None,
                 held: bool = True) -> None:
        self.network, self.mac, self.client_id, self.circuit_id = network, mac, client_id, circuit_id
        self.expires_ns, self.remote_id, self._key = expires_ns, remote_id, key
        # False: a lease Kea keeps in a state other than "default" (a declined address in probation): nobody's,
        # whatever session of this server held it ends
        self.held = held
        self.end_reason: str | None = None  # what ends its session, when not the hook's

    @property
    def key(self) -> str:
        return self._key or self.mac or f"client-id:{self.client_id}"


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
    if len(t) > MOST or not re.fullmatch(r"[\x21-\x7e]+", t):
        raise HookError(f"identifier {text!r} is not printable text of 1 to {MOST} characters")
    return t


def _duid(text: str | None, what: str) -> str | None:
    """A DUID as Kea gives it (hex bytes with colons), lower-cased; RFC 8415 section 11: 2 bytes of type and at
    most 128 of identifier."""
    if text in (None, "", "00"):  # "00": Kea's empty DUID (seen on a declined lease)
        return None
    t = text.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){2,129}", t):
        raise HookError(f"{what} {text!r} is not a DUID (3 to 130 bytes of hex with colons)")
    return t


def agent_id(raw: bytes | None) -> str | None:
    """One form for an option 82 sub-option whichever server passed it (the module docstring): printable ASCII
    as its lower-cased text, anything else as ``0x`` and lower-case hex; None for nothing, or for a value too
    long to be a binding's (what a relay may legally send, 255 bytes, but nobody could bind it)."""
    if not raw:
        return None
    if all(0x20 <= b <= 0x7e for b in raw) and raw.strip() == raw:
        text = raw.decode("ascii").lower()
    else:
        text = "0x" + raw.hex()
    return text if len(text) <= MOST else None


def kea_agent_id(env: dict, name: str) -> str | None:
    """Kea's ``QUERY4_OPTION_82_SUB_OPTION_<n>``: ``0x`` and hex (Kea 2.2 writes it upper-case)."""
    value = env.get(name)
    if value in (None, ""):
        return None
    m = re.fullmatch(r"0[xX]((?:[0-9A-Fa-f]{2}){1,255})", value.strip())
    if not m:
        raise HookError(f"{name}={value!r} is not Kea's form of an option (0x and hex)")
    return agent_id(bytes.fromhex(m.group(1)))


def _circuit(circuit: str | None, remote: str | None, settings) -> str | None:
    """The lease's ``circuit_id`` binding value as ``[sessions] dhcp_circuit_id`` says."""
    how = getattr(settings, "dhcp_circuit_id", "circuit-id")
    if how == "remote-id":
        return remote
    if how == "remote-id|circuit-id":
        both = f"{remote}|{circuit}" if remote and circuit else None
        return both if both and len(both) <= MOST else None
    return circuit


def _env_bytes(env: dict, name: str) -> bytes | None:
    """An environment value as the bytes the server set (os.environ decodes them with surrogateescape)."""
    value = env.get(name)
    if value is None:
        return None
    try:
        return os.fsencode(value)
    except UnicodeError:  # a str that did not come from the environment: its UTF-8
        return value.encode("utf-8", "surrogatepass")


def dnsmasq_lease(argv: list[str], env: dict, settings=None) -> tuple[str, Lease | None]:
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
    # dnsmasq passes option 82's sub-options as their raw bytes (cut at a zero byte): any value is one
    circuit = agent_id(_env_bytes(env, "DNSMASQ_CIRCUIT_ID"))
    remote = agent_id(_env_bytes(env, "DNSMASQ_REMOTE_ID"))
    lease = Lease(network, mac, client_id, _circuit(circuit, remote, settings), expires_ns, remote_id=remote)
    if lease.mac is None and lease.client_id is None:
        raise HookError("the lease has neither a MAC nor a client id")
    return action, lease


def _expiry(env: dict, prefix: str) -> int | None:
    cltt = _int_env(env, f"{prefix}_CLTT", 1 << 40)
    valid = _int_env(env, f"{prefix}_VALID_LIFETIME", 0xFFFFFFFF)
    if valid is None or valid == 0xFFFFFFFF:  # RFC 8415 / 2131: all ones is infinity
        return None
    return ((cltt if cltt else time.time_ns() // NS) + valid) * NS


def _key6(ia: str, network: str, duid: str | None) -> str:
    ident = duid or "-"
    key = f"{network} {ia.lower()} duid {ident}"
    if len(key) > MOST:  # a DUID of more than about 65 bytes: its digest names it as well
        key = f"{network} {ia.lower()} duid sha256:{hashlib.sha256(ident.encode()).hexdigest()[:32]}"
    return key


def _not_held(network: str, state: str) -> Lease:
    lease = Lease(network, None, None, None, None, held=False)
    lease.end_reason = {"declined": "declined", "expired-reclaimed": "expired"}.get(state, "released")
    return lease


def _state(env: dict, prefix: str) -> str:
    """Kea's lease state: "default" (held), "declined" (in probation after a DECLINE: Kea commits it with no
    hardware address, an empty DUID "00" and the probation period as its lifetime), "expired-reclaimed"."""
    state = (env.get(f"{prefix}_STATE") or "default").strip()
    if not re.fullmatch(r"[a-z][a-z-]{0,31}", state):
        raise HookError(f"{prefix}_STATE={env.get(f'{prefix}_STATE')!r} is not a lease state")
    return state


def _lease4(env: dict, prefix: str, circuit: str | None, remote: str | None) -> Lease:
    if f"{prefix}_ADDRESS" not in env:
        raise HookError(f"{prefix}_ADDRESS is not in the environment")
    network = _address(env[f"{prefix}_ADDRESS"], f"{prefix}_ADDRESS", 4)
    state = _state(env, prefix)
    if state != "default":
        return _not_held(network, state)
    hw = env.get(f"{prefix}_HWADDR") or None
    got = Lease(network, _mac(hw, f"{prefix}_HWADDR") if hw else None, _ident(env.get(f"{prefix}_CLIENT_ID")),
                circuit, _expiry(env, prefix), remote_id=remote)
    if got.mac is None and got.client_id is None:
        raise HookError(f"{prefix}: the lease has neither a hardware address nor a client id")
    return got


def _lease6(env: dict, prefix: str) -> Lease:
    """An IA_NA / IA_TA address (a /128) or an IA_PD delegated prefix, as Kea 2.2's run_script gives it."""
    if f"{prefix}_ADDRESS" not in env:
        raise HookError(f"{prefix}_ADDRESS is not in the environment")
    ia = (env.get(f"{prefix}_TYPE") or "").strip()
    if ia not in IA_TYPES:
        raise HookError(f"{prefix}_TYPE={env.get(f'{prefix}_TYPE')!r} is not one of {', '.join(IA_TYPES)}")
    address = _address(env[f"{prefix}_ADDRESS"], f"{prefix}_ADDRESS", 6).split("/")[0]
    length = _int_env(env, f"{prefix}_PREFIX_LEN", 128)
    if ia == "IA_PD":
        if length is None or not 1 <= length <= 128:
            raise HookError(f"{prefix}_PREFIX_LEN={env.get(f'{prefix}_PREFIX_LEN')!r}: a delegated prefix has a "
                            "length of 1..128")
    elif length not in (None, 128):
        raise HookError(f"{prefix}_PREFIX_LEN={length}: an {ia} address is a /128")
    try:
        network = str(ipaddress.IPv6Network(f"{address}/{length or 128}", strict=True))
    except ValueError:
        raise HookError(f"{prefix}: {address}/{length} has bits set past its prefix length") from None
    state = _state(env, prefix)
    if state != "default":
        return _not_held(network, state)
    duid = _duid(env.get(f"{prefix}_DUID"), f"{prefix}_DUID")
    _int_env(env, f"{prefix}_IAID", 0xFFFFFFFF)  # checked, not kept: the DUID and the network name the lease
    hw, hw_type = env.get(f"{prefix}_HWADDR") or None, (env.get(f"{prefix}_HWADDR_TYPE") or "1").strip()
    # Kea finds a v6 client's hardware address where it can (DUID, link-local, relay); only Ethernet's is a MAC
    mac = _mac(hw, f"{prefix}_HWADDR") if hw and hw_type == "1" else None
    got = Lease(network, mac, duid, None, _expiry(env, prefix), key=_key6(ia, network, duid))
    if got.mac is None and got.client_id is None:
        raise HookError(f"{prefix}: the lease has neither a DUID nor a hardware address")
    return got


def kea_leases(argv: list[str], env: dict, settings=None) -> tuple[str, list[Lease], list[Lease]]:
    """``(hook, leases to start, leases to end)`` of a Kea run_script call."""
    if len(argv) != 1:
        raise HookError(f"Kea's run_script gives one argument, the hook point, not {len(argv)}")
    hook = argv[0]
    if hook in KEA_IGNORED:
        return hook, [], []
    if hook not in KEA_HOOKS:
        raise HookError(f"unknown Kea hook point {hook!r} ({', '.join(KEA_HOOKS)})")
    v6 = "6" in hook
    if v6:
        def lease(prefix: str) -> Lease:
            return _lease6(env, prefix)
    else:
        circuit = kea_agent_id(env, "QUERY4_OPTION_82_SUB_OPTION_1")
        remote = kea_agent_id(env, "QUERY4_OPTION_82_SUB_OPTION_2")
        picked = _circuit(circuit, remote, settings)

        def lease(prefix: str) -> Lease:
            return _lease4(env, prefix, picked, remote)

    def many(base: str) -> list[Lease]:
        n = _int_env(env, f"{base}_SIZE", MAX_LEASES) or 0
        return [lease(f"{base}_AT{i}") for i in range(n)]

    one = "LEASE6" if v6 else "LEASE4"
    if hook in ("leases4_committed", "leases6_committed"):
        base = "LEASES6" if v6 else "LEASES4"
        committed = many(base)
        return hook, [x for x in committed if x.held], many(f"DELETED_{base}") + [x for x in committed if not x.held]
    if hook in KEA_START + KEA6_START:
        return hook, [lease(one)], []
    return hook, [], [lease(one)]


def _subscriber(ops: Operations, lease: Lease, by: tuple) -> int | None:
    for kind in by:
        value = getattr(lease, kind)
        if value is not None:
            sid = ops.binding_owner(kind, value)
            if sid is not None:
                return sid
    return None


def stop_reason(hook: str) -> str:
    """The end reason a session gets from a hook: Kea's expire and decline say so; the rest is a release (dnsmasq's
    del, Kea's release and the committed call that deletes the released lease)."""
    for what, reason in (("expire", "expired"), ("decline", "declined")):
        if hook.endswith(what):
            return reason
    return "released"


def apply(ops: Operations, source: str, server: str, start: list[Lease], stop: list[Lease], by: tuple,
          grace_ns: int, out=sys.stderr, reason: str = "released") -> int:
    """Write what the leases say; returns the exit code."""
    code = 0
    for lease in stop:
        live = [r for r in ops.sessions(live=True, address=lease.network) if r["source"] == source and
                r["client"] == server and r["network"] == lease.network and
                (r["session_key"] == lease.key or not lease.held)]
        for row in live:
            ops.session_stop(source, server, row["session_key"], reason=lease.end_reason or reason)
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
    settings = cfg.sessions or SessionSettings()
    try:
        if kind == "dnsmasq":
            action, lease = dnsmasq_lease(argv, env, settings)
            start = [lease] if lease is not None and action in ("add", "old") else []
            stop = [lease] if lease is not None and action == "del" else []
            reason = "released"
        else:
            hook, start, stop = kea_leases(argv, env, settings)
            reason = stop_reason(hook)
    except HookError as exc:
        print(f"tollgate dhcp-hook {kind}: error: {exc}; nothing written", file=sys.stderr)
        return 2
    if not start and not stop:
        return 0
    with open_ledger() as ledger:
        ops = Operations(ledger, cfg, f"dhcp:{kind}")
        return apply(ops, kind, server or kind, start, stop, by, settings.dhcp_grace * NS, reason=reason)
