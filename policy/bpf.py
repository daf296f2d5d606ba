"""Attach Tollgate's tc/eBPF program to the subscriber-facing interfaces.

The program and its maps are loaded and pinned by ``ext.bpfmaps.Maps.load``
(under ``/sys/fs/bpf/tollgate`` by default); this module only hooks the
pinned programs into tc, with iproute2's ``tc`` (``object-pinned``: tc
loads nothing itself, so the filters share the pinned maps):

* ``clsact`` qdisc on each interface (added if missing; removed again on
  detach only when no filter of anyone is left on it);
* ingress: ``tollgate_ingress`` (the subscribers' UPLOAD), egress:
  ``tollgate_egress`` (DOWNLOAD), both ``direct-action``, at preference
  ``PREF`` and handle ``HANDLE``, so ours are told apart from anyone
  else's. The preference is low so that we run before filters added with
  tc's default preferences (49152 and down): a filter before ours that
  returns ``TC_ACT_OK`` would let packets by uncounted.

``present()`` is the heartbeat: on every interface given, both hooks carry a
filter of ours whose program id is the id of the program pinned under
``pin_dir`` (a filter left over from an older load, or someone else's
program at our preference, is not "present"). ``detach()`` removes our
filters (from the interfaces given, or from every interface of the network
namespace that has one) and unpins.

Everything applies to the network namespace of the process, or to the named
one (``netns``, as ``ip netns`` names it: the lab and the tests) through
``nsenter --net``, which, unlike ``ip netns exec``, leaves /sys (and with it
the bpffs of the pins) as it is.
"""

from __future__ import annotations

import json
import logging
import subprocess

from ext.bpfmaps import DEFAULT_PIN_DIR, PROGRAMS, BpfError, Maps, pinned_program_ids
from ext.errors import TollgateError

log = logging.getLogger("tollgate.policy.bpf")

PREF = 7
HANDLE = "0x7467"  # "tg"
HOOKS = ("ingress", "egress")  # index = direction: UPLOAD 0 at ingress, DOWNLOAD 1 at egress
TIMEOUT = 10.0


class AttachError(TollgateError):
    """tc refused to attach or detach the program (the message has tc's reason)."""


