"""Start `python -m sglang.launch_server` on loopback for a test, and stop it whatever happens."""

import contextlib
import os
import socket
import subprocess
import sys
import time

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_cmd(model_dir: str, port: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "sglang.launch_server", "--model-path", model_dir, "--host", "127.0.0.1",
        "--port", str(port), "--device", "cpu", "--dtype", "float32", "--attention-backend", "torch_native",
        "--lora-backend", "torch_native", "--cuda-graph-backend-decode", "disabled",
        "--cuda-graph-backend-prefill", "disabled", "--max-total-tokens", "4096",
        # an idle scheduler otherwise spins a core, starving the other servers and engines of the test run
        "--sleep-on-idle", *extra,
    ]


@contextlib.contextmanager
def running_server(model_dir: str, *extra: str, timeout: float = 300, env: dict | None = None):
    """Yields the base URL once /health answers; the server's output goes to a log file next to it.
    env: extra environment variables for the server."""
    port = free_port()
    log = open(f"/tmp/forkkv-server-{port}.log", "w+")
    env = dict(os.environ, SGLANG_USE_CPU_ENGINE="1", **(env or {}))
    proc = subprocess.Popen(server_cmd(model_dir, port, *extra), stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read()[-3000:]}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(url + "/health", timeout=5).status_code == 200:
                    break
            time.sleep(2)
        else:
            raise TimeoutError(f"server not healthy after {timeout} s")
        yield url
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        if proc.poll() is None:
            proc.kill()
        log.close()


def run_until_exit(model_dir: str, *extra: str, timeout: float = 300) -> tuple[int, str]:
    """Run a server expected to refuse to start; returns its exit code and output."""
    port = free_port()
    env = dict(os.environ, SGLANG_USE_CPU_ENGINE="1")
    proc = subprocess.run(server_cmd(model_dir, port, *extra), capture_output=True, text=True, env=env, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def server_log(url: str) -> str:
    """What the server `running_server` started at `url` has logged so far."""
    port = url.rsplit(":", 1)[1]
    with open(f"/tmp/forkkv-server-{port}.log") as log:
        return log.read()
