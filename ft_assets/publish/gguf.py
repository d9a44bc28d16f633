"""GGUF export for llama.cpp / Ollama / LM Studio, with llama.cpp's own tools (no GGUF writer here).

An export directory holds:

    model-<type>.gguf   one per requested type: f16, bf16, q8_0 written by llama.cpp's
                        `convert_hf_to_gguf.py` (pure Python, always available); k-quants and the
                        other llama.cpp types by `llama-quantize` from an f16 GGUF (only when built)
    Modelfile           Ollama: FROM the first requested type, the chat template as a Go template
                        for the families it knows (ChatML, Llama 3, Mistral, Gemma; else none:
                        Ollama reads the template the GGUF carries, and the file says so), SYSTEM
                        (the recipe's system prompt, else ChatML's default one) and a
                        `PARAMETER stop` per end-of-turn token

The tools are pinned: llama.cpp as vendored in the `llama-cpp-python==LLAMA_CPP_PYTHON` source
distribution, unpacked and built by `make install` under `.ft_vendor/llama.cpp-<version>/` (the
converter runs as a subprocess with that tree's `gguf-py` first on PYTHONPATH; the binaries live
in its `build/bin/`). The chat template, BOS/EOS/pad ids and special tokens travel in the GGUF
metadata (the converter copies them from the checkpoint's tokenizer files). A checkpoint that
could run code (`*.py` files, an `auto_map`) is refused: the converter loads tokenizers with
trust_remote_code. Any chat template travels in the GGUF (`tokenizer.chat_template`, whatever it
is); the Modelfile's family is found by rendering a probe conversation (`TEMPLATE_FAMILIES`).
Nothing here imports Dagster or torch.

Every llama.cpp tool runs under a time limit (`tool_limit_s`: FT_EXPORT_TIMEOUT_S seconds when
set, else TOOL_LIMIT_FLOOR_S plus TOOL_LIMIT_S_PER_GIB per GiB of weights), in a process group
of its own: past the limit, or when this process is interrupted, the whole group is killed and
an `ExportError` names the command, the limit and what to do. A failed export removes its
scratch files (`.converter-input`, the intermediate f16 GGUF) and the GGUF it was writing.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ..config.gguf_types import CONVERTER_TYPES, GGUF_TYPES, QUANTIZE_TYPES
from ..config.paths import REPO_ROOT

LLAMA_CPP_PYTHON = "0.3.36"  # the llama-cpp-python sdist whose vendored llama.cpp is used (Makefile: LLAMA_CPP_PY)
MODELFILE = "Modelfile"
# ChatML's turn markers; `_ollama_template` writes the Go template for exactly this layout
CHATML_START, CHATML_END = "<|im_start|>", "<|im_end|>"
INTERMEDIATE_F16 = ".intermediate-f16.gguf"  # what llama-quantize reads when f16 itself was not asked for
TIMEOUT_ENV = "FT_EXPORT_TIMEOUT_S"
TOOL_LIMIT_FLOOR_S = 30 * 60  # the least any llama.cpp tool is given, however small the model
TOOL_LIMIT_S_PER_GIB = 5 * 60  # plus this per GiB of weights


class ExportError(RuntimeError):
    """An export that cannot be made; the message says why and what to do."""


def llama_cpp_dir() -> Path:
    """The unpacked, pinned llama.cpp tree ($FT_LLAMA_CPP_DIR overrides, for a tree built elsewhere)."""
    return Path(os.environ.get("FT_LLAMA_CPP_DIR") or REPO_ROOT / ".ft_vendor" / f"llama.cpp-{LLAMA_CPP_PYTHON}")


def tool(name: str) -> Path | None:
    """A built llama.cpp binary (`llama-quantize`, `llama-completion`), or None when not built."""
    path = llama_cpp_dir() / "build" / "bin" / name
    return path if path.is_file() and os.access(path, os.X_OK) else None


def gguf_file(kind: str) -> str:
    return f"model-{kind}.gguf"


def check_types(types: list[str]) -> None:
    """Known types, and the quantize tool present when a type needs it (else: run `make install`)."""
    unknown = [t for t in types if t not in GGUF_TYPES]
    if unknown:
        raise ExportError(f"unknown GGUF type(s) {', '.join(unknown)}; known: {', '.join(GGUF_TYPES)}")
    needs_tool = [t for t in types if t in QUANTIZE_TYPES]
    if needs_tool and tool("llama-quantize") is None:
        raise ExportError(f"GGUF type(s) {', '.join(needs_tool)} need llama.cpp's llama-quantize, not built at "
                          f"{llama_cpp_dir() / 'build' / 'bin'}; run `make install` (builds it once), or export "
                          f"only {', '.join(CONVERTER_TYPES)}")
    if not (llama_cpp_dir() / "convert_hf_to_gguf.py").is_file():
        raise ExportError(f"llama.cpp's converter is missing at {llama_cpp_dir()}; run `make install` "
                          f"(unpacks llama-cpp-python {LLAMA_CPP_PYTHON})")


@dataclass
class GgufExport:
    """What an export wrote (file names are relative to the export directory)."""

    files: dict[str, str]  # type -> file name
    bytes: dict[str, int]  # type -> size on disk
    seconds: dict[str, float]  # type -> wall time to write it
    converter: str  # which llama.cpp wrote them
    modelfile: str
    modelfile_from: str  # the GGUF the Modelfile's FROM names
    system: str | None  # the Modelfile's SYSTEM
    stop: list[str]  # the Modelfile's stop strings
    template_family: str | None = None  # the Modelfile's TEMPLATE (None: the GGUF's own template)
    metadata: dict[str, object] = field(default_factory=dict)  # a few keys read back from the first GGUF

    def to_json(self) -> dict:
        return asdict(self)


def export_gguf(model_dir: str | Path, out_dir: str | Path, types: list[str], system: str | None,
                log=lambda msg: None) -> GgufExport:
    """Write `model-<type>.gguf` for each of `types` and a Modelfile into `out_dir` (which exists)."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not types:
        raise ExportError("no GGUF types requested (recipe export.gguf is empty)")
    check_types(types)
    _refuse_code(model_dir)
    family, template, stop, system = modelfile_parts(model_dir, system)  # before the slow part
    limit_s = tool_limit_s(sum(p.stat().st_size for p in model_dir.glob("*.safetensors")))

    work = out_dir / ".converter-input"  # removed before the export is finished
    source = converter_input(model_dir, work)
    try:
        files, sizes, seconds = _write_types(source, out_dir, types, limit_s, log)
    finally:  # done or failed: no scratch files stay
        if source == work:
            shutil.rmtree(work, ignore_errors=True)
        (out_dir / INTERMEDIATE_F16).unlink(missing_ok=True)

    first = files[types[0]]
    (out_dir / MODELFILE).write_text(modelfile_text(first, template, system, stop), encoding="utf-8")
    return GgufExport(files=files, bytes=sizes, seconds=seconds, converter=converter_version(),
                      modelfile=MODELFILE, modelfile_from=first, system=system, stop=stop, template_family=family,
                      metadata=read_metadata(out_dir / first))


