"""Start and stop a local Prefect server (127.0.0.1, SQLite) and the process serving `train-and-eval`.

    python -m flows.local_server start   # what `make serve` runs
    python -m flows.local_server stop    # what `make stop` runs

Both processes run in the background in their own sessions; their PIDs and logs live in PREFECT_HOME
(default `.prefect/` in the project), so `stop` ends exactly what `start` began.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

DEPLOYMENT = "train-and-eval/local"
QUIET = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
}


@dataclass(frozen=True)
class LocalServer:
    home: Path
    host: str = "127.0.0.1"
    port: int = 4200

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}/api"

    def environment(self) -> dict[str, str]:
        """The environment both processes run in (and a client needs: PREFECT_API_URL)."""
        return {
            **os.environ,
            **QUIET,
            "PREFECT_HOME": str(self.home.resolve()),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_LOGGING_EXTRA_LOGGERS": "arcface",
            "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
        }

    def start(self, workdir: Path = Path("."), timeout_s: float = 120.0) -> None:
        """Start the server, wait until it answers, then start serving the deployment."""
        self.home.mkdir(parents=True, exist_ok=True)
        if self._running("server"):
            raise RuntimeError(f"a server started from {self.home} is already running (stop it first)")
        server_env = {k: v for k, v in self.environment().items() if k != "PREFECT_API_URL"}
        self._spawn(
            "server",
            [sys.executable, "-m", "prefect", "server", "start", "--host", self.host,
             "--port", str(self.port)],
            server_env,
            workdir,
        )  # fmt: skip
        self._wait(lambda: self._get("/health") is not None, timeout_s, "the Prefect server")
        self._spawn("serve", [sys.executable, "-m", "flows.serve"], self.environment(), workdir)
        name = "/deployments/name/" + DEPLOYMENT
        self._wait(lambda: self._get(name) is not None, timeout_s, f"deployment {DEPLOYMENT}")

    def stop(self) -> list[str]:
        """Stop whatever `start` began; returns the names of the processes it stopped."""
        stopped = []
        for name in ("serve", "server"):
            pid = self._pid(name)
            if pid is not None:
                try:
                    os.killpg(pid, signal.SIGTERM)  # the whole session: uvicorn workers too
                    stopped.append(name)
                    _wait_gone(pid, 20.0)
                except ProcessLookupError:
                    pass
                self._pid_file(name).unlink(missing_ok=True)
        return stopped

    def _spawn(self, name: str, command: list[str], env: dict[str, str], workdir: Path) -> None:
        log = open(self.home / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child process
        process = subprocess.Popen(
            command,
            cwd=workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._pid_file(name).write_text(str(process.pid))

    def _wait(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ready():
                return
            for name in ("server", "serve"):
                if self._pid_file(name).exists() and not self._running(name):
                    log = self.home / f"{name}.log"
                    raise RuntimeError(f"{what}: the {name} process exited; see {log}")
            time.sleep(0.5)
        raise TimeoutError(f"{what} did not come up within {timeout_s:.0f}s; logs in {self.home}")

    def _get(self, path: str) -> object | None:
        try:
            with urllib.request.urlopen(self.api_url + path, timeout=2) as response:
                return json.loads(response.read() or b"null")
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def _pid_file(self, name: str) -> Path:
        return self.home / f"{name}.pid"

    def _pid(self, name: str) -> int | None:
        path = self._pid_file(name)
        return int(path.read_text()) if path.exists() else None

    def _running(self, name: str) -> bool:
        pid = self._pid(name)
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        # A zombie child (exited, not yet reaped) still "exists"; treat it as gone.
        status = Path(f"/proc/{pid}/stat")
        return not (status.exists() and status.read_text().split(")")[-1].split()[0] == "Z")


def _wait_gone(pid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it if it is our own child (tests start it in-process)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("PREFECT_HOME", ".prefect")))
    parser.add_argument("--port", type=int, default=4200)
    args = parser.parse_args(argv)
    server = LocalServer(args.home, port=args.port)
    if args.action == "start":
        server.start()
        print(f"Prefect server: http://127.0.0.1:{args.port}  (UI and API; logs in {args.home})")
        print(f"Deployment {DEPLOYMENT} is served. Run it with:")
        print(f"  export PREFECT_API_URL={server.api_url}")
        print(f"  prefect deployment run {DEPLOYMENT} --watch")
    else:
        stopped = server.stop()
        print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
