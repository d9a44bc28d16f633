"""Held-out generation: the token counts behind the eval speed the reports show."""

from __future__ import annotations

import torch
from transformers import AutoTokenizer

from ft_assets.evaluation import heldout
from ft_assets_tests.conftest import formatted_examples


class ScriptedModel:
    """A model whose greedy continuation of prompt i is CONTINUATIONS[i] (what `generate` returns:
    the left-padded prompts, then the new tokens, a finished row padded after its end-of-turn)."""

    def __init__(self, continuations: list[list[int]]):
        self.continuations = continuations
        self.calls = 0

    def eval(self):
        return self

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        rows = self.continuations[self.calls: self.calls + len(input_ids)]
        self.calls += len(input_ids)
        return torch.cat([input_ids, torch.tensor(rows)[:, :max_new_tokens]], dim=1)


def test_generated_tokens_count_up_to_end_of_turn_not_the_padding_after_it(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    eos = tok.eos_token_id
    examples = sorted(formatted_examples(tiny_model_dir, 3), key=lambda e: e.prompt_len)  # generation order
    words = tok(" 12 million", add_special_tokens=False)["input_ids"]
    continuations = [[*words, eos, eos, eos, eos, eos][:5],  # ended after len(words) + 1 tokens, then padded
                     [eos, eos, eos, eos, eos],  # ended at once
                     [words[0]] * 5]  # never ended: the whole budget
    answers, generated = heldout.generate(ScriptedModel(continuations), tok, examples, max_new_tokens=5,
                                          batch_size=2, device="cpu")
    assert generated == [len(words) + 1, 1, 5]
    assert answers[0] == "12 million" and answers[1] == ""
