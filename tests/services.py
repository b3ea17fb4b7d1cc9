"""Real services the tests start, stop and restart themselves: an ``mlflow server`` and a PostgreSQL cluster
of their own (a temporary data directory and port), so an outage never touches the machine's shared ones.

Each service writes a small shell script, ``outage.sh``, that stops it at once and starts it again after a
delay in the background: a trial runs it as the ``command`` of the ``fault_hooks.Fault`` trial hook.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def healthy(url: str, path: str = "/health") -> bool:
    """Whether ``url + path`` answers 200."""
    try:
        with urllib.request.urlopen(f"{url}{path}", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _reap(pid: int) -> None:
    """Collect ``pid`` if it is an exited child of this process: a zombie leader keeps its group alive."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not a child of this process (started by a script), or already collected


def stop_process_group(pid: int) -> None:
    """SIGTERM a process group (uvicorn and its worker), SIGKILL it if it lingers."""
    for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _reap(pid)
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.3)
    raise TimeoutError(f"{what} within {timeout:.0f} s")


class MlflowServer:
    """``mlflow server`` on a SQLite store in ``workdir``; its pid is kept in ``server.pid``, so a restart made
    by the outage script is stopped too."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.pid_file = self.workdir / "server.pid"
        self.log = self.workdir / "server.log"
        self.command = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.workdir / 'mlflow.db'}",
            "--artifacts-destination", str(self.workdir / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port),
            "--workers", "1",
        ]  # fmt: skip
        self.env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}

    def start(self, timeout: float = 120) -> None:
        with open(self.log, "ab") as out:
            proc = subprocess.Popen(
                self.command,
                cwd=self.workdir,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid_file.write_text(str(proc.pid))
        wait_until(lambda: healthy(self.url), timeout, f"mlflow server on {self.url} did not answer")

    def stop(self) -> None:
        if self.pid_file.exists():
            stop_process_group(int(self.pid_file.read_text()))

    def outage_script(self, down_seconds: float) -> Path:
        """``kill -9`` the server now; start it again on the same port and store after ``down_seconds``."""
        start = " ".join(shlex.quote(part) for part in self.command)
        restart = (
            f"sleep {down_seconds}; cd {self.workdir}; setsid {start} >> {self.log} 2>&1 & echo $! > {self.pid_file}; "
            f"date +%s.%N > {self.workdir / 'restarted_at'}"
        )
        script = self.workdir / "outage.sh"
        script.write_text(
            "set -e\n"
            f'kill -9 -- -"$(cat {self.pid_file})"\n'
            f"date +%s.%N > {self.workdir / 'killed_at'}\n"
            f"setsid bash -c {shlex.quote(restart)} > /dev/null 2>&1 < /dev/null &\n"
        )
        return script


def postgres_missing() -> str | None:
    """Why an own PostgreSQL cluster cannot be made here, or None."""
    for tool in ("initdb", "pg_ctl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser (PostgreSQL refuses to run as root)"
    return None


class PostgresCluster:
    """A PostgreSQL cluster of the test's own: ``initdb`` into a fresh temporary directory, trust auth, a free
    port, its socket beside the data. As root, it runs as the ``postgres`` user (whose directory this is: the
    test's own temporary directories are closed to other users). Scripts and time stamps go to ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.home = Path(tempfile.mkdtemp(prefix="rpsft-pg-"))
        self.data = self.home / "data"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.log = self.home / "postgres.log"
        self._as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _pg_ctl(self, *args: str) -> list[str]:
        options = f"-p {self.port} -k {self.home} -c listen_addresses=127.0.0.1"
        return [*self._as_user, "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, *args]

    def start(self) -> None:
        if self._as_user:
            shutil.chown(self.home, "postgres")
        if not self.data.exists():
            subprocess.run(
                [
                    *self._as_user,
                    "initdb",
                    "-D",
                    str(self.data),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                ],
                check=True,
                capture_output=True,
            )
        subprocess.run(self._pg_ctl("-w", "start"), check=True, capture_output=True)

    def stop(self) -> None:
        """Stop the cluster (and a restart the outage script may still have pending) and delete it."""
        if (self.workdir / "stopped_at").exists():
            wait_until(lambda: (self.workdir / "restarted_at").exists(), 60, "the outage script's restart")
        subprocess.run(self._pg_ctl("-m", "immediate", "stop"), capture_output=True)
        shutil.rmtree(self.home, ignore_errors=True)

    def outage_script(self, down_seconds: float) -> Path:
        """Stop the cluster now (``-m fast``: every open connection is cut); start it after ``down_seconds``."""
        stop = " ".join(shlex.quote(part) for part in self._pg_ctl("-w", "-m", "fast", "stop"))
        start = " ".join(shlex.quote(part) for part in self._pg_ctl("-w", "start"))
        restart = f"sleep {down_seconds}; {start}; date +%s.%N > {self.workdir / 'restarted_at'}"
        script = self.workdir / "outage.sh"
        script.write_text(
            "set -e\n"
            f"{stop} > /dev/null\n"
            f"date +%s.%N > {self.workdir / 'stopped_at'}\n"
            f"setsid bash -c {shlex.quote(restart)} > /dev/null 2>&1 < /dev/null &\n"
        )
        return script
