"""Calibration under torch.distributed: two gloo processes with different data end with the same clips."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_amct.quant import ActivationQuantizer, ifmr_clip

WORLD = 2


def _rank_batches(rank: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(4, 3, 6, generator=gen) * (1 + 2 * rank) + rank for _ in range(2)]


def _calibrate_on_rank(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        quantizer = ActivationQuantizer(8, fixed_min=False, batch_num=2)
        first, second = _rank_batches(rank)
        quantizer(first)
        after_first = (quantizer.clip_max.item(), quantizer.clip_min.item())
        quantizer(second)
        after_second = (quantizer.clip_max.item(), quantizer.clip_min.item())
        broken = ActivationQuantizer(8, fixed_min=False)
        broken.layer_name = "stage2.conv"
        values = torch.ones(8)
        if rank == 1:
            values[3] = float("nan")
        try:
            broken(values)
            error = ""
        except ValueError as exc:
            error = str(exc)
        torch.save({"first": after_first, "second": after_second, "error": error}, Path(out_dir) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ranks_reduce_calibration_statistics(tmp_path: Path) -> None:
    mp.spawn(_calibrate_on_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in range(WORLD)]
    batches = [_rank_batches(rank) for rank in range(WORLD)]
    firsts = torch.cat([b[0].reshape(-1) for b in batches])
    assert results[0]["first"] == results[1]["first"] == (firsts.max().item(), min(firsts.min().item(), 0.0))
    union = torch.cat([b.reshape(-1) for rank_batches in batches for b in rank_batches])  # rank order
    expected = tuple(v.item() for v in ifmr_clip(union, 8))
    assert results[0]["second"] == results[1]["second"] == expected
    assert expected != tuple(v.item() for v in ifmr_clip(torch.cat([b.reshape(-1) for b in batches[0]]), 8))
    # a non-finite value on one rank stops every rank, so none waits forever in a collective
    assert all("stage2.conv" in r["error"] and "non-finite" in r["error"] for r in results)
