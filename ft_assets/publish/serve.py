"""An OpenAI-compatible endpoint over a GGUF: llama.cpp's `llama-server` (built by `make install`
beside the export tools, `publish.gguf.tool`), started and stopped by its process id.

    gguf_in_export(dir, type)    ->  the .gguf file of an export directory (`publish.gguf`'s layout)
    Server.start(gguf, ...)      ->  llama-server on host:port with the chat template the GGUF
                                     carries (`--jinja`), ready (/health) or an error with its log's tail
    Server.stop()                ->  SIGTERM, then SIGKILL after `STOP_GRACE_S`; the server also
                                     gets SIGTERM if this process dies first (Linux: PR_SET_PDEATHSIG)

Safe by default: it listens on 127.0.0.1 unless a host is given; another host without an API
key is allowed but said. Every wait is bounded. No Dagster, no torch here.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ..config.gguf_types import GGUF_TYPES
from .gguf import gguf_file, llama_cpp_dir, tool

LOOPBACK = "127.0.0.1"
HEALTHY_WITHIN_S = 120  # loading a GGUF of a few GB from a cold disk
STOP_GRACE_S = 10


class ServeError(RuntimeError):
    """The server cannot be started on what was named; the message says why and what to do."""


def gguf_in_export(directory: Path, gguf_type: str | None, what: str) -> Path:
    """The .gguf of an export directory (`publish.gguf`'s layout): `gguf_type`'s, or by default the
    first of GGUF_TYPES present (f16 before the quantized ones); `what` names it in errors."""
    present = [t for t in GGUF_TYPES if (directory / gguf_file(t)).is_file()]
    if not present:
        raise ServeError(f"{what}: no model-<type>.gguf in {directory}")
    if gguf_type is None:
        return directory / gguf_file(present[0])
    if gguf_type not in present:
        raise ServeError(f"{what} has no {gguf_type} file; it has {', '.join(present)}")
    return directory / gguf_file(gguf_type)


@dataclass
class Server:
    """A running llama-server (`start`); `url` is its OpenAI base URL."""

    process: subprocess.Popen
    url: str
    log: Path
    _log_file: object = field(repr=False, default=None)

    @classmethod
    def start(cls, gguf: Path, *, host: str = LOOPBACK, port: int = 8080, threads: int | None = None,
              ctx: int = 4096, api_key: str | None = None, healthy_within_s: float = HEALTHY_WITHIN_S) -> "Server":
        binary = tool("llama-server")
        if binary is None:
            raise ServeError(f"llama-server is not built under {llama_cpp_dir() / 'build' / 'bin'}; run `make install`")
        command = [str(binary), "-m", str(gguf), "--host", host, "--port", str(port), "--jinja", "-c", str(ctx)]
        command += ["--threads", str(threads)] if threads else []
        command += ["--api-key", api_key] if api_key else []
        log = Path(tempfile.mkstemp(prefix="ft-serve-", suffix=".log")[1])
        out = log.open("w")
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   preexec_fn=_die_with_parent)
        server = cls(process, f"http://{host}:{port}/v1", log, out)
        try:
            server.wait_healthy(f"http://{host}:{port}/health", healthy_within_s)
        except BaseException:
            server.stop()
            raise
        return server

    def wait_healthy(self, health_url: str, limit_s: float) -> None:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServeError(f"llama-server exited ({self.process.returncode}) before it was ready:\n{self.tail()}")
            try:
                with urllib.request.urlopen(health_url, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:  # refused while starting, 503 while the model loads
                pass
            time.sleep(0.2)
        raise ServeError(f"llama-server was not ready within {limit_s:.0f} s:\n{self.tail()}")

    def tail(self, chars: int = 2000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after STOP_GRACE_S; its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_GRACE_S)
        if self._log_file is not None:
            self._log_file.close()
            self.log.unlink(missing_ok=True)
        return self.process.returncode


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (kill -9 of `serve` included)."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
