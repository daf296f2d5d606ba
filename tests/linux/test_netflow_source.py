"""`tollgate run --source netflow` in the lab's gateway namespace: NetFlow v9
records sent to it over UDP are charged to the subscribers they name."""

from __future__ import annotations

import sqlite3
import sys
import time

from lablib import REPO, Gateway, lab_config, netns

SEND = """
import socket, struct, sys
sys.path.insert(0, sys.argv[1])
from test_netflow import TEMPLATE, flowset, records, template_body, v9
flows = [("100.64.1.2", "198.18.0.2", 6, 40000, 80, 123_456, 100),
         ("198.18.0.2", "100.64.2.2", 17, 53, 5000, 2_000_000, 1500)]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(v9(0, flowset(0, template_body(300, TEMPLATE))), ("127.0.0.1", 2055))
s.sendto(v9(1, flowset(300, records(flows))), ("127.0.0.1", 2055))
"""


def test_netflow_records_are_charged(lab, tmp_path):
    gw = Gateway(lab.gw, tmp_path, lab_config(2), ["--source", "netflow", "-o", "listen=127.0.0.1:2055"]).start()
    try:
        netns(lab.gw, sys.executable, "-c", SEND, str(REPO / "tests" / "unit"), check=True)
        time.sleep(2.5)  # a flush
        con = sqlite3.connect(gw.db)
        got = dict(con.execute("SELECT s.name, sum(u.bytes) FROM usage u JOIN subscribers s ON s.id = u.subscriber_id "
                               "GROUP BY s.id"))
        con.close()
        assert got == {"s1": 123_456, "s2": 2_000_000}
    finally:
        gw.stop()
        netns(lab.gw, "sh", "-c", "nft delete table inet tollgate")
