# Tollgate: two commands on a fresh machine.
#   make demo   - install everything, then show the gateway at work
#   make test   - install everything, then run the whole test suite
# Everything lands in .venv (the project installed editable, so .venv/bin/tollgate exists).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Debian packages the gateway, its tests and benches need (nft, the xtables NFQUEUE
# fallback, traffic tools for the lab, libnftables for python-nftables; softflowd,
# nfdump and pmacct to check our sources against; chromium for the portal test;
# clang, libbpf and bpftool for the tc/eBPF data path; libnetfilter-queue-dev for the
# NetfilterQueue baseline of make bench; dnsmasq, Kea, dhclient and
# radclient as the real DHCP and RADIUS peers of the session sources).
APT_PACKAGES := nftables libnftables1 iptables iproute2 iputils-ping iperf3 curl conntrack tcpdump poppler-utils faketime \
	softflowd nfdump pmacct chromium \
	clang llvm libbpf-dev bpftool libnetfilter-queue-dev \
	dnsmasq kea-dhcp4-server kea-dhcp6-server isc-dhcp-client freeradius-utils postgresql

.PHONY: all demo demo-replay test test-unit test-linux deps system-deps build bench clean

all: build

# The DHCP servers are installed as tools for the lab, never as host services:
# a policy-rc.d of our own (unless one exists) keeps apt from starting them.
system-deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "==> installing Debian packages:" $$missing; \
	  if [ "$$(id -u)" != 0 ]; then echo "need root to apt-get install $$missing"; exit 1; fi; \
	  rcd=/usr/sbin/policy-rc.d; own=; \
	  if [ ! -e $$rcd ]; then printf '#!/bin/sh\nexit 101\n' > $$rcd && chmod +x $$rcd && own=1; fi; \
	  apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null; rc=$$?; \
	  [ -n "$$own" ] && rm -f $$rcd; [ $$rc = 0 ] || exit $$rc; \
	fi

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.deps: setup.py pyproject.toml | $(BIN)/python
	@echo "==> installing Python packages into $(VENV)"
	$(BIN)/pip install -q --upgrade pip setuptools wheel "cython>=3.0"
	$(BIN)/pip install -q -e '.[test]' --no-build-isolation
	@touch $@

# The Cython build, in place, whenever a .pyx/.pxd/.h changes.
$(VENV)/.built: $(VENV)/.deps $(wildcard ext/*.pyx ext/*.pxd ext/*.h)
	@echo "==> building the Cython extensions"
	$(BIN)/python setup.py -q build_ext --inplace
	@touch $@

# The tc/eBPF program (ext/bpf/tollgate.bpf.c), loaded by ext/bpfmaps.pyx. No
# clang, no build: the data path must not go missing silently.
BPF_OBJ := ext/bpf/tollgate.bpf.o
BPF_CFLAGS := -O2 -g -target bpf -mcpu=v3 -Wall -Werror -I/usr/include/$(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_config_var("MULTIARCH") or "")')
$(BPF_OBJ): ext/bpf/tollgate.bpf.c
	@command -v clang >/dev/null || { echo "clang is missing: run \`make system-deps\` (Debian: clang llvm libbpf-dev)"; exit 1; }
	@echo "==> building the eBPF program $@"
	clang $(BPF_CFLAGS) -c $< -o $@

deps: system-deps $(VENV)/.deps
build: deps $(VENV)/.built $(BPF_OBJ)

test: build
	$(BIN)/python -m pytest -q --durations=25 tests

test-unit: build
	$(BIN)/python -m pytest -q tests/unit

test-linux: build
	$(BIN)/python -m pytest -q tests/linux

demo: build
	$(BIN)/python -m gateway.demo

# Two gateways sharing one PostgreSQL ledger (a throwaway cluster it starts and removes itself).
demo-cluster: build
	$(BIN)/python -m gateway.demo_cluster

demo-replay: build
	$(BIN)/python -m gateway.demo_replay

# The data-plane bench compares against Python NetfilterQueue (PyPI netfilterqueue, built against
# libnetfilter-queue-dev from system-deps): installed into the venv here, not for the gateway itself.
$(VENV)/.bench-deps: $(VENV)/.deps
	$(BIN)/pip install -q netfilterqueue
	@touch $@

bench: build $(VENV)/.bench-deps
	$(BIN)/python benches/bench_engine.py --markdown
	$(BIN)/python benches/bench_dataplane.py --markdown

clean:
	rm -rf build $(VENV) *.egg-info ext/*.c ext/*.so $(BPF_OBJ)
