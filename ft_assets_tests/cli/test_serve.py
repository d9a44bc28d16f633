"""`python -m ft_assets serve`: llama-server (built by `make install`) over a GGUF, as a user runs it.

- The command on the bundled SmolLM2 GGUF answers the `openai` client on 127.0.0.1 (a chat
  completion and a streamed one, greedy: the same text), with the chat template the GGUF carries;
  Ctrl-C (SIGINT) stops it, exit 0, and the llama-server process it started is gone.
- Which GGUF: the newest `gguf_model` artifact by default, a named one, an export directory, a
  file; anything else is refused with what to do (exit 2), before any server starts.
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ft_assets.artifacts.store import ArtifactStore
from ft_assets.cli.main import main as cli
from ft_assets.cli.serve import find_gguf
from ft_assets.models.base_model import bundled_gguf_path
from ft_assets.publish.gguf import tool
from ft_assets.publish.serve import ServeError
from ft_assets_tests.conftest import REPO


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _line_matching(proc: subprocess.Popen, pattern: str, limit_s: float = 180) -> re.Match:
    """The first stdout line of `proc` matching `pattern`, read within `limit_s`."""
    deadline, seen = time.monotonic() + limit_s, []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            seen.append(line)
            found = re.search(pattern, line)
            if found:
                return found
    pytest.fail(f"no line matching {pattern!r} within {limit_s} s (exit {proc.poll()}):\n{''.join(seen)[-3000:]}"
                f"\n{proc.stderr.read() if proc.poll() is not None else ''}")


def test_serve_answers_the_openai_client_and_stops_on_ctrl_c(tmp_path):
    assert tool("llama-server") is not None and bundled_gguf_path().is_file(), "run `make install`"
    from openai import OpenAI

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ft_assets", "serve", str(bundled_gguf_path()), "--port",
                             str(port), "--threads", "2", "--ctx", "1024", "--home", str(tmp_path / "home")],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        said = _line_matching(proc, r"at (http://127\.0\.0\.1:\d+/v1) .*llama-server pid (\d+)")
        url, server_pid = said.group(1), int(said.group(2))
        assert url == f"http://127.0.0.1:{port}/v1"
        assert psutil.Process(server_pid).ppid() == proc.pid
        listening = {c.laddr.ip for c in psutil.Process(server_pid).net_connections() if c.status == "LISTEN"}
        assert listening == {"127.0.0.1"}, listening  # nothing beyond loopback unless asked

        client = OpenAI(base_url=url, api_key="unused", timeout=60, max_retries=0)
        messages = [{"role": "system", "content": "Answer in one short sentence."},
                    {"role": "user", "content": "What is the capital of France?"}]
        whole = client.chat.completions.create(model="served", messages=messages, max_tokens=12, temperature=0,
                                               seed=0)
        answer = whole.choices[0].message.content
        assert any(ch.isalpha() for ch in answer), answer  # real text through the GGUF's chat template
        chunks = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="served", messages=messages, max_tokens=12, temperature=0, seed=0, stream=True) if c.choices]
        assert len([c for c in chunks if c]) >= 2, chunks  # streamed, not one block
        assert "".join(chunks) == answer

        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
        assert not psutil.pid_exists(server_pid) or psutil.Process(server_pid).status() == psutil.STATUS_ZOMBIE
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _export(store: ArtifactStore, partition: str, types: tuple[str, ...]) -> Path:
    with store.write("gguf_model", partition) as st:
        for t in types:
            (st.path / f"model-{t}.gguf").write_bytes(b"GGUF")
    return st.artifact.dir


def test_serve_finds_the_gguf_named_or_the_newest_export_and_refuses_the_rest(tmp_path, capsys):
    store = ArtifactStore(tmp_path / "home")
    with pytest.raises(ServeError, match="no gguf_model artifact .* export.gguf"):
        find_gguf(store)
    older = _export(store, "lora", ("q4_k_m", "f16"))
    time.sleep(0.01)
    newer = _export(store, "dpo", ("q8_0",))
    assert find_gguf(store) == newer / "model-q8_0.gguf"  # the newest export
    assert find_gguf(store, "gguf_model[lora]") == older / "model-f16.gguf"  # f16 before quantized types
    assert find_gguf(store, "gguf_model[lora]", "q4_k_m") == older / "model-q4_k_m.gguf"
    assert find_gguf(store, str(older)) == older / "model-f16.gguf"
    with pytest.raises(ServeError, match="has no q4_k_m file; it has q8_0"):
        find_gguf(store, "gguf_model[dpo]", "q4_k_m")
    with store.write("merged_model", "lora") as st:
        (st.path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ServeError, match=r"is a merged_model, not a gguf_model: .* materialize gguf_model\[lora\]"):
        find_gguf(store, "merged_model[lora]")
    with pytest.raises(ServeError, match="not a .gguf file"):
        find_gguf(store, str(st.artifact.dir / "model.safetensors"))
    # the command says it on stderr, exit 2, and starts nothing
    assert cli(["serve", "gguf_model[nope]", "--home", str(tmp_path / "home")]) == 2
    assert "neither a .gguf file, an export directory nor an artifact" in capsys.readouterr().err
