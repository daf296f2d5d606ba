// SPDX-License-Identifier: GPL-2.0
/*
 * Tollgate's in-kernel data path: per-packet metering and enforcement of
 * byte grants, a tc (clsact, direct-action) program.
 *
 * Where it runs
 * -------------
 * On the gateway's SUBSCRIBER-FACING interfaces: `tollgate_ingress` on
 * ingress sees a subscriber's UPLOAD (the subscriber is the source),
 * `tollgate_egress` on egress sees its DOWNLOAD (the subscriber is the
 * destination). Both are therefore keyed by the subscriber's inside address,
 * whatever masquerade the operator does on the upstream side (SNAT happens
 * after egress towards the upstream, reply un-NAT before our egress).
 * Traffic between two subscribers is an upload at one interface and a
 * download at the other.
 *
 * What a packet is (the same as ext/engine.pyx's parse_packet)
 * -----------------------------------------------------------
 * Ethernet, optionally one 802.1Q/802.1ad tag (an accelerated tag is not in
 * the frame and needs nothing). EtherType other than IPv4/IPv6: not IP,
 * passed and not counted (STAT_NONIP). Then the IP header is parsed by its
 * version nibble exactly as the engine does, with n = wirelen = skb->len less
 * the link-layer header (everything after L2 is readable: we read through
 * bpf_skb_load_bytes, so a non-linear skb parses like a linear one):
 *   IPv4: n < 20, IHL < 20, tot_len < IHL or tot_len > wirelen: malformed.
 *         Ports only on first fragments (offset 0).
 *   IPv6: n < 40 or 40 + payload_len > wirelen: malformed; payload_len 0
 *         (jumbo / BIG TCP) takes the wire length. Extension headers
 *         (hop-by-hop, routing, fragment, AH, destination options) are
 *         walked; a chain that runs past the packet ends the walk (no ports,
 *         not malformed), as in the engine. The walk is bounded for the
 *         verifier at TG_MAX_EXT_HDRS headers: a longer chain ends there the
 *         same way (the engine, with its ~128-byte copy range on the nfqueue
 *         path, stops at the same point for any chain that long).
 *   other versions: malformed.
 * Cost: every helper call costs ~8 ns on this kind of machine (calls and
 * returns go through mitigation thunks), so the common case (untagged, IPv4
 * without options or IPv6 without extension headers, 58 bytes or more) is
 * read with one bpf_skb_load_bytes (parse_fast) and everything else with the
 * full parse's four or more; both give the same answer.
 * Malformed packets are counted in STAT_MALFORMED (bytes = wirelen) and
 * passed, or dropped if TG_F_MALFORMED_DROP is set: never charged.
 * Ports: TCP, UDP, SCTP, UDP-Lite, first fragment, 4 bytes present.
 * Unknown (no subscriber on our side: STAT_UNKNOWN, never charged): passed,
 * or dropped if TG_F_UNKNOWN_DROP is set (the config's unknown verdict),
 * except what an unknown address sends to the gateway itself (the tests of
 * "Not forwarded" below), which the forward hook, where that verdict
 * applies on the nfqueue path, never sees: neighbour discovery from a
 * link-local source, DHCP, DNS.
 *
 * Bytes
 * -----
 * IP bytes, as the engine and the kernel's forward-hook counters count them:
 * tot_len (IPv4) / 40 + payload_len (IPv6), which drops link-layer padding,
 * or the wire length (skb->len less L2) when the header says 0. A GSO/GRO
 * aggregate is one skb here, as in the forward hook: one packet with its
 * whole length (GRO rewrites tot_len to the aggregate's).
 *
 * Subscriber lookup (value: struct tg_sub, a dense slot index)
 * ------------------------------------------------------------
 *   IPv4: tg_sub4 (hash, /32) then tg_sub4_lpm (other lengths).
 *   IPv6: tg_sub6 (hash, /128), tg_sub6_lpm if its match is longer than
 *         /64, tg_sub6_64 (hash of the upper 64 bits), then tg_sub6_lpm.
 * A lookup that cannot match (TG_F_SUB* in tg_info.flags: the /128 hash or
 * an LPM trie is empty, or the IPv6 trie holds nothing longer than /64) is
 * skipped.
 * Why hash before LPM: almost every subscriber owns one address or one /64;
 * a hash lookup costs the same at 10 or 10M entries, while an LPM trie walk
 * grows with the table (62 ns at 100 entries, 665 ns at 1M, published
 * xdp-project figures). The order above is still a longest-prefix match
 * (subscriber networks do not overlap, see policy/nft.py).
 *
 * Zones and the allow-list (ext/engine_py.py compile_rules, flattened)
 * -------------------------------------------------------------------
 * tg_zone4/tg_zone6 (LPM) map the remote address's longest matching prefix
 * to a group in tg_zone_groups; a group holds that prefix's rules in order,
 * followed by those of the next shorter matching prefix, and so on (the
 * loader flattens the chain: one loop, no walk from group to group). The
 * first rule, longest prefix first, whose protocol (0: any) and remote port
 * range match gives the zone; nothing: the default zone. A rule with the
 * full port range 0-65535 matches packets without ports too. Bounded for the
 * verifier: TG_MAX_RULES rules along a prefix's chain; the loader refuses
 * anything bigger before it writes. (Groups that pointed to their shorter
 * prefix's group, up to 16 rules x 8 prefixes, cost the verifier 128 loop
 * iterations per lookup walked: most of its million-instruction budget.)
 * The allow-list (tg_allow4/6, tg_allow_groups) has the same shape: any
 * rule of any matching prefix allows.
 *
 * Counters (tg_counters, BPF_F_MMAPABLE array of struct tg_counter)
 * ---------------------------------------------------------------
 * Index (slot * n_zones + zone) * 2 + direction (0 upload, 1 download).
 * One 64-byte entry (a cache line: two subscribers on two CPUs never share
 * one) per (slot, zone, direction):
 *   used     bytes passed against the grant: monotonic, never reset
 *   grant    cumulative byte limit, written by userspace (2^64-1: free)
 *   packets  packets passed against the grant
 *   dropped_bytes/packets  refused here (grant, or blocked)
 *   allowed_bytes/packets  passed by the allow-list while blocked: never
 *            charged
 *   flags    TG_C_BLOCKED, TG_C_REDIRECTED, written by userspace
 * A packet passes only if used + len <= grant. `used` advances by
 * compare-and-swap, retried at most TG_CAS_RETRIES times (then dropped and
 * counted in STAT_CAS_EXHAUSTED: fail closed): a plain read-check-add would
 * let two CPUs that both read the same `used` pass a byte beyond the grant.
 * Why cumulative grants and monotonic counters: userspace reads deltas and
 * raises `grant`, each a single 64-bit store; nothing is ever reset, so a
 * daemon restart or SIGKILL loses nothing and the grant keeps holding while
 * the daemon is down.
 * Blocked (the engine's blocked state, mirrored by userspace): the packet is
 * dropped unless the allow-list matches, and allow-listed bytes are counted
 * apart and never touch the grant. A subscriber that is not blocked is
 * charged for allow-listed traffic too, as in the engine (step 4 of
 * ext/engine_py.py's docstring).
 *
 * Redirected to the block page (TG_C_REDIRECTED, STAT_REDIRECTED: passed,
 * never counted against a grant, never a refusal)
 * -------------------------------------------------------------------------
 * tc ingress runs before netfilter, so dropping every packet of a blocked
 * subscriber here also dropped the HTTP that nft's portal chain (nat
 * prerouting, policy/nft.py) redirects to the gateway's own block-page
 * server: the browser never got the block page. A blocked subscriber's
 * upload that nft redirects to the gateway is passed, uncounted, only
 * while the slot's TG_C_REDIRECTED flag is set, which userspace sets only
 * while nft's blocked set holds the subscriber's networks. What nft does
 * with such a packet: `ip saddr @blocked* tcp dport 80 jump portal_redirect`
 * (IPv4 and IPv6, every slot of the blocked sets), which returns for an
 * allow-listed destination (allowed here already, as above) and otherwise
 * `redirect to :portal_port`: the packet is delivered to the gateway itself
 * and never forwarded; a packet of an older connection (no NAT binding) or
 * anything else nat lets by reaches the forward hook, where nft's block
 * chain (priority -10, before anything can forward it) rejects every packet
 * from the blocked set that the allow-list does not let out. So the rule
 * here is exactly: blocked, TG_C_REDIRECTED, upload, TCP, ports present (a
 * first fragment), destination port 80, not allow-listed: pass uncounted.
 * Every other packet of a blocked subscriber (another port, UDP, ICMP,
 * later fragments) is dropped as before. Downloads need nothing: the block
 * page's replies come from the gateway itself (STAT_LOCAL at egress).
 * The order of operations (userspace, gateway/daemon/pusher.py and
 * gateway/sources/ebpf.py), so that no packet is ever forwarded uncounted:
 *   block:   nft adds the networks to the blocked set (the transaction is
 *            committed: nat redirects, forward rejects), THEN the flag is
 *            set. Before the flag, the packet is dropped here (the block
 *            page is late, nothing leaks).
 *   unblock: the flag is cleared, THEN nft removes the networks from the
 *            blocked set. Between the two, the packet is dropped here (or,
 *            once userspace cleared TG_C_BLOCKED, metered against the grant).
 *   start:   a daemon that starts clears every flag before it restores nft's
 *            sets from the ledger (which may unblock), and sets them again
 *            for the blocked subscribers once they are restored.
 * Clearing TG_C_BLOCKED clears TG_C_REDIRECTED with it (set_blocked in
 * ext/bpfmaps.pyx), so a slot blocked again later starts without it.
 *
 * Not forwarded (STAT_LOCAL: passed, never counted against a grant)
 * ------------------------------------------------------------------
 * The nfqueue path meters in the forward hook, so traffic to or from the
 * gateway itself (DNS, the portal, neighbour discovery, ICMP errors it
 * sends) is never charged there (policy/nft.py); tc sees it, and must leave
 * it alone the same way, whatever the zone of the gateway's addresses costs:
 *   egress: a packet the gateway sent itself has no input interface
 *           (skb->ingress_ifindex 0, the kernel's skb_iif); one it forwards
 *           has the interface it came in on.
 *   ingress: routing has not happened yet, so the program cannot ask it;
 *           multicast, link-local, loopback and the limited broadcast are
 *           tested by never_forwarded(); the other addresses the kernel
 *           delivers locally (its local routing table: own addresses, subnet
 *           broadcasts, anycast) are zone rules of zone TG_ZONE_NOT_FORWARDED, written
 *           by userspace (gateway/sources/ebpf.py) first in their prefix's
 *           group: the zone lookup the packet needs anyway tells, at no cost
 *           of its own. Egress has its own copy of the groups, without those
 *           rules (tg_zone_groups from tg_info.egress_groups on: same
 *           prefixes, same order): a forwarded packet from such a source is
 *           rated in the zone the engine gives it. A copy, not a test in the
 *           rule loop: that branch made the verifier's walk of the loops
 *           exceed its million instructions. A blocked
 *           subscriber's packets to the gateway pass too: what it may reach
 *           on the gateway is the nft input chain's business, as on the
 *           nfqueue path.
 *
 * A packet to a blocked subscriber is dropped before its sender is charged,
 * as in the engine (its step 2): at ingress, while some slot is blocked
 * (TG_F_ANY_BLOCKED, kept by userspace), the destination is looked up too;
 * if it is a blocked subscriber and the allow-list does not let the packet
 * in for it (remote: the source), it is dropped and counted as the
 * receiver's refusal, in its download counter of the zone its own egress
 * would rate the packet in (remote: the source, the egress groups), where
 * its other refusals of the same traffic are counted; it used to land in the
 * zone of the sender's upload, and the grant keeper, which reads a refusal
 * as a pair that wants more, looked at the wrong pair. (That second zone
 * lookup is made only on this drop path: the passing path pays nothing.)
 * Without this, the sender paid
 * for what the nft blocked set (forward hook) or the receiver's egress
 * refused: bytes never delivered.
 *
 * tg_dirty (BPF_F_MMAPABLE array of __u64): bit (idx % 64) of word idx / 64
 * is set, with an atomic OR, whenever counter idx moves (passed, refused or
 * allowed), and only if it is not set already (a plain read first: the
 * locked OR, and the cache line bouncing between CPUs, happen once per
 * counter per poll, not per packet). Userspace swaps each nonzero word to 0
 * (__atomic_exchange_n in the mmap) and reads just those counters, so a poll
 * costs what moved, not max_slots. Lossless: the program's counter update
 * is a locked (fully ordered) instruction before its read of the word, so a
 * bit found set means the swap that clears it comes after the update, and
 * the read after the swap sees it; a bit set after the swap only makes the
 * next poll look again.
 *
 * Refunds (tg_refunds, tg_inflight, tollgate_drop; STAT_REFUNDED)
 * ----------------------------------------------------------------
 * Whatever the kernel drops after this program counted it was charged and
 * never delivered: uploads dropped in or before the forward hook (an
 * operator's nft/iptables rule, rp_filter, no route, an invalid conntrack
 * state, nft's bound_mac rule of [sessions] bind_mac), downloads dropped by
 * the qdisc after tc egress (full). The nfqueue path counts in the forward
 * hook and never charges the first kind. So:
 *   - a packet passed against its grant is remembered as this CPU's last of
 *     its direction (tg_inflight, per CPU, two entries): the kernel's skb
 *     (bpf_cast_to_kern_ctx, a kfunc of kernel 6.3), its network namespace,
 *     counter index and bytes, and a mark, a byte of skb->tc_index (the
 *     upload's the low one, the download's the high one; tc itself writes
 *     tc_index from the classid the program leaves after every run on
 *     these hooks, net/core/dev.c tc_run) that changes with every packet;
 *   - tollgate_drop runs on skb:kfree_skb (drops only: what is delivered or
 *     sent on is consume_skb, another tracepoint): an skb that is a CPU's
 *     last counted packet, dropped in the namespace that counted it and
 *     still carrying its mark, gives its bytes and packet back
 *     (tg_refunds[index], monotonic, 16 bytes per counter: not in
 *     tg_counter, whose 64 bytes already make most of the maps' memory).
 * Why this is exact (verified on 6.18 with a probe in the lab, before this
 * was built): the forward path of a packet that arrived on an interface
 * runs in the same softirq on the same CPU, synchronously, from tc ingress
 * to the forward hook's verdict and on to the transmit queue, and tc
 * egress runs in the same call as the qdisc's enqueue: 5,000 of 5,000 UDP
 * packets an nft forward rule dropped and 22,193 of 22,193 downloads a
 * pfifo dropped were their CPU's last counted packet, none found on
 * another CPU. The checks: the pointer (a clone is another skb); the
 * namespace, since through a veth the far end runs in the same softirq too
 * and its drops (no socket: 10,000 of 10,000 in the probe) are of packets
 * the gateway delivered; the mark, since a counted packet freed unseen
 * (consumed far away) may lend its memory to a new skb, which is zeroed at
 * allocation and passes here before it is counted. The skb's length is
 * not compared: the kernel trims and pulls headers on the way (at an nft
 * drop it is the IP length, 14 less than here; at a UDP socket's, 34 less;
 * at egress, the same). What is not refunded, so charged as before: drops
 * after another packet of the same CPU and direction was counted (a qdisc
 * that drops at dequeue, fq_codel's codel; a GSO packet segmented after us
 * whose segments are dropped), and everything on a kernel without BTF or
 * the kfunc, where the loader takes the _plain programs instead.
 * Userspace charges used - refunded, one poll late (a packet in flight at a
 * poll, counted but not yet dropped, is then settled), and never less than
 * it charged already (gateway/sources/ebpf.py).
 *
 * tg_stats (per-CPU array of struct tg_stat, summed by userspace): the
 * STAT_* ids below. tg_info (array, one entry): magic, ABI version and the
 * configuration (zones, default zone, flags); until userspace has written
 * it, packets pass uncounted (STAT_UNCONFIGURED).
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_tracing.h>

#define TG_MAGIC 0x54474154454c4c54ULL /* "TLLETAGT" */
/* 2: tg_dirty; 3: TG_ZONE_NOT_FORWARDED, STAT_LOCAL; 4: TG_C_REDIRECTED, STAT_REDIRECTED; 5: tg_refunds,
 * tg_inflight, tollgate_drop, STAT_REFUNDED */
