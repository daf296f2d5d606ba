"""A throwaway PostgreSQL cluster for tests, benchmarks and the lab.

``initdb`` into a fresh temporary directory, a Unix socket in that directory,
a port of its own (it only names the socket: ``listen_addresses = ''``, so
nothing listens on TCP at all), started and stopped by whoever made it, and
removed afterwards. No system service is involved (no ``pg_ctlcluster``, no
``systemctl``), nothing of the host's configuration is read or written.

PostgreSQL refuses to run as root; when we are root the cluster runs as the
``postgres`` user that Debian's package creates (the directory is chowned to
it), otherwise as ourselves. Authentication is ``trust`` on the socket only,
and the socket is ``0700``: only that user (and root) can connect.

Durability is traded for speed as a test cluster may: ``fsync = off`` and
``full_page_writes = off`` (the OS page cache survives a killed server, not a
power cut). ``synchronous_commit`` stays ``on``: a commit is in the WAL
(written to the OS) before the client hears of it, so ``stop("immediate")``
(the server dies as if SIGKILLed, crash recovery at the next start) loses
nothing a client was told was committed, which is what the fault tests need.

Run alone (``python -m accounting.store.pgcluster``) it starts a cluster,
prints its conninfo and waits for Ctrl-C.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from ext.errors import TollgateError

__all__ = ["PgCluster", "PgClusterError", "find_bindir"]

SETTINGS = {
    "listen_addresses": "''",
    "unix_socket_permissions": "0700",
    "fsync": "off",
    "full_page_writes": "off",
    "synchronous_commit": "on",
    "max_connections": "60",
    "shared_buffers": "32MB",
    "max_wal_size": "256MB",
    "log_min_messages": "warning",
    "log_line_prefix": "'%m [%p] '",
}


class PgClusterError(TollgateError):
    """The throwaway cluster could not be created, started or stopped; the
    message carries the tool's output (and the server log's tail)."""


def find_bindir() -> Path | None:
    """The folder of ``initdb``/``pg_ctl``: ``$TOLLGATE_PG_BINDIR``, else
    Debian's newest ``/usr/lib/postgresql/<version>/bin``, else the PATH's."""
    env = os.environ.get("TOLLGATE_PG_BINDIR")
    if env:
        return Path(env) if (Path(env) / "initdb").exists() else None
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if found:
        newest = max(found, key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit()
                     else 0)
        return Path(newest).parent
    which = shutil.which("initdb")
    return Path(which).parent if which else None


def _free_port() -> int:
    # With listen_addresses = '' the port only names the socket (.s.PGSQL.<port>) in our own directory, so any
    # number would do; one that is free on 127.0.0.1 stays safe should someone turn TCP on, and is never 5432.
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port != 5432:
            return port


class PgCluster:
    """One throwaway cluster. ``PgCluster().start()``; ``close()`` stops and
    removes it (also as a context manager)."""

    def __init__(self, bindir: Path | str | None = None, port: int | None = None, user: str = "postgres") -> None:
        self.bindir = Path(bindir) if bindir else find_bindir()
        if self.bindir is None:
            raise PgClusterError("PostgreSQL is not installed (no initdb): Debian's `postgresql` package, "
                                 "or set TOLLGATE_PG_BINDIR")
        self.port = port or _free_port()
        self.dbuser = "postgres"  # the superuser initdb creates (-U)
        self._run_as = None
        if os.geteuid() == 0:
            try:
                self._run_as = pwd.getpwnam(user)
            except KeyError:
                raise PgClusterError(f"we are root and PostgreSQL refuses root; there is no {user!r} user to run "
                                     "it as") from None
        self.dir: Path | None = None
        self.running = False

    # ---- paths ---------------------------------------------------------------

    @property
    def data(self) -> Path:
        return self.dir / "data"

    @property
    def log(self) -> Path:
        return self.dir / "server.log"

    @property
    def conninfo(self) -> str:
        """libpq conninfo of the ``postgres`` database over the socket."""
        return self.conninfo_for("postgres")

    def conninfo_for(self, dbname: str) -> str:
        return f"host={self.dir} port={self.port} user={self.dbuser} dbname={dbname}"

    # ---- life ----------------------------------------------------------------

    def _tool(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        kwargs = {}
        if self._run_as is not None:
            kwargs = {"user": self._run_as.pw_uid, "group": self._run_as.pw_gid, "extra_groups": []}
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C"}
        try:
            return subprocess.run([str(self.bindir / args[0]), *args[1:]], cwd=self.dir, env=env, capture_output=True,
                                  text=True, timeout=timeout, check=True, **kwargs)
        except subprocess.CalledProcessError as exc:
            raise PgClusterError(f"{args[0]} {' '.join(args[1:3])} failed ({exc.returncode}): "
                                 f"{(exc.stdout + exc.stderr).strip()[-2000:]}{self._log_tail()}") from None
        except subprocess.TimeoutExpired:
            raise PgClusterError(f"{args[0]} did not finish in {timeout} s{self._log_tail()}") from None

    def _log_tail(self) -> str:
        try:
            return "\nserver log:\n" + self.log.read_text(errors="replace")[-2000:]
        except (OSError, TypeError):
            return ""

    def init(self) -> PgCluster:
        """Create the directory and the cluster (``initdb``), once."""
        if self.dir is not None:
            return self
        self.dir = Path(tempfile.mkdtemp(prefix="tollgate-pg-"))  # short: a socket path has ~107 bytes
        os.chmod(self.dir, 0o700)
        if self._run_as is not None:
            os.chown(self.dir, self._run_as.pw_uid, self._run_as.pw_gid)
        self._tool("initdb", "-D", str(self.data), "-U", self.dbuser, "-A", "trust", "-E", "UTF8", "--locale=C",
                   "--no-sync", "--no-instructions")
        settings = dict(SETTINGS, port=str(self.port), unix_socket_directories=f"'{self.dir}'")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write("\n# tollgate throwaway cluster (accounting/store/pgcluster.py)\n")
            for key, value in settings.items():
                conf.write(f"{key} = {value}\n")
        return self

    def start(self, timeout: float = 60) -> PgCluster:
        """Start the server and wait until it accepts connections (after crash recovery, if any)."""
        self.init()
        self._tool("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", str(int(timeout)), "start",
                   timeout=timeout + 10)
        self.running = True
        return self

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m fast|smart|immediate``; immediate is a crash: the server
        exits at once, clients see their connections drop, the next start recovers from the WAL."""
        if mode not in ("smart", "fast", "immediate"):
            raise PgClusterError(f"no stop mode {mode!r}")
        if not self.running:
            return
        self._tool("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop", timeout=70)
        self.running = False

    def restart(self) -> None:
        self.stop("fast")
        self.start()

    def create_database(self, name: str, template: str | None = None) -> str:
        """Create a database (optionally from a template); returns its conninfo."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.conninfo, autocommit=True) as conn:
            stmt = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
            if template:
                stmt = sql.SQL("{} TEMPLATE {}").format(stmt, sql.Identifier(template))
            conn.execute(stmt)
        return self.conninfo_for(name)

    def close(self) -> None:
        """Stop (fast, else immediate) and remove the directory."""
        try:
            if self.running:
                try:
                    self.stop("fast")
                except PgClusterError:
                    self.stop("immediate")
        finally:
            if self.dir is not None:
                shutil.rmtree(self.dir, ignore_errors=True)
                self.dir = None
            self.running = False

    def __enter__(self) -> PgCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def main() -> None:
    with PgCluster() as cluster:
        print(cluster.conninfo, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