def _write_types(source: Path, out_dir: Path, types: list[str], limit_s: float, log
                 ) -> tuple[dict[str, str], dict[str, int], dict[str, float]]:
    """Each type's GGUF (converter types first), each tool run within `limit_s`; a GGUF whose tool
    failed is removed. (file names, sizes, seconds) by type."""
    files, sizes, seconds = {}, {}, {}
    f16_source = None  # llama-quantize reads an f16 GGUF (the requested one, or a temporary one)
    for kind in [t for t in types if t in CONVERTER_TYPES] + [t for t in types if t in QUANTIZE_TYPES]:
        t0 = time.perf_counter()
        target = out_dir / gguf_file(kind)
        try:
            if kind in CONVERTER_TYPES:
                _convert(source, target, kind, limit_s)
                if kind == "f16":
                    f16_source = target
            else:
                if f16_source is None:
                    f16_source = out_dir / INTERMEDIATE_F16
                    _convert(source, f16_source, "f16", limit_s)
                _run([str(tool("llama-quantize")), str(f16_source), str(target), kind.upper()],
                     f"llama-quantize {kind}", limit_s)
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        files[kind], sizes[kind], seconds[kind] = target.name, target.stat().st_size, round(time.perf_counter() - t0, 2)
        log(f"{target.name}: {sizes[kind] / 2**20:.1f} MiB in {seconds[kind]:.1f} s")
    return files, sizes, seconds