#define TG_ABI 5

#define TG_MAX_EXT_HDRS 16
#define TG_MAX_RULES 32
#define TG_CAS_RETRIES 64
#define TG_MAX_WIRE_LEN (1U << 20) /* as ext/constants.py's MAX_WIRE_LEN */
/* A zone rule's zone for addresses the gateway delivers to itself (see "Not
 * forwarded" in the header comment). */
#define TG_ZONE_NOT_FORWARDED 0xff

#define TG_F_MALFORMED_DROP 1U
#define TG_F_UNKNOWN_DROP 2U
/* Which subscriber LPM tries may hold entries (userspace sets a flag before it
 * writes such an entry and clears it after the last one went): the lookups
 * that cannot match are skipped. */
#define TG_F_SUB4_LPM 4U
#define TG_F_SUB6_LPM 8U
#define TG_F_SUB6_LONG 16U /* tg_sub6_lpm may hold a prefix longer than /64 */
#define TG_F_SUB6_HOST 32U /* tg_sub6 (the /128 hash) is not empty */
#define TG_F_ANY_BLOCKED 64U /* some slot is blocked (see "Blocked" in the header comment) */
#define TG_C_BLOCKED 1ULL
/* nft's blocked set holds the slot's networks: its tcp/80 is redirected to the block page (see
 * "Redirected" in the header comment); only looked at with TG_C_BLOCKED */
