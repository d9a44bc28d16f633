"""What a training loop minimises: an `Objective` binds to the model once and gives a `LossSum`,
the function of a micro-batch that returns (loss summed over its labelled positions, how many
there were, extra sums to log by name). `prepared.CrossEntropy` is SFT's;
`trainers.distill.Distillation` is another."""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch

# a micro-batch -> (loss summed over its labelled positions, how many, extra sums to log by name)
LossSum = Callable[[dict[str, Any]], tuple[torch.Tensor, int, dict[str, torch.Tensor]]]


class Objective(Protocol):
    packs: bool  # may the loop pack its micro-batches (`training.packing`)? Else they are padded.

    def bind(self, model) -> LossSum:
        """The loss of `model` on a micro-batch: (loss summed over its labelled positions, how many
        there were, extra sums to log by name). Sums, not means: the loop normalises by the label
        count of the whole step. Called once per run (`training.prepared.prepare`): look up what the
        model allows here, not per batch."""
