"""A real ``kvreviver serve`` for the serving benchmarks: started on a free loopback
port in its own process group, awaited on ``/health``, stopped (SIGINT, then SIGKILL)
on exit; and its Prometheus ``/metrics`` as numbers."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

STARTUP_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_processes(pid: int) -> list:
    """vLLM's engine processes below ``pid`` (named ``VLLM::EngineCore``,
    ``VLLM::Worker``, ...), not its other children such as multiprocessing's
    resource tracker."""
    import psutil

    return [p for p in psutil.Process(pid).children(recursive=True)
            if "VLLM" in p.name() + " ".join(p.cmdline())]


def metrics(port: int) -> dict[str, float]:
    """Every ``vllm:`` sample of ``/metrics`` summed over its labels, plus the
    pool's ``num_blocks``."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^(vllm:[a-z_]+)(\{[^}]*\})? ([0-9.eE+-]+)$", line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
        m = re.search(r'vllm:cache_config_info\{.*num_gpu_blocks="(\d+)"', line)
        if m:
            out["num_blocks"] = float(m.group(1))
    return out


class Server:
    """``kvreviver serve <args>`` (the KV pool sized by flags, never by
    ``VLLM_CPU_KVCACHE_SPACE``, which would override them), stopped on exit."""

    def __init__(self, args: list[str], name: str, log_dir: Path) -> None:
        self.port = free_port()
        self.log_path = log_dir / f"server-{name}-{self.port}.log"
        env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvreviver_vllm", "serve", "--port", str(self.port), *args],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )

    def __enter__(self) -> Server:
        deadline = time.time() + STARTUP_TIMEOUT_S
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2)
                return self
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.__exit__()
                    raise RuntimeError(f"server did not start:\n{self.log_path.read_text()[-4000:]}")
                time.sleep(2)

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