#define TG_C_REDIRECTED 2ULL
#define TG_HTTP_PORT 80

enum tg_stat_id {
	STAT_UNKNOWN = 0,      /* IP, but no subscriber on our side */
	STAT_MALFORMED = 1,    /* the engine's malformed */
	STAT_PASSED = 2,       /* passed against a grant */
	STAT_DROPPED = 3,      /* refused: grant or blocked */
	STAT_ALLOWED = 4,      /* blocked, but allow-listed */
	STAT_NONIP = 5,        /* not IPv4/IPv6 */
	STAT_CAS_EXHAUSTED = 6,/* dropped after TG_CAS_RETRIES lost races */
	STAT_UNCONFIGURED = 7, /* tg_info not written yet */
	STAT_NOSLOT = 8,       /* subscriber slot/zone outside tg_counters */
	STAT_LOCAL = 9,        /* not forwarded: to or from the gateway itself */
	STAT_REDIRECTED = 10,  /* blocked, tcp/80 that nft redirects to the block page */
	STAT_REFUNDED = 11,    /* passed and counted here, then dropped by the kernel: refunded (tollgate_drop) */
	STAT_MAX = 12,
};

struct tg_stat {
	__u64 packets;
	__u64 bytes;
};

struct tg_info {
	__u64 magic;
	__u32 abi;
	__u32 n_zones;
	__u32 default_zone;
	__u32 flags;
	__u32 max_slots;
	__u32 reserved; /* the load's id */
	__u32 egress_groups; /* tg_zone_groups[egress_groups + i]: group i for egress (see "Not forwarded") */
	__u32 pad;
};

