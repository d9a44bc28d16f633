"""`python -m ft_assets chat [REF]`: talk to a trained model in the terminal.

REF is `asset[partition]` or `asset` (its LATEST version in the store: `merged_model[lora]`,
`adapter[prefix]`, `model_card[lora]`, `preference_adapter[dpo]`, `base_model`, `student`), or
a PATH (an artifact directory, or any local transformers checkpoint with safetensors weights).
With several recipes in one deployment, a pipeline's artifact is `<pipeline>.merged_model[lora]`.
REF and the input keys manifests record are read by `asset_keys.parse_key`, the one parser.
`champion[lora]` is the model in use for the method (the one `evaluation.gate` last promoted: its
merged model, or its adapter when it cannot merge). Without REF: the newest champion that holds a
model (of any pipeline), else the newest `merged_model` that holds weights, else the newest `adapter`.

Loading: a directory with `config.json` loads as a causal LM (safetensors only, no remote code);
an adapter (or a merged_model / model_card of a method that cannot merge, which follow their
recorded adapter input) loads as base + adapter with the method's own `load` (peft methods:
`PeftModel.from_pretrained`; QLoRA on the recorded `quantized_base`). The base model and the
tokenizer are the `base_model` version the manifests record, never "whatever is newest".

Each answer: the recipe's `prompt.system` (`--system` overrides) and the conversation so far,
rendered with the tokenizer's chat template, answered greedily (`--max-new-tokens`), tokens
streamed to stdout as they are generated (`TextStreamer`). `--prompt TEXT` answers once and
exits (stdout holds only the answer); otherwise an interactive loop keeps the history until
`/exit` or end of input (`/reset` forgets it). `--compare base` also answers with the recorded
base model, each answer labelled. Messages about loading go to stderr.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from ..artifacts.asset_keys import format_key, parse_key
from ..config.recipe import RecipeError, load_recipe
from ..artifacts.store import Artifact, ArtifactStore

ASSET = re.compile(r"([A-Za-z0-9_]+\.)?[a-z_]+")  # an asset name in REF, `<pipeline>.` first with several recipes
EXIT, RESET = "/exit", "/reset"


class ChatError(RuntimeError):
    """The model to chat with cannot be found or loaded; the message says what to do."""


@dataclass
class Chatbot:
    """One model with its tokenizer and its own side of the conversation."""

    label: str
    model: object
    tokenizer: object
    history: list[dict] = field(default_factory=list)

    def answer(self, system: str | None, user: str, max_new_tokens: int, out: TextIO) -> str:
        """Stream the greedy answer to `user` (after the history) to `out`; returns its text."""
        import torch

        messages = ([{"role": "system", "content": system}] if system else []) + self.history
        messages.append({"role": "user", "content": user})
        enc = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                                 return_tensors="pt")
        streamer = _Streamer(self.tokenizer, out)
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            self.model.generate(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                                max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                                pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id)
        text = "".join(streamer.pieces).strip()
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": text}]
        return text


def _Streamer(tokenizer, out: TextIO):
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        """TextStreamer writing to `out` (flushed per piece) and keeping what it wrote."""

        def __init__(self):
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.pieces: list[str] = []

        def on_finalized_text(self, text: str, stream_end: bool = False):
            self.pieces.append(text)
            out.write(text)
            out.flush()

    return Streamer()


# --------------------------------------------------------------------------------------
# finding and loading
# --------------------------------------------------------------------------------------


def resolve(ref: str | None, store: ArtifactStore) -> Artifact | Path:
    """The artifact (or plain checkpoint directory) REF names; see the module docstring."""
    if ref is None:
        newest_first = sorted(store.list_latest(), key=lambda r: r["created"] or "", reverse=True)
        for asset in ("champion", "merged_model", "adapter"):
            for r in (r for r in newest_first if r["asset"].rsplit(".", 1)[-1] == asset):  # any pipeline's
                art = store.latest(r["asset"], r["partition"])
                if asset == "champion" and champion_record(art)["model"] is not None:
                    return champion_model(store, art)
                if asset == "adapter" or art.manifest().get("mergeable"):
                    return art
        raise ChatError(f"no merged_model or adapter in {store.artifacts_location}; train one first (`make demo`), "
                        "or name a model: chat champion[lora] | merged_model[lora] | PATH")
    named = parse_ref(ref)
    if named and not Path(ref).exists():
        art = store.latest(*named)
        if art is None:
            raise ChatError(f"{ref}: no such artifact in {store.artifacts_location} (see `python -m ft_assets artifacts`)")
        return champion_model(store, art) if art.asset.rsplit(".", 1)[-1] == "champion" else art
    path = Path(ref)
    if not path.is_dir():
        raise ChatError(f"{ref}: neither an artifact name like merged_model[lora] nor a directory")
    return store.find_by_path(path) or path


def champion_record(art: Artifact) -> dict:
    return json.loads((art.dir / "champion.json").read_text())


def champion_model(store: ArtifactStore, champion: Artifact) -> Artifact:
    """The artifact a champion names: its merged model when it merged, else its adapter."""
    model = champion_record(champion)["model"]
    if model is None:
        raise ChatError(f"{art_key(champion)}: no model has passed evaluation.gate yet; name one: chat merged_model[...]")
    pipeline = champion.asset[: -len("champion")]  # "<pipeline>." with several recipes, else ""
    trained = model["trained"]
    art = (store.get(f"{pipeline}merged_model", champion.partition, model["merged_model"]) if model["mergeable"]
           else store.get(trained["asset"], trained["partition"], trained["version"]))
    if art is None:
        raise ChatError(f"{art_key(champion)} names a model version that is no longer in {store.artifacts_location}")
    return art


def parse_ref(ref: str) -> tuple[str, str | None] | None:
    """(asset, partition) when REF is an artifact's name (`asset_keys.parse_key`'s rule), else None."""
    asset, partition = parse_key(ref)
    return (asset, partition) if ASSET.fullmatch(asset) and (partition or "[" not in ref) else None


def _recorded(store: ArtifactStore, art: Artifact, asset: str) -> Artifact | None:
    """The input `asset` (with any partition) whose version `art`'s manifest records."""
    for key, version in art.manifest().get("inputs", {}).items():
        name, part = parse_key(key)
        if name.rsplit(".", 1)[-1] == asset:  # `<pipeline>.<asset>` in a deployment of several recipes
            return store.get(name, part, version)
    return None


