"""RADIUS accounting (RFC 2866, RFC 2869): access servers tell the ledger whose session holds which address.

:class:`RadiusServer` listens on UDP (``[radius] listen``, port 1813 by default, IPv4 or IPv6) for
Accounting-Request packets from the clients of ``[[radius.client]]`` (a name, the address or network its
packets come from, a shared secret) and turns them into session operations (accounting/operations.py):

- Start: ``session_start`` for the subscriber named by User-Name, with the session's addresses:
  Framed-IP-Address (a /32), Framed-IPv6-Prefix and Delegated-IPv6-Prefix (their prefixes),
  Framed-IPv6-Address (a /128); the session is (``radius``, client name, Acct-Session-Id);
- Interim-Update: ``session_update`` (bytes, last seen, expiry; a session whose Start was lost opens);
- Stop: ``session_stop`` with the final byte counts;
- Accounting-On / Accounting-Off: the client restarted or stops: ``close_sessions_of_client``.

Every live session expires ``interim_interval * interim_missed + grace`` seconds ([sessions]) after its last
packet, so a lost Stop ends it; the server looks for expired sessions every ``expiry_check`` seconds.

What is answered. An Accounting-Response goes back only for a packet that was accepted: from a known client,
well formed, with a valid Request Authenticator (and Message-Authenticator, if it has one), and recorded in the
ledger: a claim the ledger refuses (the address is someone else's, the user unknown) is recorded as refused,
counted and answered, since a retransmission would be refused again. A packet from an unknown address, with a
bad authenticator, a truncated attribute or any other malformation is dropped and counted, and nothing is
written; a ledger that cannot be written (busy, full) leaves the packet unanswered, so the client sends it
again. A retransmission (the same client, Identifier and Request Authenticator within ``DUPLICATE_WINDOW``) gets
the same answer again without touching the ledger (RFC 5080 section 2.2.2).

Hosting. ``start()`` binds the sockets and runs one thread (with its own ledger connection); ``stop()`` ends it.
``tollgate radius serve -c CONFIG`` runs one on its own. ``tollgate run`` hosts one with ``[radius]
serve_in_gateway = true`` (gateway/daemon/sessions.py): ``open()`` at its start, ``serve()`` in a thread of the
gateway's (a death turns /healthz red), ``stop()`` before its ledger closes, ``registry`` in its /metrics;
``on_change(result)`` is called after every write that changed an owner (the operation's result, with the
``closed`` rows of the old owners and the live ``sessions`` of the new), so that the gateway refreshes them at
once; ``expire=False`` leaves the expiry of sessions to the host.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import ipaddress
import logging
import select
import socket
import struct
import threading
import time
from collections import OrderedDict

from prometheus_client import CollectorRegistry, Counter
from pyrad import packet as rpacket
from pyrad.dictionary import Dictionary

from accounting.ledger import Ledger
from accounting.operations import OperationError, Operations
from ext.errors import LedgerError, TollgateError

log = logging.getLogger("tollgate.radius")

ACCOUNTING_REQUEST, ACCOUNTING_RESPONSE = 4, 5
START, STOP, INTERIM, ACCOUNTING_ON, ACCOUNTING_OFF = 1, 2, 3, 7, 8
DUPLICATE_WINDOW = 30.0  # s: RFC 5080 suggests keeping answers for a few retransmission intervals
MAX_PACKET = 4096  # RFC 2865 section 3 (RFC 7930 allows 65535 over TCP only)
RESULTS = ("accepted", "duplicate", "refused", "bad_authenticator", "unknown_client", "malformed", "unanswered")

# The attributes we read (RFC 2865, 2866, 2869, 3162, 4818, 6911); pyrad decodes by this dictionary.
DICTIONARY = """
ATTRIBUTE User-Name 1 string
ATTRIBUTE NAS-IP-Address 4 ipaddr
ATTRIBUTE NAS-Port 5 integer
ATTRIBUTE Framed-IP-Address 8 ipaddr
ATTRIBUTE Class 25 octets
ATTRIBUTE Calling-Station-Id 31 string
ATTRIBUTE NAS-Identifier 32 string
ATTRIBUTE Proxy-State 33 octets
ATTRIBUTE Acct-Status-Type 40 integer
ATTRIBUTE Acct-Delay-Time 41 integer
ATTRIBUTE Acct-Input-Octets 42 integer
ATTRIBUTE Acct-Output-Octets 43 integer
ATTRIBUTE Acct-Session-Id 44 string
ATTRIBUTE Acct-Session-Time 46 integer
ATTRIBUTE Acct-Terminate-Cause 49 integer
ATTRIBUTE Acct-Input-Gigawords 52 integer
ATTRIBUTE Acct-Output-Gigawords 53 integer
ATTRIBUTE Event-Timestamp 55 date
ATTRIBUTE Message-Authenticator 80 octets
ATTRIBUTE NAS-IPv6-Address 95 ipv6addr
ATTRIBUTE Framed-IPv6-Prefix 97 ipv6prefix
ATTRIBUTE Delegated-IPv6-Prefix 123 ipv6prefix
ATTRIBUTE Framed-IPv6-Address 168 ipv6addr
"""
_DICT = Dictionary(io.StringIO(DICTIONARY))
_INTEGERS = {40, 41, 42, 43, 46, 49, 52, 53}  # 4 octets each (RFC 2865 section 5)


class Malformed(TollgateError):
    """A packet that is not a well-formed Accounting-Request; the message says where."""


def check_structure(data: bytes) -> None:
    """The header and every attribute: lengths that add up exactly (pyrad would take a truncated last
    attribute as shorter), sizes that fit the attribute's type. Raises :class:`Malformed`."""
    if len(data) < 20:
        raise Malformed(f"{len(data)} bytes: shorter than a RADIUS header (20)")
    code, _ident, length = struct.unpack_from("!BBH", data)
    if code != ACCOUNTING_REQUEST:
        raise Malformed(f"code {code}: not an Accounting-Request (4)")
    if not 20 <= length <= MAX_PACKET or length > len(data):
        raise Malformed(f"length field {length} does not fit the {len(data)} bytes received")
    pos = 20
    while pos < length:
        if pos + 2 > length:
            raise Malformed(f"attribute header truncated at byte {pos}")
        kind, alen = data[pos], data[pos + 1]
        if alen < 2 or pos + alen > length:
            raise Malformed(f"attribute {kind} at byte {pos}: length {alen} runs past the packet's {length}")
        vlen = alen - 2
        if kind in _INTEGERS and vlen != 4 or kind in (4, 8, 55) and vlen != 4 or kind == 80 and vlen != 16 \
                or kind in (95, 168) and vlen != 16 or kind in (97, 123) and not 2 <= vlen <= 18 \
                or kind in (1, 44) and vlen == 0:
            raise Malformed(f"attribute {kind} at byte {pos}: {vlen} bytes do not fit its type")
        if kind in (97, 123) and data[pos + 3] > 128:
            raise Malformed(f"attribute {kind} at byte {pos}: prefix length {data[pos + 3]}")
        pos += alen


