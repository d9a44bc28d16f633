"""llama.cpp's converter, llama-quantize and llama-completion run under a time limit
(`publish/gguf.py`): past it the whole process group is killed (the tool and anything it started),
the error names the command, the limit and what to do, and the export leaves no half-written
GGUF or scratch files behind. A fake llama.cpp tree (FT_LLAMA_CPP_DIR) stands in for tools that
hang; the limit is set through FT_EXPORT_TIMEOUT_S as a user would."""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil
import pytest

from ft_assets.publish import gguf as export

HANGING_TOOL = """
import subprocess, sys, time
from pathlib import Path
out = Path(sys.argv[sys.argv.index("--outfile") + 1])
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(15)"])  # a helper it started
(out.parent.parent / "child.pid").write_text(str(child.pid))
out.write_bytes(b"GGUF half-written")
time.sleep(15)
"""


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def hanging_llama_cpp(tmp_path, monkeypatch) -> Path:
    tree = tmp_path / "llama.cpp"
    (tree / "build" / "bin").mkdir(parents=True)
    (tree / "convert_hf_to_gguf.py").write_text(HANGING_TOOL)
    completion = tree / "build" / "bin" / "llama-completion"
    completion.write_text("#!/bin/sh\nsleep 15\n")
    completion.chmod(0o755)
    monkeypatch.setenv("FT_LLAMA_CPP_DIR", str(tree))
    monkeypatch.setenv("FT_EXPORT_TIMEOUT_S", "2")
    return tree


def test_a_converter_that_hangs_is_killed_with_its_children_and_leaves_nothing(hanging_llama_cpp, tiny_model_dir,
                                                                                 tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    started = time.monotonic()
    with pytest.raises(export.ExportError) as caught:
        export.export_gguf(tiny_model_dir, out, ["f16"], None)
    assert time.monotonic() - started < 12  # the tool would sleep 15 s
    message = str(caught.value)
    assert "convert_hf_to_gguf.py --outtype f16" in message and "2 s" in message, message
    assert "FT_EXPORT_TIMEOUT_S" in message, message
    child = int((tmp_path / "child.pid").read_text())
    deadline = time.monotonic() + 5
    while not gone(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(child), "the converter's own child outlived it"
    assert sorted(p.name for p in out.iterdir()) == []  # no half GGUF, no .converter-input


def test_llama_completion_that_hangs_is_stopped_at_the_limit(hanging_llama_cpp, tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    started = time.monotonic()
    with pytest.raises(export.ExportError, match=r"llama-completion .*2 s.*FT_EXPORT_TIMEOUT_S"):
        export.llama_cpp_generate(gguf, "hello", 4)
    assert time.monotonic() - started < 12


def test_the_default_limit_is_generous_and_grows_with_the_model(monkeypatch):
    monkeypatch.delenv("FT_EXPORT_TIMEOUT_S", raising=False)
    small, large = export.tool_limit_s(10 * 2**20), export.tool_limit_s(140 * 2**30)
    assert small >= 30 * 60  # a floor far above what a small model takes
    assert large > small and large >= 140 * 60  # at least a minute per GiB
    monkeypatch.setenv("FT_EXPORT_TIMEOUT_S", "oops")
    with pytest.raises(export.ExportError, match="FT_EXPORT_TIMEOUT_S"):
        export.tool_limit_s(1)
    assert os.environ["FT_EXPORT_TIMEOUT_S"] == "oops"
