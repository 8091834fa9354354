"""Ranks whose script ends right after their last collectives exit cleanly.

Real processes (spawned, as ``ddp_spawn`` starts them; gloo on CPU), each a script that ends
after exchanging a few objects. Without :func:`end_group_at_exit`, 20 of 60 such pairs aborted
at exit on two cores: ten pass together by chance in about 2 runs of 100. This module imports
torch alone, so that a spawned rank starts in about a second.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_amct.training.collectives import end_group_at_exit, several_ranks


def _exchange_then_end(rank: int, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    assert several_ranks()
    end_group_at_exit()
    end_group_at_exit()  # a second call registers nothing more
    for _ in range(3):
        dist.all_reduce(torch.zeros(1))
        received: list[object] = [None, None]
        dist.all_gather_object(received, {"rank": rank, "values": torch.randn(100)})
        assert [item["rank"] for item in received] == [0, 1]


def test_ranks_that_end_right_after_their_collectives_exit_cleanly(tmp_path: Path) -> None:
    for run in range(10):  # a rank that aborts raises ProcessExitedException here
        mp.start_processes(_exchange_then_end, args=(str(tmp_path / f"store{run}"),), nprocs=2, start_method="spawn")


def test_a_single_process_runs_no_collectives() -> None:
    assert not several_ranks()