def tool_limit_s(model_bytes: int) -> float:
    """Seconds a llama.cpp tool may run on a model of `model_bytes`: FT_EXPORT_TIMEOUT_S when set,
    else TOOL_LIMIT_FLOOR_S plus TOOL_LIMIT_S_PER_GIB per GiB (tens of times what it takes)."""
    said = os.environ.get(TIMEOUT_ENV, "").strip()
    if not said:
        return TOOL_LIMIT_FLOOR_S + TOOL_LIMIT_S_PER_GIB * model_bytes / 2**30
    try:
        limit = float(said)
    except ValueError:
        limit = float("nan")
    if not limit > 0:
        raise ExportError(f"{TIMEOUT_ENV}={said!r} is not a positive number of seconds; unset it for the default "
                          f"({TOOL_LIMIT_FLOOR_S} s plus {TOOL_LIMIT_S_PER_GIB} s per GiB of weights)")
    return limit


def converter_version() -> str:
    gguf_py = llama_cpp_dir() / "gguf-py" / "pyproject.toml"
    version = next((line.split('"')[1] for line in gguf_py.read_text().splitlines() if line.startswith("version")), "?")
    return f"llama.cpp from llama-cpp-python {LLAMA_CPP_PYTHON} (convert_hf_to_gguf.py, gguf-py {version})"


def _refuse_code(model_dir: Path) -> None:
    code = sorted(p.name for p in model_dir.glob("*.py"))
    cfgs = [p for p in (model_dir / "config.json", model_dir / "tokenizer_config.json") if p.is_file()]
    mapped = [p.name for p in cfgs if "auto_map" in json.loads(p.read_text())]
    if code or mapped:
        raise ExportError(f"{model_dir} carries custom code ({', '.join(code + mapped)}); the GGUF converter "
                          "would run it (trust_remote_code), so it is not exported")
    if not any(model_dir.glob("*.safetensors")):
        raise ExportError(f"{model_dir} has no *.safetensors weights to convert")


