"""`python -m ft_assets serve [MODEL]`: an OpenAI-compatible endpoint (llama.cpp's llama-server,
`publish.serve`) over a GGUF, on 127.0.0.1 unless `--host` says otherwise, until Ctrl-C (SIGINT)
or SIGTERM, which stop the server by its process id.

MODEL: nothing (the newest `gguf_model` artifact: a method's champion, exported), an artifact name
(`gguf_model[lora]`), an export directory, or a .gguf file. It prints the base URL once the
server answers; any OpenAI client talks to it (`base_url`, any model name). Exit 0 when stopped
by a signal, 2 on what was named (with what to do), the server's code when it dies by itself.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import TextIO

from ..artifacts.asset_keys import format_key, parse_key
from ..artifacts.store import ArtifactStore
from ..publish.serve import LOOPBACK, Server, ServeError, gguf_in_export

GGUF_ASSET = "gguf_model"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", metavar="ASSET[PARTITION] | PATH",
                   help="gguf_model[lora], an export directory or a .gguf file (default: the newest gguf_model)")
    p.add_argument("--type", dest="gguf_type", help="which GGUF of an export, e.g. q4_k_m (default: f16 if "
                                                      "exported, else the first type present)")
    p.add_argument("--host", default=LOOPBACK, help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--api-key", help="require this key from clients (Authorization: Bearer ...)")
    p.add_argument("--ctx", type=int, default=4096, help="context length in tokens (default 4096)")
    p.add_argument("--threads", type=int, help="CPU threads (default: llama.cpp's choice)")
    p.add_argument("--home", help="FT_HOME, a directory or a URL such as s3://bucket/prefix (default: $FT_HOME or .ft_home)")


def find_gguf(store: ArtifactStore, ref: str | None = None, gguf_type: str | None = None) -> Path:
    """The .gguf file MODEL names (module doc)."""
    if ref is None:
        rows = [r for r in store.list_latest() if r["asset"].rsplit(".", 1)[-1] == GGUF_ASSET]  # any pipeline's
        if not rows:
            raise ServeError(f"no {GGUF_ASSET} artifact in {store.artifacts_location}: list GGUF types under the "
                             "recipe's export.gguf and materialize gguf_model, or name a .gguf file")
        newest = max(rows, key=lambda r: r["created"] or "")
        return gguf_in_export(store.latest(newest["asset"], newest["partition"]).dir, gguf_type,
                              format_key(newest["asset"], newest["partition"]))
    path = Path(ref)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ServeError(f"{ref}: not a .gguf file (serve takes GGUF; `python -m ft_assets chat` takes a "
                             "merged model directory)")
        return path
    if path.is_dir():
        return gguf_in_export(path, gguf_type, ref)
    named = parse_key(ref) if "[" in ref else None
    art = store.latest(*named) if named else None
    if art is None:
        raise ServeError(f"{ref}: neither a .gguf file, an export directory nor an artifact such as "
                         f"{GGUF_ASSET}[lora] in {store.artifacts_location} (see `python -m ft_assets artifacts`)")
    if art.asset.rsplit(".", 1)[-1] != GGUF_ASSET:
        raise ServeError(f"{ref} is a {art.asset}, not a {GGUF_ASSET}: serve its GGUF export (recipe export.gguf, "
                         f"then materialize {GGUF_ASSET}[{art.partition}])")
    return gguf_in_export(art.dir, gguf_type, ref)


def run(args, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    try:
        gguf = find_gguf(ArtifactStore(args.home), args.model, args.gguf_type)
    except ServeError as exc:
        print(f"error: {exc}", file=stderr)
        return 2
    if args.host != LOOPBACK and not args.api_key:
        print(f"warning: listening on {args.host} without --api-key: anyone who reaches this port can use the model",
              file=stderr)
    stop = threading.Event()
    # installed before the server starts (a signal while it loads stops it too), restored after
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _serve(gguf, args, stop, stdout, stderr)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve(gguf: Path, args, stop: threading.Event, stdout: TextIO, stderr: TextIO) -> int:
    print(f"starting llama-server on {gguf} ...", file=stdout, flush=True)
    try:
        server = Server.start(gguf, host=args.host, port=args.port, threads=args.threads, ctx=args.ctx,
                              api_key=args.api_key)
    except ServeError as exc:
        print(f"error: {exc}", file=stderr)
        return 2
    print(f"serving {gguf.name} at {server.url} (OpenAI-compatible; llama-server pid {server.process.pid}); "
          "Ctrl-C stops it", file=stdout, flush=True)
    while not stop.wait(0.5):
        if server.process.poll() is not None:
            print(f"error: llama-server exited ({server.process.returncode}):\n{server.tail()}", file=stderr)
            server.stop()
            return server.process.returncode or 1
    server.stop()
    print("stopped", file=stdout, flush=True)
    return 0