def _trained_input(store: ArtifactStore, art: Artifact) -> Artifact | None:
    for asset in ("preference_adapter", "adapter", "merged_model"):
        found = _recorded(store, art, asset)
        if found is not None:
            return found
    return None


def base_of(store: ArtifactStore, target: Artifact | Path) -> Artifact:
    """The base_model version the target was made from (the latest one for a plain directory)."""
    art = target if isinstance(target, Artifact) else None
    while art is not None and art.asset != "base_model":
        found = _recorded(store, art, "base_model")
        if found is not None:
            return found
        art = _trained_input(store, art)
    base = art or store.latest("base_model")
    if base is None:
        raise ChatError(f"no base_model artifact in {store.artifacts_location}: materialize base_model first")
    return base


def load(target: Artifact | Path, store: ArtifactStore, device: str = "cpu") -> tuple[object, object, str]:
    """(model in eval mode, tokenizer, label) for a resolved target."""
    from ..models.base_model import load_model, load_tokenizer

    if isinstance(target, Path):
        if not (target / "config.json").is_file():
            raise ChatError(f"{target} has no config.json: not a transformers checkpoint or an ft_assets artifact")
        tok_dir = target if (target / "tokenizer_config.json").is_file() else base_of(store, target).dir
        return load_model(target, device).eval(), load_tokenizer(tok_dir), str(target)
    label = f"{art_key(target)} {target.version}"
    art = target
    if (art.dir / "config.json").is_file():  # merged, base, student, full fine-tune, model_card with merged weights
        tok_dir = art.dir if (art.dir / "tokenizer_config.json").is_file() else base_of(store, art).dir
        return load_model(art.dir, device).eval(), load_tokenizer(tok_dir), label
    while art is not None and art.asset not in ("adapter", "preference_adapter"):
        art = _trained_input(store, art)  # a merge that could not happen, or a card of one: its adapter
    if art is None:
        raise ChatError(f"{label}: holds no weights and records no adapter to load")
    from ..evaluation import merge
    from ..methods import get_method

    method = get_method(art.manifest()["method"]["type"])
    base = base_of(store, art)
    q = _recorded(store, art, "quantized_base") if method.uses_quantized_base else None
    if method.uses_quantized_base and q is None:
        raise ChatError(f"{art_key(art)} was trained on a quantized_base that is no longer in {store.artifacts_location}")
    model = merge.unmerged(method, base.dir, art.dir, q.dir if q else None, device)
    return model.eval(), load_tokenizer(base.dir), label if art is target else f"{label} (base + {art_key(art)})"


def art_key(art: Artifact) -> str:
    return format_key(art.asset, art.partition)


# --------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", metavar="ASSET[PARTITION] | PATH",
                   help="e.g. merged_model[lora], adapter[prefix] or a directory (default: the newest merged model, "
                        "else the newest adapter)")
    p.add_argument("--prompt", help="answer this once and exit (stdout: only the answer)")
    p.add_argument("--compare", choices=["base"], help="also answer with the base model, each answer labelled")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per answer at most (default 256)")
    p.add_argument("--system", help="system message (default: the recipe's prompt.system)")
    p.add_argument("--recipe", help="recipe whose prompt.system is used (default: $FT_RECIPE or the shipped default)")
    p.add_argument("--home", help="FT_HOME, a directory or a URL such as s3://bucket/prefix (default: $FT_HOME or .ft_home)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")


def run(args, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # library notices would land in the middle of streamed answers
    hf_logging.disable_progress_bar()
    store = ArtifactStore(args.home)
    try:
        system = args.system if args.system is not None else load_recipe(args.recipe).prompt.system
        target = resolve(args.model, store)
        bots = [Chatbot(*_labelled(load(target, store, args.device)))]
        if args.compare == "base":
            base = base_of(store, target)
            bots.append(Chatbot(*_labelled(load(base, store, args.device))))
    except (ChatError, RecipeError) as exc:
        print(f"error: {exc}", file=stderr)
        return 2
    for b in bots:
        print(f"loaded {b.label}", file=stderr)
    labelled = len(bots) > 1
    if args.prompt is not None:
        for b in bots:
            if labelled:
                print(f"[{b.label}]", file=stdout)
            b.answer(system, args.prompt, args.max_new_tokens, stdout)
            print(file=stdout)
        return 0
    print(f"chat with {bots[0].label}; {EXIT} or Ctrl-D quits, {RESET} forgets the conversation", file=stderr)
    while True:
        stdout.write("you> ")
        stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == EXIT:
            print(file=stdout)
            return 0
        text = line.strip()
        if not text:
            continue
        if text == RESET:
            for b in bots:
                b.history.clear()
            continue
        for b in bots:
            stdout.write(f"[{b.label}] " if labelled else "bot> ")
            stdout.flush()
            b.answer(system, text, args.max_new_tokens, stdout)
            stdout.write("\n")
            stdout.flush()


def _labelled(loaded: tuple[object, object, str]) -> tuple[str, object, object]:
    model, tok, label = loaded
    return label, model, tok
