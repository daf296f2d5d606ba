"""Constants shared by the compiled engine, its pure-Python twin and callers.

Kernel values keep their kernel names (``NF_DROP``/``NF_ACCEPT`` from
``include/uapi/linux/netfilter.h``). ``engine.pxd`` declares the same numbers
for the compiled side; ``tests/unit/test_engine_contract.py`` checks they agree.
"""

# Verdicts, as nfnetlink_queue expects them (include/uapi/linux/netfilter.h).
NF_DROP = 0
NF_ACCEPT = 1

# Direction of a packet as seen from the subscriber it is counted for.
UPLOAD = 0  # the subscriber is the source
DOWNLOAD = 1  # the subscriber is the destination
DIRECTIONS = ("upload", "download")

# Why a subscriber is blocked: a bit mask, so a manual block and a spent
# balance can hold at the same time and be lifted independently.
BLOCK_LIMIT = 1  # balance would fall below minus the credit limit
BLOCK_MANUAL = 2  # an operator said so
BLOCK_VOLUME = 4  # the period's volume limit is used up
BLOCK_SCHEDULE = 8  # outside the hours when access is allowed
BLOCK_REASONS = {BLOCK_LIMIT: "limit", BLOCK_MANUAL: "manual", BLOCK_VOLUME: "volume", BLOCK_SCHEDULE: "schedule"}
BLOCK_ANY = BLOCK_LIMIT | BLOCK_MANUAL | BLOCK_VOLUME | BLOCK_SCHEDULE

# Event kinds emitted by the engine.
EV_BLOCK = 1
EV_UNBLOCK = 2
EV_WARN = 3
EVENT_KINDS = {EV_BLOCK: "block", EV_UNBLOCK: "unblock", EV_WARN: "warn"}

# A price is an integer number of minor units per PRICE_SCALE bytes... put
# differently: minor units per byte, fixed point with six decimals. With nano
# minor units that is 1e-15 of the currency per byte (1e-6 per GB).
PRICE_SCALE = 1_000_000
MAX_PRICE = (1 << 40) - 1  # keeps length * price + carry inside int64
MAX_WIRE_LEN = 1 << 20  # longer "packets" are malformed; GSO tops out at 512 KiB

# Undrained packets of one counter: the compiled engine keeps them in the 44
# bits above the carry (tg_counter.packets_carry); rate_volume refuses more.
MAX_COUNTER_PACKETS = (1 << 44) - 1

MAX_BUCKETS = 4  # allowance buckets per tariff
MAX_WARN_LEVELS = 4  # warning thresholds per tariff
MAX_SUBSCRIBER_ID = (1 << 24) - 1  # ids index dense arrays in the engine
# A subscriber table's text (gateway/subscriber_table.py's TextArena) is a 64-bit word per slot, start << this |
# length; ext/bpfmaps.pyx reads the networks' texts straight from the arena by the same packing.
TEXT_LENGTH_BITS = 24

# IP protocol numbers that carry ports at the start of their header.
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58
IPPROTO_SCTP = 132
IPPROTO_UDPLITE = 136
PORT_PROTOCOLS = frozenset({IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP, IPPROTO_UDPLITE})

# IPv6 extension headers the parser walks over to find the transport header
# (RFC 8200 section 4; AH per RFC 4302 counts its length in 4-octet units).
IPV6_HOPOPTS = 0
IPV6_ROUTING = 43
IPV6_FRAGMENT = 44
IPV6_AH = 51
IPV6_DSTOPTS = 60