struct tg_counter {
	__u64 used;
	__u64 grant;
	__u64 packets;
	__u64 dropped_bytes;
	__u64 dropped_packets;
	__u64 allowed_bytes;
	__u64 allowed_packets;
	__u64 flags;
};

/* Bytes and packets passed against the grant (counted in tg_counter.used and .packets) that the kernel
 * dropped afterwards, never delivered: monotonic, one per counter index (see "Refunds"). */
struct tg_refund {
	__u64 bytes;
	__u64 packets;
};

/* The last packet this CPU counted in one direction, until the kernel drops it or the next one replaces it
 * (see "Refunds"). */
struct tg_inflight {
	__u64 skb;  /* the kernel's struct sk_buff, as an address: compared, never dereferenced */
	__u64 net;  /* the network namespace it was counted in (struct net *, compared only) */
	__u32 idx;  /* its counter index */
	__u32 len;  /* the bytes it was counted with */
	__u32 seq;  /* its mark: its byte of skb->tc_index (direction 0: the low byte, 1: the high one), never 0;
		     * the last mark given on this CPU, which the next counted packet takes one past */
};

struct tg_sub {
	__u32 slot;
	__u32 plen; /* the prefix length of the entry (for the /64 vs LPM order) */
};

struct tg_lpm4 {
	__u32 prefixlen;
	__u8 addr[4];
};

struct tg_lpm6 {
	__u32 prefixlen;
	__u8 addr[16];
};

struct tg_rule {
	__u8 proto;   /* 0: any */
	__u8 zone;
	__u16 port_lo;
	__u16 port_hi;
	__u16 reserved;
};

struct tg_group {
	__u32 n_rules;
	__u32 reserved;
	struct tg_rule rules[TG_MAX_RULES]; /* the prefix's rules, then its shorter prefixes' */
};

/* Sizes are placeholders: the loader sets max_entries before loading. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, struct tg_sub);
} tg_sub4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u8[16]);
	__type(value, struct tg_sub);
} tg_sub6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u64);
	__type(value, struct tg_sub);
} tg_sub6_64 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct tg_lpm4);
	__type(value, struct tg_sub);
} tg_sub4_lpm SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct tg_lpm6);
	__type(value, struct tg_sub);
} tg_sub6_lpm SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 4096);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct tg_lpm4);
	__type(value, __u32);
} tg_zone4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 4096);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct tg_lpm6);
	__type(value, __u32);
} tg_zone6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 8192);
	__type(key, __u32);
	__type(value, struct tg_group);
} tg_zone_groups SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct tg_lpm4);
	__type(value, __u32);
} tg_allow4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct tg_lpm6);
	__type(value, __u32);
} tg_allow6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2048);
	__type(key, __u32);
	__type(value, struct tg_group);
} tg_allow_groups SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct tg_counter);
} tg_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 16);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, __u64);
} tg_dirty SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct tg_refund);
} tg_refunds SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2); /* direction */
	__type(key, __u32);
	__type(value, struct tg_inflight);
} tg_inflight SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, struct tg_stat);
} tg_stats SEC(".maps");


struct tg_pkt {
	__u8 src[16];
	__u8 dst[16];
	__u32 length;
	__u8 v6;
	__u8 proto;
	__u8 has_ports;
	__u8 pad;
	__u16 sport;
	__u16 dport;
};

enum { PARSE_OK, PARSE_NONIP, PARSE_MALFORMED };

