"""The fast network parser (ext/netaddr.py) gives what ipaddress gives, for
canonical text and for everything else: the same numbers, the same canonical
text, the same refusals."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ext import netaddr


def slow(text, strict: bool):
    try:
        net = ipaddress.ip_network(text, strict=strict)
    except (TypeError, ValueError):
        return "refused"
    return net.version, int(net.network_address), net.prefixlen, str(net)


def fast(text, strict: bool):
    try:
        version, value, plen = netaddr.parse(text, strict)
    except (TypeError, ValueError):
        return "refused"
    version2, addr, plen2 = netaddr.split(text)
    assert (version2, plen2) == (version, plen)
    canon = netaddr.canonical(text)
    assert canon == f"{addr}/{plen}"
    return version, value, plen, canon


networks = st.one_of(
    st.builds(lambda a, p: f"{ipaddress.IPv4Address(a)}/{p}", st.integers(0, 2**32 - 1), st.integers(0, 32)),
    st.builds(lambda a, p: f"{ipaddress.IPv6Address(a)}/{p}", st.integers(0, 2**128 - 1), st.integers(0, 128)),
    st.builds(lambda a, p: f"{ipaddress.IPv6Address(a).exploded}/{p}", st.integers(0, 2**128 - 1),
              st.integers(0, 128)),
    st.builds(lambda a, p: str(ipaddress.ip_network((a << 64, p), strict=False)), st.integers(0, 2**64 - 1),
              st.integers(0, 128)),
    st.text(alphabet="0123456789abcdef.:/%x ", max_size=45),
)


@settings(max_examples=3000, deadline=None)
@given(networks, st.booleans())
def test_the_fast_path_agrees_with_ipaddress(text, strict):
    assert fast(text, strict) == slow(text, strict)


@pytest.mark.parametrize("text", [
    "100.64.1.2/32", "100.64.0.0/10", "0.0.0.0/0", "255.255.255.255/32", "2001:db8:100:1::/64", "::/0", "::1/128",
    "::ffff:1.2.3.4/128", "::ffff:102:304/128", "100.64.1.2", "2001:db8::1", "100.64.1.2/24", "100.64.1.2/33",
    "100.64.1.2/032", "100.64.01.2/32", "2001:DB8::/32", "2001:0db8::/32", "1.2.3.4/ 32", "1.2.3.4/٣", "", "/",
    "fe80::1%eth0/128", 42, None, b"1.2.3.4/32", ipaddress.ip_network("100.64.0.0/24"),
])
@pytest.mark.parametrize("strict", [True, False])
def test_edges(text, strict):
    assert fast(text, strict) == slow(text, strict)