def converter_input(model_dir: Path, work: Path) -> Path:
    """The checkpoint as llama.cpp's converter must see it. transformers writes the tokenizer it
    rebuilds from a GGUF (how `base_model` reads the bundled SmolLM2) as byte-level BPE plus
    SentencePiece-style byte fallback and decoders; the converter then takes it for a
    SentencePiece vocabulary (tokenizer model "llama", no merges) and llama.cpp would split text
    differently from transformers. In byte-level BPE every byte has a token, so the fallback never
    fires and those decoders are no-ops: `work` gets links to every file and a tokenizer.json
    without them, and the converter recognizes the pre-tokenizer by hashing its tokenization of a
    probe text (its own check; an unknown hash stops it). Any other tokenizer: `model_dir` itself."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return model_dir
    tj = json.loads(path.read_text(encoding="utf-8"))
    model, pre, dec = tj.get("model") or {}, tj.get("pre_tokenizer") or {}, tj.get("decoder") or {}
    byte_level = [d for d in dec.get("decoders", []) if d.get("type") == "ByteLevel"]
    if not (model.get("type") == "BPE" and model.get("byte_fallback") and pre.get("type") == "ByteLevel" and byte_level):
        return model_dir
    work.mkdir()
    for p in model_dir.iterdir():
        if p.name != "tokenizer.json":
            (work / p.name).symlink_to(p.resolve())
    tj["model"] = {**model, "byte_fallback": False}
    tj["decoder"] = byte_level[0]
    (work / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    return work


def _convert(model_dir: Path, target: Path, kind: str, limit_s: float) -> None:
    root = llama_cpp_dir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_LOCAL_GGUF": "",
           "PYTHONPATH": os.pathsep.join([str(root / "gguf-py"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    _run([sys.executable, str(root / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", kind,
          "--outfile", str(target)], f"convert_hf_to_gguf.py --outtype {kind}", limit_s, env=env)


def _run(cmd: list[str], what: str, limit_s: float, env: dict | None = None) -> None:
    proc = run_within(cmd, what, limit_s, env=env)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise ExportError(f"{what} failed (exit {proc.returncode}):\n{tail}")


def run_within(cmd: list[str], what: str, limit_s: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """`cmd` to its end (output captured), in a process group of its own that is killed, with
    everything it started, past `limit_s` seconds (then an ExportError) or if this process is
    interrupted meanwhile."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise ExportError(
            f"{what} did not finish within its limit of {limit_s:.0f} s and was stopped, with every process it "
            f"started: {shlex.join(cmd)}. Nothing was kept. If this machine is only slow for this model, allow "
            f"more with {TIMEOUT_ENV}=<seconds>; otherwise check that it is not out of memory or swapping.") from None
    except BaseException:
        _kill_group(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()  # reaped; its pipes are closed with it (not read: a killed tool's output is of no use)
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


# ---------------------------------------------------------------------------------------------
# Ollama Modelfile
# ---------------------------------------------------------------------------------------------

# ChatML as an Ollama Go template: the system turn from .System (the SYSTEM line or the client's),
# then the user/assistant turns, then an open assistant turn unless the last turn is the
# assistant's (a continuation). `.Prompt`/`.Response` serve clients of the older /generate API.
_CHATML_GO = (
    "{{- if .Messages }}"
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{- range $i, $_ := .Messages }}"
    "{{- $last := eq (len (slice $.Messages $i)) 1 }}"
    "{{- if ne .Role \"system\" }}<|im_start|>{{ .Role }}\n{{ .Content }}"
    "{{- if not (and $last (eq .Role \"assistant\")) }}<|im_end|>\n{{ end }}{{ end }}"
    "{{- if and $last (ne .Role \"assistant\") }}<|im_start|>assistant\n{{ end }}"
    "{{- end }}"
    "{{- else }}"
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{- if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    "{{ .Response }}{{ if .Response }}<|im_end|>{{ end }}"
    "{{- end }}"
)


# Llama 3, Mistral (v0.1-v0.3 [INST]) and Gemma as Go templates, built like _CHATML_GO. Mistral and
# Gemma have no system turn: a system prompt goes before the first user message, as their own
# templates' users do by hand.
_LLAMA3_GO = (
    "{{- if .Messages }}"
    "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
    "{{- range $i, $_ := .Messages }}"
    "{{- $last := eq (len (slice $.Messages $i)) 1 }}"
    "{{- if ne .Role \"system\" }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}"
    "{{- if not (and $last (eq .Role \"assistant\")) }}<|eot_id|>{{ end }}{{ end }}"
    "{{- if and $last (ne .Role \"assistant\") }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ end }}"
    "{{- end }}"
    "{{- else }}"
    "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
    "{{- if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}{{ if .Response }}<|eot_id|>{{ end }}"
    "{{- end }}"
)
_MISTRAL_GO = (
    "{{- if .Messages }}"
    "{{- range $i, $_ := .Messages }}"
    "{{- $last := eq (len (slice $.Messages $i)) 1 }}"
    "{{- if eq .Role \"user\" }}[INST] {{ if and $.System (eq $i 0) }}{{ $.System }}\n\n{{ end }}{{ .Content }} [/INST]"
    "{{- else if eq .Role \"assistant\" }}{{ .Content }}{{ if not $last }}EOS{{ end }}{{ end }}"
    "{{- end }}"
    "{{- else }}[INST] {{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }} [/INST]{{ .Response }}"
    "{{- end }}"
)
_GEMMA_GO = (
    "{{- if .Messages }}"
    "{{- range $i, $_ := .Messages }}"
    "{{- $last := eq (len (slice $.Messages $i)) 1 }}"
    "{{- if eq .Role \"user\" }}<start_of_turn>user\n{{ if and $.System (eq $i 0) }}{{ $.System }}\n\n{{ end }}"
    "{{ .Content }}<end_of_turn>\n"
    "{{- else if eq .Role \"assistant\" }}<start_of_turn>model\n{{ .Content }}"
    "{{- if not $last }}<end_of_turn>\n{{ end }}{{ end }}"
    "{{- if and $last (ne .Role \"assistant\") }}<start_of_turn>model\n{{ end }}"
    "{{- end }}"
    "{{- else }}<start_of_turn>user\n{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}<end_of_turn>\n"
    "<start_of_turn>model\n{{ .Response }}"
    "{{- end }}"
)

# the probe conversations a template is rendered on: with a system turn, and (for templates that
# refuse one) without
PROBE = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
         {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}]


