"""Command line over the recipe, the artifact store and (`runs`, `prune`) the Dagster instance.

    python -m ft_assets init DATA_FILE [-o recipe.yaml]
                                              guess the column mapping, show three rows through the
                                              chat template, write a commented recipe sized for the file
    python -m ft_assets validate [RECIPE]     exit 0 + summary (with the steps each method will run), or
                                              exit 2 + errors on stderr
    python -m ft_assets artifacts [--json]    latest artifact of every asset/partition
    python -m ft_assets lineage PATH          the chain from an artifact back to raw data files (a
                                              version that is its own ancestor is marked as a cycle)
    python -m ft_assets prune [--keep N] [--delete]
                                              artifact versions nothing kept refers to (the latest and
                                              N newest of each asset/partition stay, and the version
                                              the latest materialization in the Dagster instance
                                              ($DAGSTER_HOME) recorded, with everything they were made
                                              from); lists them, deletes with --delete (a slot a
                                              writer is in at that moment is left alone)
    python -m ft_assets runs [--reap]         unfinished runs, their worker processes and pool slots;
                                              --reap fails the ones whose worker is gone and frees
                                              their slots
    python -m ft_assets chat [ASSET[PARTITION] | PATH] [--prompt TEXT] [--compare base]
                                              chat in the terminal with the newest (or given) merged
                                              model or adapter, streaming greedy answers; --prompt
                                              answers once and exits; --compare base answers with the
                                              base model too
    python -m ft_assets serve [ASSET[PARTITION] | PATH] [--port N]
                                              an OpenAI-compatible endpoint (llama.cpp's llama-server)
                                              over the newest (or given) GGUF export, on 127.0.0.1,
                                              until Ctrl-C
    python -m ft_assets reference [-o PATH]   write the recipe reference (every key, type, default,
                                              allowed values) generated from the schema; default
                                              docs/recipe_reference.md
"""

from __future__ import annotations

import argparse
import json
import textwrap
import sys
from pathlib import Path

from ..artifacts.asset_keys import format_key, parse_key
from ..data.rows import source_path
from ..training.steps import recipe_step_estimates
from ..config.paths import is_url
from ..config.recipe import RecipeError, load_recipes
from ..artifacts.store import ArtifactStore


# Each command: (its line in the list, what it does, an example), as `--help` shows them
COMMANDS = {
    "init": (
        'write a recipe for a data file (guessing its columns)',
        'Read a data file (jsonl, json, csv, parquet, arrow, or a dataset directory), guess which columns '
        'are the question, context and answer (or the conversation, Alpaca or prompt/completion fields), '
        'show three rows through the chat template, and write a commented recipe sized for the file.',
        'python -m ft_assets init data/my_qa.jsonl -o recipes/my_qa.yaml'),
    "validate": (
        'validate a recipe',
        'Check a recipe (every key, path and rule) and print what each method will run: its steps, batch '
        'and learning rate; exit 2 with the errors otherwise.',
        'python -m ft_assets validate recipes/my_qa.yaml'),
    "artifacts": (
        'latest artifact of every asset/partition',
        'List the latest version of every asset and partition in the artifact store, with its path.',
        'python -m ft_assets artifacts --json'),
    "lineage": (
        'the chain from an artifact back to the raw data',
        "Print the chain an artifact was made from, back to the raw data files' hashes.",
        'python -m ft_assets lineage .ft_home/artifacts/merged_model/lora/<version>'),
    "prune": (
        'list (or --delete) artifact versions nothing kept refers to',
        'List the artifact versions nothing kept refers to (a dry run), or delete them with --delete.',
        'python -m ft_assets prune --keep 2 --delete'),
    "runs": (
        'unfinished runs, their worker processes and pool slots',
        'Show the unfinished Dagster runs, their worker processes and the pool slots they hold; --reap '
        'fails the runs whose worker is gone and frees their slots.',
        'python -m ft_assets runs --reap'),
    "chat": (
        'chat in the terminal with a merged model or adapter (streamed, greedy)',
        'Chat in the terminal with the newest champion, merged model or adapter (or the one named), '
        'streaming greedy answers.',
        'python -m ft_assets chat \'merged_model[lora]\' --prompt "What was revenue in 2023?"'),
    "serve": (
        'serve a GGUF export over an OpenAI-compatible API (llama-server), until Ctrl-C',
        "Serve the newest (or named) GGUF export over an OpenAI-compatible API with llama.cpp's llama- "
        'server, on 127.0.0.1, until Ctrl-C.',
        "python -m ft_assets serve 'gguf_model[lora]' --port 8081"),
    "reference": (
        'write the recipe reference generated from the schema',
        'Write the recipe reference (every key, type, default and allowed value) generated from the '
        'schema.',
        'python -m ft_assets reference -o docs/recipe_reference.md'),
}

