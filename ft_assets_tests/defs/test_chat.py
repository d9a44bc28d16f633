"""`python -m ft_assets chat`, as a script and as a person uses it: the one-shot mode (`--prompt`)
in a subprocess, the interactive mode through a pseudo-terminal. Its answers must be exactly what
transformers' greedy `generate` gives for the same conversation (the recipe's system prompt and the
chat template). Models: the tiny pipeline's artifacts (`cards_pipeline` in conftest.py)."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ft_assets_tests.conftest import REPO
from ft_assets_tests.defs.conftest import SYSTEM

QUESTION = "What was total revenue?"
FOLLOW_UP = "And the gross profit?"
TOKENS = 12


def greedy(model, tok, messages: list[dict]) -> str:
    """The reference: transformers' own greedy generate on the chat-templated conversation."""
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=TOKENS, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def env_for(store, root) -> dict:
    return {**os.environ, "FT_HOME": str(store.home), "FT_RECIPE": str(root / "recipe.yaml"),
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def chat(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ft_assets", "chat", *args, "--max-new-tokens", str(TOKENS)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_one_shot_prints_the_greedy_answer_of_the_merged_model(cards_pipeline):
    _, store, _, (root, _) = cards_pipeline
    merged = store.latest("merged_model", "lora").dir
    model, tok = AutoModelForCausalLM.from_pretrained(merged), AutoTokenizer.from_pretrained(merged)
    expected = greedy(model, tok, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}])
    assert expected  # a test that could pass on empty output would prove nothing
    done = chat(["merged_model[lora]", "--prompt", QUESTION], env_for(store, root))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == expected
    assert f"loaded merged_model[lora] {store.latest('merged_model', 'lora').version}" in done.stderr


def test_one_shot_on_a_peft_adapter_loads_base_plus_adapter_and_compares_with_base(cards_pipeline):
    from peft import PeftModel

    _, store, _, (root, _) = cards_pipeline
    base_dir = store.latest("base_model").dir
    tok = AutoTokenizer.from_pretrained(base_dir)
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    tuned = greedy(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir),
                                             store.latest("adapter", "lora").dir), tok, msgs)
    base = greedy(AutoModelForCausalLM.from_pretrained(base_dir), tok, msgs)
    assert tuned and tuned != base
    done = chat(["adapter[lora]", "--prompt", QUESTION, "--compare", "base"], env_for(store, root))
    assert done.returncode == 0, done.stderr
    tuned_label = f"[adapter[lora] {store.latest('adapter', 'lora').version}]"
    base_label = f"[base_model {store.latest('base_model').version}]"
    assert done.stdout.startswith(tuned_label + "\n"), done.stdout
    said_tuned, said_base = done.stdout[len(tuned_label):].split("\n" + base_label + "\n")
    assert (said_tuned.strip(), said_base.strip()) == (tuned, base)


def test_unknown_model_is_a_clear_error(cards_pipeline):
    _, store, _, (root, _) = cards_pipeline
    done = chat(["merged_model[nothere]", "--prompt", "hi"], env_for(store, root))
    assert done.returncode == 2 and "merged_model[nothere]: no such artifact" in done.stderr


def read_until(fd: int, marker: str, seen: str, deadline: float) -> str:
    """Read the terminal until `marker` appears after what was `seen` (or fail at `deadline`)."""
    out = seen
    while marker not in out[len(seen):]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {marker!r} on the terminal in time; it shows:\n{out}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096).decode(errors="replace")
            except OSError:  # the other side closed
                raise AssertionError(f"the chat ended before {marker!r}; the terminal shows:\n{out}") from None
            out += chunk.replace("\r\n", "\n")
    return out


def test_interactive_chat_through_a_terminal_keeps_the_conversation(cards_pipeline):
    _, store, _, (root, _) = cards_pipeline
    merged = store.latest("merged_model", "lora").dir
    model, tok = AutoModelForCausalLM.from_pretrained(merged), AutoTokenizer.from_pretrained(merged)
    turn1 = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    first = greedy(model, tok, turn1)
    second = greedy(model, tok, turn1 + [{"role": "assistant", "content": first},
                                         {"role": "user", "content": FOLLOW_UP}])

    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "ft_assets", "chat", "merged_model[lora]", "--max-new-tokens",
                             str(TOKENS)], cwd=REPO, env=env_for(store, root), stdin=follower, stdout=follower,
                            stderr=follower, close_fds=True)
    os.close(follower)
    deadline = time.monotonic() + 240
    try:
        screen = read_until(leader, "you> ", "", deadline)
        os.write(leader, (QUESTION + "\n").encode())
        after_first = read_until(leader, "you> ", screen, deadline)
        os.write(leader, (FOLLOW_UP + "\n").encode())
        after_second = read_until(leader, "you> ", after_first, deadline)
        os.write(leader, b"/exit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        os.close(leader)
    # the terminal echoes what was typed; each answer follows its question
    assert f"{QUESTION}\nbot> {first}\n" in after_first[len(screen):]
    assert f"{FOLLOW_UP}\nbot> {second}\n" in after_second[len(after_first):]
    assert first and second  # answers that are text, so the comparisons above could fail