@dataclass(frozen=True)
class TemplateFamily:
    """A chat template layout the Modelfile can write: how it renders `PROBE` (given the
    tokenizer's bos and eos text; None: that probe is not this layout's), its Go template, stops."""

    name: str
    renders: Callable[[list[dict], str, str], str | None]
    go_template: str
    stops: tuple[str, ...]


def _chatml(probe, bos, eos):
    return "".join(f"{CHATML_START}{m['role']}\n{m['content']}{CHATML_END}\n" for m in probe) + f"{CHATML_START}assistant\n"


def _llama3(probe, bos, eos):
    turns = "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in probe)
    return bos + turns + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def _mistral(probe, bos, eos):
    if probe[0]["role"] == "system":
        return None
    return bos + "".join(f"[INST] {m['content']} [/INST]" if m["role"] == "user" else m["content"] + eos for m in probe)


def _gemma(probe, bos, eos):
    if probe[0]["role"] == "system":
        return None
    role = {"user": "user", "assistant": "model"}
    return bos + "".join(f"<start_of_turn>{role[m['role']]}\n{m['content']}<end_of_turn>\n" for m in probe) + \
        "<start_of_turn>model\n"


TEMPLATE_FAMILIES = (
    TemplateFamily("chatml", _chatml, _CHATML_GO, (CHATML_END, CHATML_START)),
    TemplateFamily("llama3", _llama3, _LLAMA3_GO, ("<|eot_id|>", "<|start_header_id|>")),
    TemplateFamily("mistral", _mistral, _MISTRAL_GO, ("[INST]", "[/INST]")),
    TemplateFamily("gemma", _gemma, _GEMMA_GO, ("<end_of_turn>", "<start_of_turn>")),
)


def template_family(tok) -> TemplateFamily | None:
    """The family whose layout the tokenizer's chat template renders `PROBE` in (with its system
    turn, or without it for templates that refuse one), or None."""
    renderings = []
    for probe in (PROBE, PROBE[1:]):
        try:
            renderings.append((probe, tok.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)))
        except Exception:  # jinja's raise_exception: e.g. "System role not supported"
            continue
    bos, eos = tok.bos_token or "", tok.eos_token or ""
    for family in TEMPLATE_FAMILIES:
        for probe, got in renderings:
            if got in {family.renders(probe, bos, eos), family.renders(probe, "", eos)} - {None}:
                return family
    return None


def modelfile_parts(model_dir: Path, system: str | None) -> tuple[str | None, str | None, list[str], str | None]:
    """(family name, Go template, stop strings, SYSTEM) for the checkpoint's chat template: a known
    family's Go template, else none (Ollama then reads the template embedded in the GGUF); without
    a recipe system prompt, SYSTEM is the default system turn a ChatML template injects (SmolLM2
    has one), so Ollama sends what the model saw in training."""
    from transformers import AutoTokenizer  # lazy: the module stays light for recipe validation

    tok = AutoTokenizer.from_pretrained(model_dir)
    eos = tok.eos_token
    family = template_family(tok) if tok.chat_template else None
    if family is None:
        return None, None, [eos] if eos else [], system
    if system is None and family.name == "chatml":
        bare = tok.apply_chat_template(PROBE[1:2], tokenize=False, add_generation_prompt=True)
        head = f"{CHATML_START}system\n"
        if bare.startswith(head):
            system = bare[len(head): bare.index(CHATML_END)]
    stops = list(family.stops)
    stops[1:1] = [eos] if eos and eos not in stops else []  # the end-of-turn first, then eos, then the turn opener
    return family.name, family.go_template.replace("EOS", eos or ""), stops, system


