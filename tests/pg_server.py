"""A throw-away PostgreSQL cluster for the test session (initdb + pg_ctl on 127.0.0.1).

initdb refuses to run as root, so as root the cluster belongs to the ``postgres`` user (made
by Debian's package) or ``nobody``, and commands run through ``runuser``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def find_pg_bin() -> Path | None:
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    return Path(candidates[0]).parent if candidates else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class PostgresServer:
    bin_dir: Path
    base: Path
    port: int = 0
    user: str | None = None  # OS user that owns the cluster when we are root
    # Crash-safe commits (fsync, synchronous_commit): for drills that kill the server.
    durable: bool = False

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = list(args)
        if self.user:
            command = ["runuser", "-u", self.user, "--", *command]
        return subprocess.run(command, check=True, capture_output=True, text=True, timeout=60)

    def start(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            self.user = next(
                (u for u in ("postgres", "nobody") if _user_exists(u)), None
            )
            owner = pwd.getpwnam(self.user) if self.user else None
            if owner:
                os.chown(self.base, owner.pw_uid, owner.pw_gid)
                os.chmod(self.base, 0o700)
        self.port = _free_port()
        self._run(str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", "postgres",
                  "-A", "trust", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync")
        self.resume()

    def resume(self) -> None:
        """Start the server (again, after ``stop``) on the same port."""
        options = f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1"
        if not self.durable:  # a throw-away test cluster need not survive a crash
            options += (" -F -c fsync=off -c synchronous_commit=off "
                        "-c full_page_writes=off")
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-o", options,
                  "-l", str(self.base / "log.txt"), "-w", "-t", "30", "start")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"PostgreSQL did not start; see {self.base / 'log.txt'}")

    def create_database(self, name: str) -> str:
        self._run(str(self.bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                  "-U", "postgres", name)
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate",
                      "-w", "stop")


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@contextlib.contextmanager
def running_server(prefix: str, *, durable: bool = False) -> Iterator[PostgresServer | None]:
    """A throw-away cluster for the ``with`` block; None where the machine has no server
    binaries (an error instead when VTUBER_REQUIRE_POSTGRES is set, as in CI)."""
    bin_dir = find_pg_bin()
    if bin_dir is None:
        if os.environ.get("VTUBER_REQUIRE_POSTGRES"):
            raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) not found, and "
                               "VTUBER_REQUIRE_POSTGRES is set")
        yield None
        return
    base = Path(tempfile.mkdtemp(prefix=prefix))
    server = PostgresServer(bin_dir, base, durable=durable)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