def command(sub, name: str) -> argparse.ArgumentParser:
    """The subcommand `name`'s parser, with its COMMANDS line, description and example."""
    line, description, example = COMMANDS[name]
    return sub.add_parser(name, help=line, description=textwrap.fill(description, 88), epilog=f"example:\n  {example}",
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def cmd_validate(args) -> int:
    try:
        recipes = load_recipes(args.recipe)
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for recipe in recipes:
        describe(recipe)
    return 0


def describe(recipe) -> None:
    pipeline = f", pipeline {recipe.pipeline!r}" if recipe.pipeline else ""
    print(f"recipe {recipe.name!r} is valid ({recipe.source_file}{pipeline})")
    for ds in recipe.datasets:
        path = source_path(recipe, ds)
        state = "" if path.exists() or ds.format == "hf" else "  (file not found yet)"
        weight = f", mixture weight {ds.weight}" if ds.weight is not None else ""
        schema = "" if ds.schema == "qa" else f", schema {ds.schema}"
        print(f"  dataset {ds.name}: {path} [{ds.format}{schema}], eval fraction {ds.eval_fraction}{weight}{state}")
    b = recipe.base_model
    print(f"  base model: {b.source} {b.id or b.path or 'SmolLM2-135M-Instruct (bundled GGUF)'}")
    print(f"  quantization: {recipe.quantization.method}")
    steps = recipe_step_estimates(recipe)
    for name, spec in recipe.methods.items():
        t = recipe.training_for(name)
        extra = spec.describe()
        if spec.continue_from:
            extra += f", continue_from {spec.continue_from} (replay {spec.replay_fraction:.0%})"
        if t.validation_fraction:
            stop = f", stops after {t.early_stopping_patience} without a new best" if t.early_stopping_patience else ""
            extra += (f", validation on {t.validation_fraction:.0%} of the training rows every "
                      f"{t.validation_every} steps (keeps the best{stop})")
        print(f"  method {name} ({spec.type}): {steps.methods[name].describe()}, batch {t.batch_size}x{t.grad_accum}, "
              f"lr {t.lr}, {t.optimizer}{extra}")
    if recipe.preferences:
        pr = recipe.preferences
        print(f"  preferences {pr.name}: {recipe.dataset_path(pr)} [{pr.format}], eval fraction {pr.eval_fraction}")
    for name, rm in recipe.reward_models.items():
        t = recipe.training_for_reward_model(name)
        print(f"  reward model {name} ({rm.type}): at most {t.max_steps} steps over the training pairs, "
              f"batch {t.batch_size}x{t.grad_accum}, lr {t.lr}")
    for name, pol in recipe.policies.items():
        t = recipe.training_for_policy(name)
        rewards = " + ".join(f"{r.weight:g} {r.reward_model or r.type}" for r in pol.rewards)
        print(f"  policy {name} ({pol.algorithm}): continues adapter[{pol.sft_from}] against {rewards}, "
              f"{pol.num_generations} answers a prompt, beta {pol.beta}, at most {t.max_steps} steps, "
              f"batch {t.batch_size}x{t.grad_accum}, lr {t.lr}")
    for name, gen in recipe.generated_preferences.items():
        ranks = " + ".join(f"{r.weight:g} {r.reward_model or r.type}" for r in gen.rank_by)
        readers = ", ".join(recipe.pairs_readers().get(name, [])) or "nothing yet"
        print(f"  generated preferences {name}: adapter[{gen.generator}] answers {gen.max_prompts or 'all'} training "
              f"prompts {gen.answers_per_prompt} times, ranked by {ranks}; trains {readers}")
    if recipe.distillation:
        d = recipe.distillation
        student = d.student_path or f"teacher layers {d.keep_layers}"
        t = recipe.training_for_distillation()
        print(f"  distillation: merged_model[{d.teacher}] -> student ({student}), alpha {d.alpha}, T {d.temperature}, "
              f"{steps.distillation.describe()}, batch {t.batch_size}x{t.grad_accum}, lr {t.lr}")
    print(f"  recipe hash: {recipe.recipe_hash}")


def cmd_init(args) -> int:
    from .init import run  # torch-free to import; it loads the tokenizer only when it gets that far

    return run(args)


def cmd_artifacts(args) -> int:
    rows = ArtifactStore(args.home).list_latest()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no artifacts under {ArtifactStore(args.home).artifacts_location}")
        return 0
    print(f"{'asset':<16} {'partition':<12} {'data_version':<18} {'created':<26} path")
    for r in rows:
        print(f"{r['asset']:<16} {r['partition'] or '-':<12} {r['data_version']:<18} {r['created'] or '':<26} {r['path']}")
    return 0


def cmd_lineage(args) -> int:
    store = ArtifactStore(args.home)
    art = store.find_by_path(args.path) if not is_url(args.path) else None
    ref = (art.asset, art.partition, art.version) if art else store.remote_ref(args.path)
    if ref is None or store.read_manifest(*ref) is None:
        print(f"error: {args.path} is not inside an artifact version of {store.artifacts_location} "
              "(no manifest.json found)", file=sys.stderr)
        return 2
    chain = lineage(store, *ref)
    if args.json:
        print(json.dumps(chain, indent=2))
    else:
        _print_tree(chain, 0)
    return 0


def cmd_prune(args) -> int:
    from ..defs.recorded import InstanceUnreadable, recorded_reader
    from ..artifacts.slot_locks import SlotLockError

    store = ArtifactStore(args.home)
    try:
        with recorded_reader(store) as recorded:  # the versions the next runs load: kept
            return prune(store, args.keep, args.delete, recorded)
    except InstanceUnreadable as exc:
        print(f"error: {exc}; nothing deleted (prune keeps the versions Dagster recorded, so it must read "
              "them: fix the instance, or point DAGSTER_HOME at the one your runs use)", file=sys.stderr)
        return 2
    except SlotLockError as exc:
        print(f"error: {exc}; nothing deleted", file=sys.stderr)
        return 2


def prune(store: ArtifactStore, keep: int, delete: bool, recorded) -> int:
    """List (and with `delete`, drop) what `retention.plan` lets go; `recorded`: the reader of the
    versions Dagster recorded (`defs.recorded`), None without an instance."""
    from ..defs.recorded import instance_home
    from ..artifacts.retention import apply, plan

    try:
        p = plan(store, keep, recorded() if recorded else None)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    mib = 1 << 20
    print(f"{store.artifacts_location}: {len(p.kept)} versions kept (the latest and the {keep} newest of each "
          f"asset/partition, the ones Dagster recorded last, and what they were made from), {len(p.drop)} to drop "
          f"({p.drop_bytes / mib:.1f} MiB)")
    if recorded is None:
        print(f"  no Dagster instance at {instance_home(store)} ($DAGSTER_HOME): no recorded version to keep")
    for (asset, part, version), why in p.kept.items():
        if why.startswith("recorded by"):  # kept though neither LATEST nor among the newest
            print(f"  keep {format_key(asset, part):<28} {version}: {why}")
    for v in p.drop:
        print(f"  drop {v.key:<28} {v.version:<18} {v.created:<26} {v.bytes / mib:9.1f} MiB")
    for d in p.leftovers:
        print(f"  drop {d} (left by an interrupted prune)")
    if not delete:
        if p.drop or p.leftovers:
            print("dry run: nothing deleted; rerun with --delete to delete these")
        return 0
    done = apply(store, p, recorded)
    for (asset, part, version), why in done.spared.items():
        print(f"  kept {format_key(asset, part):<28} {version}: {why}")
    print(f"deleted {len(done.dropped)} versions, {done.freed / mib:.1f} MiB freed")
    return 0


def lineage(store: ArtifactStore, asset: str, partition: str | None, version: str) -> dict:
    """The artifact's manifest facts and those of everything it was made from, depth first. A
    version that is its own ancestor (a manifest edited to name itself, or a cycle) appears again
    only as {asset, partition, version, "cycle": True}, not followed. No recursion: a chain as long
    as the store holds is walked."""
    root, pending = _lineage_node(store, asset, partition, version)
    todo = [(root, pending, frozenset({(asset, partition, version)}))]  # node, its inputs, itself and its ancestors
    while todo:
        node, pending, above = todo.pop()
        for key, ver in pending:
            if key.startswith("raw/"):
                node["inputs"].append({"asset": key, "version": ver, "raw_file": True})
                continue
            ref = (*parse_key(key), ver)
            if ref in above:
                node["inputs"].append({"asset": ref[0], "partition": ref[1], "version": ver, "cycle": True})
                continue
            child, child_pending = _lineage_node(store, *ref)
            node["inputs"].append(child)
            todo.append((child, child_pending, above | {ref}))
    return root


def _lineage_node(store: ArtifactStore, asset: str, partition: str | None, version: str) -> tuple[dict, list]:
    """(the version's node, its manifest's inputs still to follow, by key)."""
    m = store.read_manifest(asset, partition, version)  # nothing is downloaded from a remote store
    if m is None:
        return {"asset": asset, "partition": partition, "version": version, "missing": True}, []
    where = store.remote.url_of(store.rel(asset, partition, version)) if store.remote else \
        str(store.path(asset, partition, version))
    node = {"asset": asset, "partition": partition, "version": version, "path": where,
            "recipe_hash": m.get("recipe_hash"), "code_version": m.get("code_version"), "seed": m.get("seed"),
            "created": m.get("created"), "inputs": []}
    return node, sorted((m.get("inputs") or {}).items())


def _print_tree(node: dict, depth: int) -> None:
    todo = [(node, depth)]
    while todo:
        node, depth = todo.pop()
        pad = "  " * depth
        label = format_key(node["asset"], node.get("partition"))
        if node.get("raw_file"):
            print(f"{pad}{label}  sha256:{node['version']}  (raw data file)")
            continue
        if node.get("cycle"):
            print(f"{pad}{label}  {node['version']}  (cycle: already shown above)")
            continue
        extra = "  MISSING" if node.get("missing") else f"  recipe {node['recipe_hash']}  code {node['code_version']}  seed {node['seed']}"
        print(f"{pad}{label}  {node['version']}{extra}")
        todo += [(child, depth + 1) for child in reversed(node.get("inputs", []))]


def cmd_runs(args) -> int:
    import dagster as dg

    from ..demo import ensure_instance
    from ..defs.runs import UNFINISHED, WORKER_TAG, Proc, blocked_steps, held_slots, reap_dead_runs

    instance = ensure_instance()
    if args.reap:
        reaped = reap_dead_runs(instance, print)
        print(f"{len(reaped)} run(s) cleaned up")
    slots = held_slots(instance)
    runs = instance.get_runs(dg.RunsFilter(statuses=UNFINISHED))
    if not runs and not slots:
        print("no unfinished runs, no pool slot held")
    for run in runs:
        worker = Proc.parse(run.tags.get(WORKER_TAG))
        held = ", ".join(f"{pool} ({step})" for pool, step in slots.get(run.run_id, [])) or "none"
        print(f"run {run.run_id}  {run.status.value:<9} worker {worker.describe() if worker else 'not recorded'}  "
              f"slots held: {held}")
    for b in blocked_steps(instance, after_s=0):
        print(f"waiting: run {b.run_id}: {b.explanation}")
    return 0


def cmd_chat(args) -> int:
    from .chat import run  # torch and transformers load only for this command

    return run(args)


def cmd_serve(args) -> int:
    from .serve import run

    return run(args)


def cmd_reference(args) -> int:
    from .reference import REFERENCE_FILE, write

    print(f"wrote {write(Path(args.output) if args.output else REFERENCE_FILE)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ft_assets", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    i = command(sub, "init")
    from .init import add_arguments

    add_arguments(i)
    v = command(sub, "validate")
    v.add_argument("recipe", nargs="?", help="recipe file, a directory of them, or several joined by ':' "
                                             "(default: $FT_RECIPE or the shipped default)")
    a = command(sub, "artifacts")
    a.add_argument("--json", action="store_true")
    a.add_argument("--home", help="FT_HOME, a directory or a URL such as s3://bucket/prefix (default: $FT_HOME or .ft_home)")
    lin = command(sub, "lineage")
    lin.add_argument("path", help="a directory or file inside an artifact version, or its URL on an object store")
    lin.add_argument("--json", action="store_true")
    lin.add_argument("--home", help="FT_HOME, a directory or a URL such as s3://bucket/prefix (default: $FT_HOME or .ft_home)")
    pr = command(sub, "prune")
    pr.add_argument("--keep", type=int, default=1, help="newest versions kept per asset/partition (default 1)")
    pr.add_argument("--delete", action="store_true", help="delete them (default: a dry run that lists them)")
    pr.add_argument("--home", help="FT_HOME, a directory or a URL such as s3://bucket/prefix (default: $FT_HOME or .ft_home)")
    r = command(sub, "runs")
    r.add_argument("--reap", action="store_true", help="fail the runs whose worker process is gone, free their slots")
    ch = command(sub, "chat")
    from .chat import add_arguments as chat_arguments

    chat_arguments(ch)
    se = command(sub, "serve")
    from .serve import add_arguments as serve_arguments

    serve_arguments(se)
    ref = command(sub, "reference")
    ref.add_argument("-o", "--output", help="markdown file to write (default: docs/recipe_reference.md in the repo)")
    args = p.parse_args(argv)
    return {"init": cmd_init, "validate": cmd_validate, "artifacts": cmd_artifacts, "lineage": cmd_lineage,
            "prune": cmd_prune, "runs": cmd_runs, "chat": cmd_chat, "serve": cmd_serve,
            "reference": cmd_reference}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