/* The parsed packet, per CPU. Not on the stack: what the parse stores in a
 * map value is unknown to the verifier afterwards, so every way the parse can
 * end (each exit of the extension-header loop, v4 or v6, ports or none, the
 * fast parse or the full one) reaches the lookups in the same state, and the
 * verifier walks them (and their rule and compare-and-swap loops) once
 * instead of once per exit: without it the program took 97% of the
 * verifier's million instructions and a fast parse did not fit. One program
 * run per CPU at a time, as tg_stats assumes too (no PREEMPT_RT). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct tg_pkt);
} tg_scratch SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct tg_info);
} tg_info SEC(".maps");

static __always_inline void stat_add(__u32 id, __u64 bytes)
{
	struct tg_stat *s = bpf_map_lookup_elem(&tg_stats, &id);

	if (s) { /* per-CPU: no other writer, no atomics needed */
		s->packets += 1;
		s->bytes += bytes;
	}
}

/* Counter idx moved: its bit in tg_dirty (see the header comment). */
static __always_inline void mark_dirty(__u32 idx)
{
	__u32 w = idx / 64;
	__u64 bit = 1ULL << (idx % 64);
	__u64 *d = bpf_map_lookup_elem(&tg_dirty, &w);

	if (d && !(*(volatile __u64 *)d & bit))
		__sync_fetch_and_or(d, bit);
}

/* The kernel's own types, only the fields read here: no vmlinux.h; CO-RE (preserve_access_index) relocates
 * each access against the running kernel's BTF at load. */
struct net;
struct tg_possible_net {
	struct net *net;
};
struct net_device {
	struct tg_possible_net nd_net;
} __attribute__((preserve_access_index));
struct sk_buff {
	unsigned int len;
	struct net_device *dev;
	__u16 tc_index;
} __attribute__((preserve_access_index));

/* A kfunc (kernel >= 6.3): the struct sk_buff behind the program's context. Weak: an object that
 * holds it still opens where it is missing, and the loader then loads the programs without refunds. */
extern void *bpf_cast_to_kern_ctx(void *obj) __ksym __weak;

/* A packet passed and counted at index idx: remembered as this CPU's last of the direction, and marked
 * (see "Refunds"). The mark goes into tc_classid, which tc turns into skb->tc_index once the program
 * returns TC_ACT_OK (TC_H_MIN of the classid: net/core/dev.c, tc_run; cls_bpf sets the classid to the
 * filter's, 0, before each run, so an unmarked packet leaves with the other direction's byte kept only
 * at egress, where tollgate() copies it first). */
static __always_inline void remember(struct __sk_buff *skb, __u32 direction, __u32 idx, __u64 len)
{
	struct tg_inflight *f = bpf_map_lookup_elem(&tg_inflight, &direction);
	struct sk_buff *k;
	__u32 seq;

	if (!f)
		return;
	k = bpf_cast_to_kern_ctx(skb);
	seq = (f->seq & 0xff) + 1;
	if (seq > 0xff)
		seq = 1;
	f->skb = 0; /* while the entry changes, it matches no skb */
	f->seq = seq;
	f->idx = idx;
	f->len = (__u32)len;
	f->net = (__u64)k->dev->nd_net.net;
	f->skb = (__u64)k;
	if (direction == 0)
		skb->tc_classid = seq;
	else
		skb->tc_classid = (skb->tc_index & 0xff) | (seq << 8);
}

static __always_inline int is_ext_hdr(__u8 proto)
{
	return proto == 0 || proto == 43 || proto == 44 || proto == 51 || proto == 60;
}

static __always_inline int has_port_proto(__u8 proto)
{
	return proto == 6 || proto == 17 || proto == 132 || proto == 136;
}

/* The common case in one read: an untagged frame of at least FAST_LEN bytes
 * whose IPv4 header has no options or whose IPv6 header is followed by no
 * extension header, well-formed. Each helper call costs ~8 ns; parse() takes
 * four. Everything else (tags, options, extension headers, short or
 * malformed packets) returns PARSE_NONIP here and goes through parse(),
 * whose result this must equal wherever it answers PARSE_OK (the oracle
 * test: tests/linux/test_bpf_oracle.py). */
#define FAST_LEN (ETH_HLEN + 44) /* from the EtherType: 2 + 40 (IPv6) + 4 (ports) */
static __always_inline int parse_fast(struct __sk_buff *skb, struct tg_pkt *p)
{
	__u8 w[FAST_LEN - 12];
	__u32 n, length, l4;
	__u16 eth_proto;
	int first_fragment = 1;

	if (skb->len < FAST_LEN || bpf_skb_load_bytes(skb, 12, w, sizeof(w)))
		return PARSE_NONIP;
	eth_proto = ((__u16)w[0] << 8) | w[1];
	if (eth_proto != ETH_P_IP && eth_proto != ETH_P_IPV6)
		return PARSE_NONIP;
	n = skb->len - ETH_HLEN;
	if (n > TG_MAX_WIRE_LEN)
		return PARSE_NONIP;
	if (w[2] == 0x45) { /* IPv4, IHL 5 */
		length = ((__u32)w[4] << 8) | w[5];
		if (length < 20 || length > n)
			return PARSE_NONIP;
		first_fragment = ((((__u32)w[8] << 8) | w[9]) & 0x1fff) == 0;
		p->proto = w[11];
		p->v6 = 0;
		__builtin_memcpy(p->src, &w[14], 4);
		__builtin_memcpy(p->dst, &w[18], 4);
		l4 = 20;
	} else if ((w[2] >> 4) == 6) {
		__u32 payload = ((__u32)w[6] << 8) | w[7];

		length = payload == 0 ? n : 40 + payload;
		if (length > n || is_ext_hdr(w[8]))
			return PARSE_NONIP;
		p->proto = w[8];
		p->v6 = 1;
		__builtin_memcpy(p->src, &w[10], 16);
		__builtin_memcpy(p->dst, &w[26], 16);
		l4 = 40;
	} else {
		return PARSE_NONIP;
	}
	p->length = length;
	/* n >= 44 >= l4 + 4: the ports are in w */
	p->has_ports = first_fragment && has_port_proto(p->proto);
	p->sport = p->dport = 0;
	if (p->has_ports) {
		p->sport = ((__u16)w[2 + l4] << 8) | w[3 + l4];
		p->dport = ((__u16)w[4 + l4] << 8) | w[5 + l4];
	}
	return PARSE_OK;
}