def _tc(args: list[str], netns: str | None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = (["nsenter", f"--net=/run/netns/{netns}"] if netns else []) + ["tc", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
    if check and proc.returncode:
        raise AttachError(f"{' '.join(cmd)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def _filters(iface: str, hook: str, netns: str | None) -> list[dict]:
    proc = _tc(["-j", "filter", "show", "dev", iface, hook], netns, check=False)
    if proc.returncode or not proc.stdout.strip():
        return []
    return json.loads(proc.stdout)


def _ours(iface: str, hook: str, netns: str | None) -> list[dict]:
    """Our filters on ``iface``/``hook`` (the entries tc lists with options)."""
    return [f for f in _filters(iface, hook, netns)
            if f.get("pref") == PREF and f.get("kind") == "bpf"
            and f.get("options", {}).get("handle") == HANDLE]


def _pinned_ids(pin_dir: str) -> tuple[int, int]:
    """The program ids of the pinned ingress and egress programs (their pins only: a ``Maps.open`` here mapped
    the counters a second time, 320 MB resident at a million slots, at every attach and heartbeat)."""
    return pinned_program_ids(pin_dir)


def attach(ifaces, pin_dir: str = DEFAULT_PIN_DIR, netns: str | None = None) -> None:
    """Hook the pinned programs into ingress and egress of each of ``ifaces``
    (replacing a filter of ours there). On error nothing stays attached that
    this call attached."""
    ifaces = list(ifaces)
    _pinned_ids(pin_dir)  # fails early, with the loader's reason, if nothing is pinned
    done: list[tuple[str, str]] = []
    added: list[str] = []  # the clsact qdiscs this call added
    try:
        for iface in ifaces:
            qdiscs = _tc(["-j", "qdisc", "show", "dev", iface], netns).stdout
            if not any(q.get("kind") == "clsact" for q in json.loads(qdiscs or "[]")):
                _tc(["qdisc", "add", "dev", iface, "clsact"], netns)
                added.append(iface)
            for direction, hook in enumerate(HOOKS):
                _tc(["filter", "replace", "dev", iface, hook, "pref", str(PREF), "handle", HANDLE, "bpf", "da",
                     "object-pinned", f"{pin_dir}/{PROGRAMS[direction]}"], netns)
                done.append((iface, hook))
            log.info("attached %s and %s to %s", *PROGRAMS, iface)
    except BaseException:
        for iface, hook in done:
            _tc(["filter", "del", "dev", iface, hook, "pref", str(PREF), "handle", HANDLE, "bpf"], netns, check=False)
        for iface in added:
            if not _filters(iface, "ingress", netns) and not _filters(iface, "egress", netns):
                _tc(["qdisc", "del", "dev", iface, "clsact"], netns, check=False)
        raise


LOCAL_ROUTE_TYPES = ("local", "broadcast", "anycast", "multicast")


def local_destinations(netns: str | None = None) -> list[str]:
    """What the kernel of the namespace delivers to itself rather than
    forwards: the destinations of its local routing table (own addresses,
    broadcasts, IPv6 anycast and multicast), as CIDR strings. The tc program
    passes a subscriber's packets to them uncounted, as the forward hook
    (where the nfqueue path meters) never sees them."""
    out = []
    for family in ("-4", "-6"):
        cmd = (["nsenter", f"--net=/run/netns/{netns}"] if netns else []) + \
            ["ip", "-j", family, "route", "show", "table", "local"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, check=True)
        for route in json.loads(proc.stdout or "[]"):
            dst = route.get("dst", "")
            if route.get("type") in LOCAL_ROUTE_TYPES and dst and dst != "default":
                out.append(dst if "/" in dst else f"{dst}/{32 if family == '-4' else 128}")
    return sorted(set(out))


def attached(netns: str | None = None) -> dict[str, dict[str, int]]:
    """{interface: {hook: program id}} of our filters in the namespace."""
    cmd = (["nsenter", f"--net=/run/netns/{netns}"] if netns else []) + ["ip", "-j", "link", "show"]
    links = json.loads(subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, check=True).stdout)
    out: dict[str, dict[str, int]] = {}
    for link in links:
        iface = link["ifname"]
        for hook in HOOKS:
            for f in _ours(iface, hook, netns):
                out.setdefault(iface, {})[hook] = f["options"].get("prog", {}).get("id", 0)
    return out


def present(ifaces, pin_dir: str = DEFAULT_PIN_DIR, netns: str | None = None) -> bool:
    """The heartbeat: is our pinned program attached, both hooks, on every one of ``ifaces``?"""
    try:
        ids = _pinned_ids(pin_dir)
    except BpfError:
        return False
    for iface in ifaces:
        for direction, hook in enumerate(HOOKS):
            found = [f["options"].get("prog", {}).get("id") for f in _ours(iface, hook, netns)]
            if found != [ids[direction]]:
                return False
    return True


def detach(ifaces=None, pin_dir: str = DEFAULT_PIN_DIR, netns: str | None = None, unpin: bool = True) -> None:
    """Remove our filters from ``ifaces`` (None: wherever they are in the
    namespace), the clsact qdisc where nothing else uses it, and (``unpin``)
    the pins. Idempotent."""
    targets = list(attached(netns)) if ifaces is None else list(ifaces)
    for iface in targets:
        for hook in HOOKS:
            if _ours(iface, hook, netns):
                _tc(["filter", "del", "dev", iface, hook, "pref", str(PREF), "handle", HANDLE, "bpf"], netns)
        if not _filters(iface, "ingress", netns) and not _filters(iface, "egress", netns):
            _tc(["qdisc", "del", "dev", iface, "clsact"], netns, check=False)
        log.info("detached from %s", iface)
    if unpin:
        Maps.unpin(pin_dir)