class RadiusServer:
    """An accounting server on ``cfg.radius.listen`` writing to the ledger at ``db`` (see the module)."""

    def __init__(self, cfg, db, listen=None, actor: str = "radius", on_change=None, expire: bool = True) -> None:
        from gateway.config import RadiusSettings, SessionSettings

        self.cfg = cfg
        self.settings = cfg.radius or RadiusSettings()
        self.timing = cfg.sessions or SessionSettings()
        self.listen = tuple(listen) if listen else self.settings.listen
        self.clients = [(ipaddress.ip_network(c.network), c) for c in self.settings.clients]
        self.db_path = str(db)
        self.actor = actor
        self.registry = CollectorRegistry()
        self.m_packets = Counter("tollgate_radius_packets", "Accounting-Request packets by what became of them",
                                 ["result"], registry=self.registry)
        self.m_sessions = Counter("tollgate_radius_session_operations", "session operations written",
                                  ["operation"], registry=self.registry)
        for r in RESULTS:
            self.m_packets.labels(r)
        self.counts = dict.fromkeys(RESULTS, 0)
        self._answers: OrderedDict = OrderedDict()  # (client, id, authenticator) -> (time, reply bytes)
        self._sockets: list[socket.socket] = []
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._ledger: Ledger | None = None
        self._next_expiry = 0.0
        self.on_change = on_change
        self.expire = expire

    # ---- life --------------------------------------------------------------------------------------------------

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Where it listens (the ports the kernel chose for port 0)."""
        return [s.getsockname()[:2] for s in self._sockets]

    def open(self) -> None:
        """Bind the sockets and open the ledger (``start`` does this; tests call ``handle`` after it)."""
        try:
            for host, port in self.listen:
                family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
                s = socket.socket(family, socket.SOCK_DGRAM)
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind((host, port))
                self._sockets.append(s)
        except OSError as exc:
            self.close()
            raise TollgateError(f"radius: cannot listen on {host} port {port}: {exc.strerror or exc}") from None
        self._ledger = Ledger.open(self.db_path)
        self.ops = Operations(self._ledger, self.cfg, self.actor)

    def start(self) -> RadiusServer:
        self.open()
        self._thread = threading.Thread(target=self.serve, name="radius", daemon=True)
        self._thread.start()
        return self

    def serve(self) -> None:
        """Answer packets until ``stop()``, in the calling thread (after ``open()``)."""
        if self._thread is None:
            self._thread = threading.current_thread()
        log.info("RADIUS accounting on %s for %d clients", ", ".join(f"{h} port {p}" for h, p in self.addresses),
                 len(self.clients))
        self._loop()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(10)
        self._thread = None
        self.close()

    def close(self) -> None:
        for s in self._sockets:
            s.close()
        self._sockets = []
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                ready, _, _ = select.select(self._sockets, [], [], 0.2)
            except (OSError, ValueError):
                return
            for s in ready:
                try:
                    data, addr = s.recvfrom(MAX_PACKET + 1)
                except OSError:
                    continue
                try:
                    reply = self.handle(data, addr[0])
                except Exception:  # never let one packet end the server
                    log.exception("radius: packet from %s could not be handled", addr[0])
                    self._count("unanswered")
                    reply = None
                if reply is not None:
                    try:
                        s.sendto(reply, addr)
                    except OSError as exc:
                        log.warning("radius: cannot answer %s: %s", addr[0], exc)
            if self.expire and time.monotonic() >= self._next_expiry:
                self._next_expiry = time.monotonic() + self.timing.expiry_check
                try:
                    done = self.ops.expire_sessions()
                    if done["closed"]:
                        self.m_sessions.labels("expire").inc(len(done["closed"]))
                        log.info("radius: %d session rows expired (no Stop within the TTL)", len(done["closed"]))
                except (LedgerError, OperationError) as exc:
                    log.warning("radius: expiry round failed: %s", exc)

    # ---- one packet --------------------------------------------------------------------------------------------

    def _count(self, result: str) -> None:
        self.counts[result] += 1
        self.m_packets.labels(result).inc()

    def client_of(self, address: str):
        try:
            ip = ipaddress.ip_address(address.split("%")[0])
        except ValueError:
            return None
        if ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        best = None
        for net, client in self.clients:
            if ip.version == net.version and ip in net and (best is None or net.prefixlen > best[0].prefixlen):
                best = (net, client)
        return best[1] if best else None

    def handle(self, data: bytes, source: str, now: int | None = None) -> bytes | None:
        """The reply to one datagram from ``source`` (an IP address), or None to drop it. Counts what it did."""
        client = self.client_of(source)
        if client is None:
            self._count("unknown_client")
            log.debug("radius: packet from unknown client %s dropped", source)
            return None
        try:
            check_structure(data)
        except Malformed as exc:
            self._count("malformed")
            log.info("radius: malformed packet from %s (%s) dropped: %s", client.name, source, exc)
            return None
        length = struct.unpack_from("!H", data, 2)[0]
        data = data[:length]  # octets past the Length field are padding (RFC 2865 section 3)
        key = (client.name, data[1], data[4:20])
        self._forget_answers()
        cached = self._answers.get(key)
        if cached is not None and hmac.compare_digest(cached[2], hashlib.sha256(data).digest()):
            self._count("duplicate")
            return cached[1]
        try:
            pkt = rpacket.AcctPacket(packet=data, secret=client.secret, dict=_DICT)
        except Exception as exc:  # pyrad's PacketError, struct.error or a decoding error: all malformed
            self._count("malformed")
            log.info("radius: undecodable packet from %s dropped: %s", client.name, exc)
            return None
        if not pkt.VerifyAcctRequest() or (80 in pkt and not _message_authenticator_ok(pkt, data, client.secret)):
            self._count("bad_authenticator")
            log.warning("radius: bad authenticator from %s (%s): wrong shared secret? dropped", client.name, source)
            return None
        try:
            request = _attributes(pkt)
        except (Malformed, ValueError, struct.error, IndexError) as exc:
            self._count("malformed")
            log.info("radius: malformed packet from %s dropped: %s", client.name, exc)
            return None
        try:
            refused = self._apply(client, request, now)
        except (LedgerError, OSError) as exc:
            self._count("unanswered")
            log.warning("radius: the ledger cannot take a packet from %s now (%s); unanswered, it will come "
                        "again", client.name, exc)
            return None
        self._count("refused" if refused else "accepted")
        reply = pkt.CreateReply()
        raw = reply.ReplyPacket()
        self._answers[key] = (time.monotonic(), raw, hashlib.sha256(data).digest())
        return raw

    def _forget_answers(self) -> None:
        cutoff = time.monotonic() - DUPLICATE_WINDOW
        while self._answers and next(iter(self._answers.values()))[0] < cutoff:
            self._answers.popitem(last=False)
        while len(self._answers) > 100_000:
            self._answers.popitem(last=False)

    def _apply(self, client, r: dict, now: int | None) -> bool:
        """Write one accepted request; True if the ledger refused its claim (counted, logged, answered)."""
        status = r["status"]
        now = time.time_ns() if now is None else now
        expires = now + self.timing.radius_ttl_ns
        try:
            if status in (ACCOUNTING_ON, ACCOUNTING_OFF):
                done = self.ops.close_sessions_of_client("radius", client.name,
                                                         "accounting-on" if status == ACCOUNTING_ON else
                                                         "accounting-off", now=now)
                self.m_sessions.labels("close_client").inc(len(done["closed"]))
                self._changed(done)
                log.info("radius: %s from %s closed %d session rows", "Accounting-On" if status == ACCOUNTING_ON
                         else "Accounting-Off", client.name, len(done["closed"]))
                return False
            if status == START:
                if r["user"] is None or not r["networks"]:
                    raise OperationError("a Start needs User-Name and an address (Framed-IP-Address, "
                                         "Framed-IPv6-Prefix, Delegated-IPv6-Prefix)")
                done = self.ops.session_start("radius", client.name, r["session"], r["user"], r["networks"],
                                              mac=r["mac"], expires_ns=expires, up_bytes=r["up"],
                                              down_bytes=r["down"], now=now)
            elif status == INTERIM:
                done = self.ops.session_update("radius", client.name, r["session"],
                                               r["user"] if r["networks"] else None, r["networks"] or None,
                                               mac=r["mac"], expires_ns=expires, up_bytes=r["up"],
                                               down_bytes=r["down"], now=now)
            elif status == STOP:
                done = self.ops.session_stop("radius", client.name, r["session"], up_bytes=r["up"],
                                             down_bytes=r["down"], now=now)
            else:
                log.info("radius: Acct-Status-Type %d from %s is not one we act on; answered", status, client.name)
                return False
        except OperationError as exc:
            self.m_sessions.labels("refused").inc()
            log.warning("radius: %s session %r of %s (User-Name %r) refused: %s",
                        {START: "Start", INTERIM: "Interim-Update", STOP: "Stop"}.get(status), r["session"],
                        client.name, r["user"], exc)
            return True
        if done["status"] == "duplicate":
            self._count("duplicate")
        self.m_sessions.labels(done["status"]).inc()
        self._changed(done)
        return False

    def _changed(self, done: dict) -> None:
        """Tell the host which owners a write changed (a touch of last seen and bytes changes none)."""
        if self.on_change is None or not (done.get("closed") or done.get("changed")):
            return
        try:
            self.on_change(done)
        except Exception:  # the host's business; the packet is recorded and will be answered
            log.exception("radius: the host could not take a session change")


def _message_authenticator_ok(pkt, data: bytes, secret: bytes) -> bool:
    """RFC 3579 section 3.2 / RFC 5080 2.2.2 for accounting: HMAC-MD5 over the packet with the attribute's
    value zeroed (the Request Authenticator as sent)."""
    pos, length = 20, len(data)
    while pos < length:
        kind, alen = data[pos], data[pos + 1]
        if kind == 80:
            given = data[pos + 2:pos + alen]
            zeroed = data[:pos + 2] + b"\x00" * 16 + data[pos + alen:]
            return hmac.compare_digest(hmac.new(secret, zeroed, hashlib.md5).digest(), given)
        pos += alen
    return False


def _one(pkt, code: int):
    values = pkt.get(code)
    if not values:
        return None
    if len(values) > 1 and code not in (97, 123, 33, 25):
        raise Malformed(f"attribute {code} appears {len(values)} times")
    return values


def _attributes(pkt) -> dict:
    """What an accounting request says, decoded from the raw attribute values pyrad split out."""
    def integer(code):
        v = _one(pkt, code)
        return None if v is None else struct.unpack("!I", v[0])[0]

    def text(code):
        v = _one(pkt, code)
        if v is None:
            return None
        try:
            s = v[0].decode("utf-8")
        except UnicodeDecodeError:
            raise Malformed(f"attribute {code} is not UTF-8 text") from None
        return s

    status = integer(40)
    if status is None:
        raise Malformed("no Acct-Status-Type")
    networks = []
    v = _one(pkt, 8)
    if v is not None:
        ip = ipaddress.IPv4Address(v[0])
        if ip.packed not in (b"\xff\xff\xff\xff", b"\xff\xff\xff\xfe", b"\x00\x00\x00\x00"):  # "assigned by NAS"
            networks.append(f"{ip}/32")
    for code in (97, 123):
        for raw in pkt.get(code, []):
            plen = raw[1]
            addr = (raw[2:] + b"\x00" * 16)[:16]
            # RFC 3162 2.3: bits past the prefix length are ignored; canonical with them cleared
            networks.append(str(ipaddress.IPv6Network((addr, plen), strict=False)))
    v = _one(pkt, 168)
    if v is not None:
        networks.append(f"{ipaddress.IPv6Address(v[0])}/128")
    up = (integer(52) or 0) << 32 | (integer(42) or 0)
    down = (integer(53) or 0) << 32 | (integer(43) or 0)
    mac = text(31)
    if mac is not None:
        from accounting.operations import Operations

        try:
            mac = Operations.mac(mac)
        except OperationError:
            mac = None  # Calling-Station-Id is often a MAC, sometimes a phone number or a circuit
    has_bytes = any(pkt.get(c) for c in (42, 43, 52, 53))
    session = text(44)
    if session is None and status in (START, STOP, INTERIM):
        raise Malformed("no Acct-Session-Id (RFC 2866 section 5.5: required)")
    return {"status": status, "user": text(1), "session": session, "networks": sorted(set(networks)),
            "up": up if has_bytes else None, "down": down if has_bytes else None, "mac": mac}


def serve(cfg, db, listen=None, metrics: tuple[str, int] | None = None) -> int:
    """``tollgate radius serve``: until SIGTERM or SIGINT."""
    import signal

    server = RadiusServer(cfg, db, listen).start()
    if metrics is not None:
        from prometheus_client import start_http_server

        start_http_server(metrics[1], metrics[0], registry=server.registry)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"radius: listening on {', '.join(f'{h} port {p}' for h, p in server.addresses)}", flush=True)
    try:
        while not stop.wait(1.0):
            if server._thread is None or not server._thread.is_alive():
                return 1
    finally:
        server.stop()
        log.info("radius: stopped; %s", ", ".join(f"{k} {v}" for k, v in server.counts.items()))
    return 0
