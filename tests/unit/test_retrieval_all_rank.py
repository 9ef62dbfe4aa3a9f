"""Cross-rank parts on a real 2-process gloo group on 127.0.0.1: ITM hard negatives from every rank
(`negative_all_rank`) and the training step's agreed finiteness check."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from blip_models.gather import all_gather_with_grad
    from blip_models.modeling_retrieval import BlipRetrieval
    from tests.unit._blip_tiny import micro_batch, micro_config

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    result: dict = {}
    try:
        # Gather with gradient: rank r weighs the gathered tensor by r + 1; every rank's slice gets the sum (1 + 2).
        local = torch.full((2, 3), float(rank), requires_grad=True)
        gathered = all_gather_with_grad(local)
        (gathered * (rank + 1)).sum().backward()
        result["gathered"] = gathered.detach().tolist()
        result["grad"] = local.grad.tolist()

        # Each rank's batch holds one image id: no local negative exists, only the other rank's.
        torch.manual_seed(0)  # same weights on both ranks, as DDP would have
        model = BlipRetrieval(micro_config(queue_size=8))
        pixel_values, input_ids, attention_mask = micro_batch(4, seed=10 + rank)
        image_ids = torch.full((4,), rank)
        model.negative_all_rank = True
        output = model(pixel_values, input_ids, attention_mask, image_ids)
        output.loss.backward()
        grad = model.visual_encoder.patch_embed.proj.weight.grad
        result["all_rank_loss"] = float(output.loss)
        result["vision_grad_finite"] = bool(grad is not None and torch.isfinite(grad).all())
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        dist.destroy_process_group()


def test_negatives_from_all_ranks_on_two_processes(tmp_path: Path) -> None:
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for rank, result in enumerate(results):
        assert result["gathered"] == [[0.0] * 3] * 2 + [[1.0] * 3] * 2
        assert result["grad"] == [[3.0] * 3] * 2  # summed over ranks, this rank's rows
        assert result["all_rank_loss"] > 0 and result["vision_grad_finite"], rank


def _finite_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from pipelines.tasks.train_loop import finite_on_every_rank

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        mine = [torch.tensor(1.0), torch.tensor(float("nan") if rank == 1 else 2.0)]
        verdicts = [float(finite_on_every_rank(mine)), float(finite_on_every_rank([torch.tensor(1.0)]))]
        (Path(out_dir) / f"finite{rank}.json").write_text(json.dumps(verdicts))
    finally:
        dist.destroy_process_group()


def test_a_nan_on_one_rank_stops_every_rank(tmp_path: Path) -> None:
    """The training step's finiteness verdict is agreed across ranks (their gradients were averaged together)."""
    mp.start_processes(_finite_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    assert [json.loads((tmp_path / f"finite{rank}.json").read_text()) for rank in range(2)] == [[0.0, 1.0]] * 2


class _LinearTask:
    """y = w * x + b fitted to 1: the training step's cross-rank parts without a model's own collectives."""

    def loss(self, model: torch.nn.Module, batch: dict, info: object) -> tuple[torch.Tensor, dict]:
        loss = ((model(batch["x"]) - 1.0) ** 2).mean()
        return loss, {"loss": loss.detach()}


def _empty_micro_batch_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from datetime import timedelta

    from pipelines.tasks.train_loop import LoopConfig, MicroBatch, OptimConfig, TrainLoop

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=30))  # fmt: skip
    result: dict = {}
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(1, 1))
        loop = TrainLoop(_LinearTask(), model, OptimConfig(lr=0.1, warmup_steps=0), LoopConfig(epochs=1),
                         steps_per_epoch=3)  # fmt: skip
        batch = {"x": torch.tensor([[0.5], [1.5]]) + rank}
        for step in range(3):  # rank 1 lost every sample of its first micro-batch (a missing shard)
            empty = rank == 1 and step == 0
            micro = MicroBatch(batch=None, num_samples=0, dropped={"unreadable_shard": 2},
                               filler={"x": torch.zeros(2, 1)}) if empty else MicroBatch(batch=batch, num_samples=2)
            loop.train_step([micro])
        result["params"] = [p.detach().flatten().tolist() for p in model.parameters()]
        result["samples_seen"] = loop.state.samples_seen
        check = torch.ones(1)
        dist.all_reduce(check)  # the ranks still pair their collectives
        result["after"] = check.item()
    except Exception as error:  # noqa: BLE001 - reported to the test
        result["error"] = f"{type(error).__name__}: {error}"[:300]
    finally:
        Path(out_dir, f"empty{rank}.json").write_text(json.dumps(result))
        dist.destroy_process_group()


def test_a_rank_whose_micro_batch_lost_every_sample_stays_in_step(tmp_path: Path) -> None:
    """A micro-batch whose every sample was dropped (a missing shard) still runs the model, on placeholder samples
    with a loss that counts zero: DDP arms its gradient all-reduce in the forward, and the rank that skipped it
    (the step before) paired its next collective with the other rank's previous one: different gradients on the
    two ranks, then a failed or hung collective. Both ranks now hold the same weights after every step."""
    mp.start_processes(_empty_micro_batch_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2,
                       start_method="spawn")  # fmt: skip
    results = [json.loads((tmp_path / f"empty{rank}.json").read_text()) for rank in range(2)]
    assert [result.get("error") for result in results] == [None, None]
    assert results[0]["params"] == results[1]["params"]
    assert [result["samples_seen"] for result in results] == [6, 4] and results[0]["after"] == 2.0
