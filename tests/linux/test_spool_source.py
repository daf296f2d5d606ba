"""`tollgate run --source spool`: files charged exactly once through SIGKILLs
at random moments, malformed ones set aside with nothing charged."""

from __future__ import annotations

import random
import signal
import sqlite3
import threading
import time

from lablib import Gateway, lab_config, ledger_bytes, netns



def test_each_file_exactly_once_through_sigkills(lab, tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    rng = random.Random(7)
    expected = {f"s{i}": 0 for i in range(1, lab.n + 1)}
    files = []
    for k in range(120):
        lines = ["SRC_IP,DST_IP,SRC_PORT,DST_PORT,PROTOCOL,PACKETS,BYTES"]
        for _ in range(rng.randint(1, 50)):
            i = rng.randint(1, lab.n)
            nbytes = rng.randint(40, 5_000_000)
            lines.append(f"198.18.0.2,{lab.sub_addr4(i)},80,{40000 + k},tcp,{nbytes // 1000 + 1},{nbytes}")
            expected[f"s{i}"] += nbytes
        files.append((f"flows-{k:03d}.csv", "\n".join(lines) + "\n"))
    files.insert(60, ("broken.csv", "SRC_IP,DST_IP,BYTES\n198.18.0.2,100.64.1.2,100\n198.18.0.2,nowhere,5\n"))
    files.insert(90, ("copy-of-7.csv", files[7][1]))

    def writer():  # a collector dropping files while the gateway is killed and restarted
        for name, text in files:
            tmp = spool / (name + ".tmp")
            tmp.write_text(text)
            tmp.rename(spool / name)  # written under another name, then renamed, as writers should
            time.sleep(0.04)

    dropping = threading.Thread(target=writer)
    dropping.start()

    gw = Gateway(lab.gw, tmp_path, lab_config(lab.n), ["--source", "spool", "-o", f"dir={spool}", "-o",
                                                       "settle=0", "-o", "interval=0.05"])
    kills = 0
    try:
        while dropping.is_alive() or kills < 3:  # killed mid-way, again and again
            gw.start()
            time.sleep(rng.uniform(0.2, 1.6))  # flushes are a second apart: some rated files die unflushed
            gw.stop(signal.SIGKILL)
            kills += 1
        dropping.join()
        gw.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(list((spool / "done").iterdir())) < 121:
            time.sleep(0.2)
        time.sleep(1.5)  # the last flush
    finally:
        gw.stop()
        netns(lab.gw, "sh", "-c", "nft delete table inet tollgate")
    assert len(list((spool / "done").iterdir())) == 121  # every file and the duplicate
    assert sorted(p.name for p in (spool / "failed").iterdir()) == ["broken.csv", "broken.csv.error"]
    assert "line 3: destination address 'nowhere'" in (spool / "failed" / "broken.csv.error").read_text()
    assert not list((spool / ".work").iterdir())
    assert ledger_bytes(gw.db) == expected, f"after {kills} SIGKILLs"
    con = sqlite3.connect(gw.db)
    assert con.execute("SELECT count(*) FROM ingested_files").fetchone() == (120,)
    con.close()
