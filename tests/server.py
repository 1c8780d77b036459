"""Run the real service (`python -m service`) in a subprocess on a free port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.conftest import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Server:
    def __init__(self, process: subprocess.Popen[str], url: str) -> None:
        self.process, self.url = process, url

    def logs(self) -> str:
        return self.process.stdout.read() if self.process.stdout and self.process.poll() is not None else ""


@contextmanager
def running_server(model: Path, startup_timeout_s: float = 90.0, **settings: str) -> Iterator[Server]:
    port = free_port()
    env = {**os.environ, "FOCAL_MODELS": str(model), "FOCAL_HOST": "127.0.0.1", "FOCAL_PORT": str(port)}
    env |= {f"FOCAL_{k.upper()}": v for k, v in settings.items()}
    process = subprocess.Popen(
        [sys.executable, "-m", "service"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    server = Server(process, f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}:\n{server.logs()}")
            try:
                if httpx.get(f"{server.url}/readyz", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not become ready in time")
            time.sleep(0.2)
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