/* The engine's parse_packet (see the header comment); *wirelen is set for
 * the malformed count as well. */
static __always_inline int parse(struct __sk_buff *skb, struct tg_pkt *p, __u32 *wirelen)
{
	__u32 off = ETH_HLEN, n, l4, length;
	__u16 eth_proto;
	__u8 hdr[40];
	int first_fragment = 1;

	if (bpf_skb_load_bytes(skb, 12, &eth_proto, 2))
		return PARSE_NONIP;
	if (eth_proto == bpf_htons(ETH_P_8021Q) || eth_proto == bpf_htons(ETH_P_8021AD)) {
		if (bpf_skb_load_bytes(skb, 16, &eth_proto, 2))
			return PARSE_NONIP;
		off = ETH_HLEN + 4;
	}
	if (eth_proto != bpf_htons(ETH_P_IP) && eth_proto != bpf_htons(ETH_P_IPV6))
		return PARSE_NONIP;
	if (skb->len < off)
		return PARSE_NONIP;
	n = skb->len - off;
	*wirelen = n;
	if (n < 1 || n > TG_MAX_WIRE_LEN)
		return PARSE_MALFORMED;
	if (bpf_skb_load_bytes(skb, off, hdr, 1))
		return PARSE_MALFORMED;
	if ((hdr[0] >> 4) == 4) {
		__u32 ihl, total;

		if (n < 20 || bpf_skb_load_bytes(skb, off, hdr, 20))
			return PARSE_MALFORMED;
		ihl = (hdr[0] & 0x0f) * 4;
		total = ((__u32)hdr[2] << 8) | hdr[3];
		if (ihl < 20 || total < ihl || total > n)
			return PARSE_MALFORMED;
		length = total;
		l4 = ihl;
		first_fragment = ((((__u32)hdr[6] << 8) | hdr[7]) & 0x1fff) == 0;
		p->proto = hdr[9];
		p->v6 = 0;
		__builtin_memcpy(p->src, &hdr[12], 4);
		__builtin_memcpy(p->dst, &hdr[16], 4);
	} else if ((hdr[0] >> 4) == 6) {
		__u32 payload;
		__u8 proto;
		int i;

		if (n < 40 || bpf_skb_load_bytes(skb, off, hdr, 40))
			return PARSE_MALFORMED;
		payload = ((__u32)hdr[4] << 8) | hdr[5];
		/* jumbo (RFC 2675) or BIG TCP: only the wire length tells */
		length = payload == 0 ? n : 40 + payload;
		if (length > n)
			return PARSE_MALFORMED;
		proto = hdr[6];
		p->v6 = 1;
		__builtin_memcpy(p->src, &hdr[8], 16);
		__builtin_memcpy(p->dst, &hdr[24], 16);
		l4 = 40;
		for (i = 0; i < TG_MAX_EXT_HDRS; i++) {
			__u8 ext[4];
			__u32 hdrlen;

			if (!is_ext_hdr(proto))
				break;
			if (l4 + 8 > n) /* runs past the packet: no ports, not malformed */
				break;
			if (bpf_skb_load_bytes(skb, off + l4, ext, 4))
				break;
			if (proto == 44) { /* fragment: offset in the upper 13 bits */
				first_fragment = ((((__u32)ext[2] << 8) | ext[3]) & 0xfff8) == 0;
				hdrlen = 8;
			} else if (proto == 51) { /* AH counts 4-octet units, RFC 4302 */
				hdrlen = ((__u32)ext[1] + 2) * 4;
			} else {
				hdrlen = ((__u32)ext[1] + 1) * 8;
			}
			proto = ext[0];
			l4 += hdrlen;
		}
		p->proto = proto;
	} else {
		return PARSE_MALFORMED;
	}
	if (length == 0) /* IPv4 BIG TCP: tot_len 0 */
		length = n;
	p->length = length;
	p->has_ports = first_fragment && has_port_proto(p->proto) && l4 + 4 <= n;
	p->sport = p->dport = 0;
	if (p->has_ports) {
		__u8 ports[4];

		if (bpf_skb_load_bytes(skb, off + l4, ports, 4)) {
			p->has_ports = 0;
		} else {
			p->sport = ((__u16)ports[0] << 8) | ports[1];
			p->dport = ((__u16)ports[2] << 8) | ports[3];
		}
	}
	return PARSE_OK;
}

static __always_inline struct tg_sub *lookup_sub(const struct tg_pkt *p, const __u8 *addr, __u32 flags)
{
	struct tg_sub *s, *lpm = NULL;

	if (!p->v6) {
		struct tg_lpm4 k4 = {.prefixlen = 32};
		__u32 a;

		__builtin_memcpy(&a, addr, 4);
		s = bpf_map_lookup_elem(&tg_sub4, &a);
		if (s || !(flags & TG_F_SUB4_LPM))
			return s;
		__builtin_memcpy(k4.addr, addr, 4);
		return bpf_map_lookup_elem(&tg_sub4_lpm, &k4);
	}
	if (flags & TG_F_SUB6_HOST) {
		s = bpf_map_lookup_elem(&tg_sub6, addr);
		if (s)
			return s;
	}
	{
		struct tg_lpm6 k6 = {.prefixlen = 128};
		__u64 hi;

		__builtin_memcpy(k6.addr, addr, 16);
		if (flags & TG_F_SUB6_LONG) {
			lpm = bpf_map_lookup_elem(&tg_sub6_lpm, &k6);
			if (lpm && lpm->plen > 64)
				return lpm;
		}
		__builtin_memcpy(&hi, addr, 8);
		s = bpf_map_lookup_elem(&tg_sub6_64, &hi);
		if (s || (flags & TG_F_SUB6_LONG) || !(flags & TG_F_SUB6_LPM))
			return s ? s : lpm;
		return bpf_map_lookup_elem(&tg_sub6_lpm, &k6);
	}
}

