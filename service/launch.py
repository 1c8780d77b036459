"""Start the real service (`python -m service`) in a subprocess on a free port, for tests and benchmarks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Server:
    def __init__(self, process: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
        self.process, self.url, self.log_path = process, url, log_path

    def logs(self) -> str:
        """Everything the server has written so far (JSON log lines)."""
        return self.log_path.read_text(errors="replace")


@contextmanager
def running_server(model: Path | str, startup_timeout_s: float = 90.0, **settings: str) -> Iterator[Server]:
    """`model`: FOCAL_MODELS (a folder, or several and NAME=DIR, comma-separated); `settings`: more FOCAL_*
    settings (FOCAL_WORKERS defaults to 1 here: one process, unless `workers` says otherwise). The
    server's output goes to a file (a pipe nobody reads would fill up and block it)."""
    port = free_port()
    env = {**os.environ, "FOCAL_MODELS": str(model), "FOCAL_HOST": "127.0.0.1", "FOCAL_PORT": str(port)}
    env.setdefault("FOCAL_WORKERS", "1")
    env |= {f"FOCAL_{k.upper()}": v for k, v in settings.items()}
    with tempfile.TemporaryDirectory(prefix="focal-server-") as tmp:
        log_path = Path(tmp) / "server.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT
            )
        server = Server(process, f"http://127.0.0.1:{port}", log_path)
        try:
            _wait_ready(server, startup_timeout_s)
            yield server
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def _wait_ready(server: Server, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"the server exited with {server.process.returncode}:\n{server.logs()}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server did not become ready in {timeout_s:.0f} s:\n{server.logs()}")
        time.sleep(0.2)
