"""Every rank's RNG state reaches rank 0's checkpoint as tensors, never as pickles
(`training.distributed.Ranks.gather`): torch's object collectives unpickle what other ranks send, so
a process that took a rank slot could run code on every rank. Two gloo processes on loopback
checkpoint with every pickling collective of torch.distributed made to fail; the checkpoint
holds each rank's own CPU RNG state bit for bit (the file's layout unchanged), a resume restores
it, and states of different lengths (or none) travel as well."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from ft_assets.training import checkpoint
from ft_assets.training.result import TrainResult
from ft_assets.training.distributed import Ranks
from ft_assets.methods import get_method
from ft_assets_tests.training.test_train import lora_model

PICKLING = ("all_gather_object", "gather_object", "broadcast_object_list", "scatter_object_list",
            "send_object_list", "recv_object_list", "_object_to_tensor", "_tensor_to_object")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _no_pickles() -> None:
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    def refused(*args, **kwargs):
        raise AssertionError("a pickling collective was called")

    for name in PICKLING:
        for module in (dist, c10d):
            if hasattr(module, name):
                setattr(module, name, refused)


def _rank_checkpoints(rank: int, port: int, model_dir: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ranks = Ranks.from_env("cpu")
    _no_pickles()
    try:
        model, method = lora_model(Path(model_dir)), get_method("lora")
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        torch.manual_seed(100 + rank)
        torch.rand(3 + rank)  # each rank's generator somewhere of its own
        mine = torch.get_rng_state().clone()
        ckpt = checkpoint.save_checkpoint(Path(out) / "ckpt", 3, model, method, optimizer, scheduler, TrainResult(),
                                          ranks)
        torch.rand(7)  # moves on after the checkpoint; the resume must put it back
        checkpoint.resume(ckpt.parent, model, method, optimizer, scheduler, TrainResult(), ranks)
        restored = torch.get_rng_state().clone()
        uneven = ranks.gather(torch.arange(5, dtype=torch.uint8) if rank else None)
        torch.save({"mine": mine, "restored": restored, "uneven": uneven}, Path(out) / f"rank-{rank}.pt")
    finally:
        ranks.close()


def test_ranks_gather_their_rng_states_as_tensors_into_the_checkpoint(tiny_model_dir, tmp_path):
    mp.start_processes(_rank_checkpoints, args=(_free_port(), str(tiny_model_dir), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    got = [torch.load(tmp_path / f"rank-{r}.pt", weights_only=True) for r in (0, 1)]
    blob = torch.load(tmp_path / "ckpt" / "step-000003" / "state.pt", weights_only=True)
    assert not torch.equal(got[0]["mine"], got[1]["mine"])  # two different states to carry
    for r in (0, 1):
        stored = blob["torch_rng_by_rank"][r]
        assert stored.dtype == torch.uint8 and stored.device.type == "cpu" and torch.equal(stored, got[r]["mine"])
        assert torch.equal(got[r]["restored"], got[r]["mine"])
        assert got[r]["uneven"][0] is None and torch.equal(got[r]["uneven"][1], torch.arange(5, dtype=torch.uint8))
    assert torch.equal(blob["torch_rng"], got[0]["mine"]) and blob["cuda_rng_by_rank"] == [None, None]


def test_one_process_gathers_its_own_state_unchanged():
    state = torch.get_rng_state()
    assert Ranks().gather(state)[0] is state and Ranks().gather(None) == [None]