/* Destinations no router forwards: IPv4 multicast 224.0.0.0/4, the limited
 * broadcast, link-local 169.254.0.0/16 and loopback 127.0.0.0/8; IPv6
 * multicast ff00::/8 and link-local fe80::/10. Tested here rather than as
 * not-forwarded zone rules: at the top of the zone trie they lengthened every
 * lookup's walk (~10 ns for IPv4). */
static __always_inline int never_forwarded(const struct tg_pkt *p)
{
	__u8 a = p->dst[0], b = p->dst[1];

	if (p->v6)
		return a == 0xff || (a == 0xfe && (b & 0xc0) == 0x80);
	if ((a & 0xf0) == 0xe0 || a == 127 || (a == 169 && b == 254))
		return 1;
	return a == 0xff && b == 0xff && p->dst[2] == 0xff && p->dst[3] == 0xff;
}

static __always_inline int rule_matches(const struct tg_rule *r, const struct tg_pkt *p, __u16 port)
{
	if (r->proto && r->proto != p->proto)
		return 0;
	if (r->port_lo == 0 && r->port_hi == 65535)
		return 1;
	return p->has_ports && r->port_lo <= port && port <= r->port_hi;
}

/* The first matching rule, longest prefix first: returns the group's rule's
 * zone, or -1. `groups` is tg_zone_groups or tg_allow_groups; the group of a
 * prefix is at `base` + the index the trie holds. */
static __always_inline int match_rules(void *lpm4, void *lpm6, void *groups, const struct tg_pkt *p,
				       const __u8 *addr, __u16 port, __u32 base)
{
	struct tg_group *g;
	__u32 *first, gi;
	int r;

	if (p->v6) {
		struct tg_lpm6 k6 = {.prefixlen = 128};

		__builtin_memcpy(k6.addr, addr, 16);
		first = bpf_map_lookup_elem(lpm6, &k6);
	} else {
		struct tg_lpm4 k4 = {.prefixlen = 32};

		__builtin_memcpy(k4.addr, addr, 4);
		first = bpf_map_lookup_elem(lpm4, &k4);
	}
	if (!first)
		return -1;
	gi = *first + base;
	g = bpf_map_lookup_elem(groups, &gi);
	if (!g)
		return -1;
	for (r = 0; r < TG_MAX_RULES; r++) {
		if (r >= g->n_rules)
			break;
		if (rule_matches(&g->rules[r], p, port))
			return g->rules[r].zone;
	}
	return -1;
}

