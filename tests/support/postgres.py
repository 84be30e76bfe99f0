"""A throw-away PostgreSQL server for tests: initdb into a temporary directory, a Unix
socket only (no TCP), torn down after.

PostgreSQL refuses to run as root, so as root the cluster belongs to `nobody` and
every server command runs through `runuser -u nobody`. The superuser `postgres`
trusts local connections; the role `farm` (the Managers' role, owner of the database
`farm`) logs in with a password that the tests hand over in a passfile (PGPASSFILE),
as production would.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

FARM_PASSWORD = "farm-test-password"


def pg_bindir() -> Path | None:
    """Where initdb and pg_ctl are (Debian keeps them under /usr/lib/postgresql/N/bin)."""
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                  key=lambda d: int(Path(d).parent.name) if Path(d).parent.name.isdigit() else 0)
    for d in reversed(dirs):
        if (Path(d) / "initdb").exists():
            return Path(d)
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    return None


class Postgres:
    """One cluster: `start()`, `stop()`, `restart()`, `cleanup()`; `conninfo` for farm."""

    def __init__(self, fsync: bool = True) -> None:
        bindir = pg_bindir()
        if bindir is None:
            raise FileNotFoundError("PostgreSQL is not installed (scripts/sysdeps.sh)")
        self.bin = bindir
        self.fsync = fsync
        # A short path: the socket name must fit in ~107 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.passfile = self.dir / "pgpass"
        self.user = "nobody" if os.geteuid() == 0 else None
        if self.user is not None:
            pw = pwd.getpwnam(self.user)
            os.chmod(self.dir, 0o755)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self.proc_started = False
        try:
            self._initdb()
        except BaseException:
            self.cleanup()
            raise

    # ------------------------------------------------------------ commands

    def _as_owner(self, *args: str) -> list[str]:
        cmd = [str(a) for a in args]
        if self.user is None:
            return cmd
        return ["runuser", "-u", self.user, "--", *cmd]

    def _run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self._as_owner(*args), capture_output=True, text=True,
                              timeout=timeout, cwd=str(self.dir))
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({proc.returncode}): "
                               f"{proc.stderr.strip() or proc.stdout.strip()}\n{self.tail()}")
        return proc

    def _initdb(self) -> None:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                  "--auth-local=trust", "--auth-host=reject", "-E", "UTF8",
                  "--no-locale", "--no-instructions")
        hba = self.data / "pg_hba.conf"
        hba.write_text("local all postgres trust\n"
                       "local all all scram-sha-256\n")
        conf = self.data / "postgresql.conf"
        with open(conf, "a") as f:
            f.write(f"\nlisten_addresses = ''\nunix_socket_directories = '{self.dir}'\n"
                    "max_connections = 200\nshared_buffers = 64MB\n"
                    f"fsync = {'on' if self.fsync else 'off'}\n"
                    "log_min_messages = warning\n")
        self.start()
        self.psql_admin(f"CREATE ROLE farm LOGIN PASSWORD '{FARM_PASSWORD}'")
        self.psql_admin("CREATE DATABASE farm OWNER farm")
        self.passfile.write_text(f"*:*:*:farm:{FARM_PASSWORD}\n")
        os.chmod(self.passfile, 0o600)

    def start(self, timeout: float = 30.0) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                  "-w", "-t", str(int(timeout)), "start", timeout=timeout + 10)
        self.proc_started = True

    def stop(self, mode: str = "fast") -> None:
        if not self.proc_started:
            return
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")
        self.proc_started = False

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        try:
            if self.proc_started:
                self.stop("immediate")
        except Exception:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    # ------------------------------------------------------------ connecting

    @property
    def conninfo(self) -> str:
        """The Managers' connection string: no password (it comes from the passfile)."""
        return f"host={self.dir} dbname=farm user=farm"

    @property
    def uri(self) -> str:
        """The same as a URI, with the passfile named in it."""
        from urllib.parse import quote
        return (f"postgresql://farm@/farm?host={quote(str(self.dir), safe='')}"
                f"&passfile={quote(str(self.passfile), safe='')}")

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["PGPASSFILE"] = str(self.passfile)
        return env

    def psql_admin(self, sql: str, db: str = "postgres") -> str:
        """Run SQL as the superuser over the socket; returns the output (unaligned)."""
        proc = subprocess.run([str(self.bin / "psql"), "-X", "-q", "-A", "-t",
                               "-v", "ON_ERROR_STOP=1", "-h", str(self.dir), "-U", "postgres",
                               "-d", db, "-c", sql],
                              capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"psql failed: {proc.stderr.strip()}")
        return proc.stdout

    def farm_sql(self, sql: str) -> str:
        return self.psql_admin(sql, db="farm")

    def wait_ready(self, within: float = 30.0) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            proc = subprocess.run([str(self.bin / "pg_isready"), "-h", str(self.dir)],
                                  capture_output=True)
            if proc.returncode == 0:
                return
            time.sleep(0.1)
        raise TimeoutError("PostgreSQL did not become ready")

    def __enter__(self) -> "Postgres":
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