def _quoted(text: str) -> str:
    if '"""' in text:
        raise ExportError(f"cannot write {text[:60]!r} into a Modelfile: it contains triple quotes")
    return f'"""{text}"""'


def modelfile_text(gguf_name: str, template: str | None, system: str | None, stop: list[str]) -> str:
    lines = ["# Ollama: `ollama create <name> -f Modelfile` in this directory. Written by ft_assets.",
             f"FROM ./{gguf_name}"]
    lines += [f"TEMPLATE {_quoted(template)}"] if template else [
        "# No TEMPLATE: this chat template is not one of the families ft_assets writes (ChatML, Llama 3,",
        "# Mistral, Gemma); Ollama uses the template embedded in the GGUF (tokenizer.chat_template)."]
    if system:
        lines.append(f"SYSTEM {_quoted(system)}")
    lines += [f'PARAMETER stop "{s}"' for s in stop]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Reading back and running
# ---------------------------------------------------------------------------------------------

def read_metadata(path: str | Path) -> dict[str, object]:
    """The GGUF keys serving depends on: architecture, file type, chat template, special token ids."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    keys = ("general.architecture", "general.file_type", "tokenizer.chat_template", "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
            "tokenizer.ggml.model", "tokenizer.ggml.pre")
    out: dict[str, object] = {}
    for key in keys:
        fld = reader.get_field(key)
        if fld is not None:
            value = fld.contents()
            out[key] = value.item() if hasattr(value, "item") else value
    return out


@dataclass
class LlamaCppRun:
    text: str  # the generated text, special tokens not shown
    generated_tokens: int  # llama.cpp's count (`eval time ... N runs`); equal to transformers' generated tokens, EOS included, where measured
    tokens_per_s: float  # llama.cpp's own decode rate (its `eval time` line)
    wall_s: float


def llama_cpp_generate(gguf: str | Path, prompt: str, max_new_tokens: int, threads: int = 2,
                       ctx: int = 2048) -> LlamaCppRun:
    """Greedy completion of `prompt` (already chat-formatted text; special tokens are parsed) by
    llama.cpp's `llama-completion`; stops at an end-of-generation token, which is not printed."""
    binary = tool("llama-completion")
    if binary is None:
        raise ExportError(f"llama-completion is not built under {llama_cpp_dir() / 'build' / 'bin'}; run `make install`")
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8") as f:
        f.write(prompt)
        f.flush()
        cmd = [str(binary), "-m", str(gguf), "-f", f.name, "-n", str(max_new_tokens), "--temp", "0", "--seed", "0",
               "-no-cnv", "--no-display-prompt", "--no-escape", "--no-warmup", "-t", str(threads), "-c", str(ctx)]
        t0 = time.perf_counter()
        proc = run_within(cmd, "llama-completion", tool_limit_s(Path(gguf).stat().st_size))
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise ExportError(f"llama-completion failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
    return LlamaCppRun(text=_strip_end_marker(proc.stdout), generated_tokens=_eval_runs(proc.stderr)[0],
                       tokens_per_s=_eval_runs(proc.stderr)[1], wall_s=round(wall, 3))


def _strip_end_marker(out: str) -> str:
    out = out.rstrip()
    return out.removesuffix("[end of text]").strip()


def _eval_runs(stderr: str) -> tuple[int, float]:
    """(generated tokens, tokens/s) from llama.cpp's perf line `eval time = X ms / N runs (... , T tokens per second)`."""
    for line in stderr.splitlines():
        if " eval time" in line and "prompt eval" not in line and "runs" in line:
            n = int(line.split("/")[1].split("runs")[0].strip())
            tps = float(line.rsplit(",", 1)[1].split("tokens per second")[0].strip()) if "tokens per second" in line else 0.0
            return n, tps
    return 0, 0.0