static __always_inline int tollgate(struct __sk_buff *skb, const __u32 direction, const int refunds)
{
	struct tg_pkt *p;
	struct tg_info *info;
	struct tg_sub *sub;
	struct tg_counter *c;
	const __u8 *local, *remote;
	__u32 zero = 0, wirelen = 0, zone, idx;
	__u16 port;
	__u64 len;
	int z, i;

	if (refunds && direction == 1) /* tc_index keeps the ingress mark of a packet not counted here */
		skb->tc_classid = skb->tc_index;
	if (direction == 1 && skb->ingress_ifindex == 0) { /* sent by the gateway itself */
		stat_add(STAT_LOCAL, skb->len);
		return TC_ACT_OK;
	}
	info = bpf_map_lookup_elem(&tg_info, &zero);
	p = bpf_map_lookup_elem(&tg_scratch, &zero);
	if (!info || !p || info->magic != TG_MAGIC || info->n_zones == 0) {
		stat_add(STAT_UNCONFIGURED, skb->len);
		return TC_ACT_OK;
	}
	switch (parse_fast(skb, p) == PARSE_OK ? PARSE_OK : parse(skb, p, &wirelen)) {
	case PARSE_NONIP:
		stat_add(STAT_NONIP, skb->len);
		return TC_ACT_OK;
	case PARSE_MALFORMED:
		stat_add(STAT_MALFORMED, wirelen);
		return info->flags & TG_F_MALFORMED_DROP ? TC_ACT_SHOT : TC_ACT_OK;
	}
	len = p->length;
	/* upload: the subscriber is the source, rated in the destination's zone */
	local = direction == 0 ? p->src : p->dst;
	remote = direction == 0 ? p->dst : p->src;
	port = direction == 0 ? p->dport : p->sport;
	sub = lookup_sub(p, local, info->flags);
	if (!sub) {
		stat_add(STAT_UNKNOWN, len);
		if (!(info->flags & TG_F_UNKNOWN_DROP))
			return TC_ACT_OK;
		/* The unknown verdict is the forward hook's (the nfqueue path sees nothing else): what an
		 * unknown address sends to the gateway itself (neighbour discovery from a link-local source,
		 * DHCP, DNS) passes, or no address nobody owns yet could ever get one. The zone lookup only
		 * on this path: a known subscriber's packets pay nothing for it. */
		if (direction == 0 && (never_forwarded(p) ||
				       match_rules(&tg_zone4, &tg_zone6, &tg_zone_groups, p, remote, port, 0) ==
				       TG_ZONE_NOT_FORWARDED))
			return TC_ACT_OK;
		return TC_ACT_SHOT;
	}
	if (direction == 0 && never_forwarded(p)) {
		stat_add(STAT_LOCAL, len);
		return TC_ACT_OK;
	}
	z = match_rules(&tg_zone4, &tg_zone6, &tg_zone_groups, p, remote, port,
			direction == 0 ? 0 : info->egress_groups);
	if (z == TG_ZONE_NOT_FORWARDED) { /* to the gateway itself */
		stat_add(STAT_LOCAL, len);
		return TC_ACT_OK;
	}
	zone = z < 0 ? info->default_zone : (__u32)z;
	if (sub->slot >= info->max_slots || zone >= info->n_zones) {
		stat_add(STAT_NOSLOT, len);
		return TC_ACT_SHOT;
	}
	if (direction == 0 && (info->flags & TG_F_ANY_BLOCKED)) { /* to a blocked subscriber? */
		struct tg_sub *dst = lookup_sub(p, p->dst, info->flags);

		if (dst && dst->slot < info->max_slots) {
			/* the flags are the slot's, in every entry: read from its zone-0 download */
			idx = dst->slot * info->n_zones * 2 + 1;
			c = bpf_map_lookup_elem(&tg_counters, &idx);
			if (c && (c->flags & TG_C_BLOCKED) &&
			    match_rules(&tg_allow4, &tg_allow6, &tg_allow_groups, p, p->src, p->sport, 0) < 0) {
				/* the receiver's refusal, in the zone its egress rates the packet in (remote:
				 * the sender, egress groups), as its refusals at egress are counted */
				z = match_rules(&tg_zone4, &tg_zone6, &tg_zone_groups, p, p->src, p->sport,
						info->egress_groups);
				zone = z < 0 ? info->default_zone : (__u32)z;
				idx += zone * 2;
				c = zone < info->n_zones ? bpf_map_lookup_elem(&tg_counters, &idx) : NULL;
				if (c)
					goto drop;
				stat_add(STAT_NOSLOT, len);
				return TC_ACT_SHOT;
			}
		}
	}
	idx = (sub->slot * info->n_zones + zone) * 2 + direction;
	c = bpf_map_lookup_elem(&tg_counters, &idx);
	if (!c) {
		stat_add(STAT_NOSLOT, len);
		return TC_ACT_SHOT;
	}
	if (c->flags & TG_C_BLOCKED) {
		if (match_rules(&tg_allow4, &tg_allow6, &tg_allow_groups, p, remote, port, 0) >= 0) {
			__sync_fetch_and_add(&c->allowed_bytes, len);
			__sync_fetch_and_add(&c->allowed_packets, 1);
			mark_dirty(idx);
			stat_add(STAT_ALLOWED, len);
			return TC_ACT_OK;
		}
		/* nft sends it to the block page and never forwards it (see "Redirected") */
		if (direction == 0 && (c->flags & TG_C_REDIRECTED) && p->proto == 6 && p->has_ports &&
		    p->dport == TG_HTTP_PORT) {
			stat_add(STAT_REDIRECTED, len);
			return TC_ACT_OK;
		}
		goto drop;
	}
	for (i = 0; i < TG_CAS_RETRIES; i++) {
		__u64 used = *(volatile __u64 *)&c->used;
		__u64 grant = *(volatile __u64 *)&c->grant;

		if (used > grant || len > grant - used)
			goto drop;
		if (__sync_val_compare_and_swap(&c->used, used, used + len) == used) {
			__sync_fetch_and_add(&c->packets, 1);
			mark_dirty(idx);
			stat_add(STAT_PASSED, len);
			if (refunds)
				remember(skb, direction, idx, len);
			return TC_ACT_OK;
		}
	}
	stat_add(STAT_CAS_EXHAUSTED, len);
drop:
	__sync_fetch_and_add(&c->dropped_bytes, len);
	__sync_fetch_and_add(&c->dropped_packets, 1);
	mark_dirty(idx);
	stat_add(STAT_DROPPED, len);
	return TC_ACT_SHOT;
}

SEC("tc")
int tollgate_ingress(struct __sk_buff *skb)
{
	return tollgate(skb, 0, 1); /* UPLOAD */
}

SEC("tc")
int tollgate_egress(struct __sk_buff *skb)
{
	return tollgate(skb, 1, 1); /* DOWNLOAD */
}

/* The same without refunds, for a kernel without bpf_cast_to_kern_ctx or BTF (the loader's fallback,
 * pinned under the names above). */
SEC("tc")
int tollgate_ingress_plain(struct __sk_buff *skb)
{
	return tollgate(skb, 0, 0);
}

SEC("tc")
int tollgate_egress_plain(struct __sk_buff *skb)
{
	return tollgate(skb, 1, 0);
}

/* A dropped skb against this CPU's last packet counted in direction d (see "Refunds"). */
static __always_inline void refund(struct sk_buff *skb, const __u32 d)
{
	__u32 key = d, idx;
	struct tg_inflight *f = bpf_map_lookup_elem(&tg_inflight, &key);
	struct net_device *dev;
	struct tg_refund *r;

	if (!f || f->skb != (__u64)skb)
		return;
	f->skb = 0; /* this skb is gone, whatever follows */
	dev = skb->dev;
	/* dropped in another namespace (the far end of a veth, in the lab): delivered by the gateway */
	if (!dev || (__u64)dev->nd_net.net != f->net)
		return;
	/* another packet in the memory of the one counted (freed unseen, allocated again): not ours */
	if (((skb->tc_index >> (8 * d)) & 0xff) != f->seq)
		return;
	idx = f->idx;
	r = bpf_map_lookup_elem(&tg_refunds, &idx);
	if (!r)
		return;
	__sync_fetch_and_add(&r->bytes, f->len);
	__sync_fetch_and_add(&r->packets, 1);
	stat_add(STAT_REFUNDED, f->len);
}

/* The kernel drops an skb (skb:kfree_skb; a packet delivered or sent on is consume_skb, another tracepoint:
 * only drops run this). If it is the last packet this CPU counted in a direction, still marked as counted
 * and dropped in the namespace that counted it, what it was counted with is refunded (see "Refunds"). A
 * packet between two subscribers may be both (an upload at one interface, a download at the other). */
SEC("tp_btf/kfree_skb")
int BPF_PROG(tollgate_drop, struct sk_buff *skb, void *location, int reason)
{
	refund(skb, 0);
	refund(skb, 1);
	return 0;
}

char _license[] SEC("license") = "GPL";
