"""The training engine without Ray: schedule, exact data split and resume, tiny BLIP steps, exact checkpoints."""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from pipelines.tasks.train_data import (
    DataPlan,
    RankStream,
    ShardRef,
    decode_batch,
    epoch_loader,
    output_positions,
    read_positions,
    sample_seed,
    shuffled,
    write_scene_shards,
)
from pipelines.tasks.train_loop import LoopConfig, OptimConfig, TrainLoop, learning_rate, seed_everything


class KeyTask:
    """A task whose samples are their keys: makes the data order visible."""

    def decode(self, raw: dict[str, bytes], rng_seed: int) -> dict[str, Any]:
        return {"key": raw["__key__"]}

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return {"keys": [s["key"] for s in samples]}


def keys_of(stream: Any) -> list[str]:
    return [key for micro in stream for key in micro.batch["keys"]]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train-shards")
    write_scene_shards(root, num_shards=3, per_shard=16, image_size=32, seed=1, corrupt=(5,))
    return root


def refs(root: Path) -> tuple[ShardRef, ...]:
    return tuple(ShardRef(str(path), 16) for path in sorted((root / "shards").glob("train-*.tar")))


def pretrain_task(augment: bool = True) -> Any:
    from blip_models.configuration_blip import preset, to_dict

    from pipelines.tasks.pretrain import DataConfig, PretrainTask

    data = dataclasses.asdict(DataConfig(batch_size=8, loader_workers=0, augment=augment))
    return PretrainTask(to_dict(preset("tiny")), data, {})


# ---------------------------------------------------------------------------------------------- schedule


def test_learning_rate_follows_blip_schedule() -> None:
    cfg = OptimConfig(lr=3e-4, warmup_lr=1e-6, warmup_steps=100, min_lr=1e-6, lr_decay_rate=0.9)
    assert learning_rate(cfg, 0, 0, 20) == pytest.approx(1e-6)
    assert learning_rate(cfg, 50, 0, 20) == pytest.approx(1e-6 + (3e-4 - 1e-6) / 2)
    assert learning_rate(cfg, 100, 0, 20) == pytest.approx(3e-4)
    assert learning_rate(cfg, 5000, 3, 20) == pytest.approx(3e-4 * 0.9**3)
    assert learning_rate(cfg, 10**6, 200, 300) == pytest.approx(1e-6)  # floor
    cosine = dataclasses.replace(cfg, schedule="cosine", warmup_steps=0)
    assert learning_rate(cosine, 0, 5, 10) == pytest.approx((3e-4 - 1e-6) * 0.5 + 1e-6)


def test_pretraining_alpha_ramps_linearly_over_two_epochs() -> None:
    """BLIP: alpha = 0.4 * min(1, (epoch * iters + i) / (2 * iters)) (spec §3), computed from the loop's step count
    and handed to the model's forward for the ITC distillation targets."""
    from types import SimpleNamespace

    from pipelines.tasks.train_loop import StepInfo

    seen: list[float] = []

    def model(image: Any, input_ids: Any, attention_mask: Any, alpha: float, image_ids: Any) -> Any:
        seen.append(alpha)
        zero = torch.zeros(())
        return SimpleNamespace(loss=zero, loss_itc=zero, loss_itm=zero, loss_lm=zero)

    task = pretrain_task()
    batch = {"image": None, "input_ids": None, "attention_mask": None, "image_ids": None}
    steps_per_epoch = 10
    for step in (0, 5, 10, 15, 20, 35):
        info = StepInfo(step=step, epoch=step // steps_per_epoch, step_in_epoch=step % steps_per_epoch,
                        steps_per_epoch=steps_per_epoch, total_steps=40)  # fmt: skip
        _, metrics = task.loss(model, batch, info)
        assert metrics["alpha"] == seen[-1]
    assert seen == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.4])  # 0 at the first step, full after two epochs


# ---------------------------------------------------------------------------------------------- data plan


@pytest.mark.parametrize(
    ("sizes", "world", "batch", "accum"),
    [((16, 16, 16), 2, 4, 1), ((20,), 4, 2, 1), ((7, 13, 5), 2, 3, 2), ((16, 16, 16), 3, 5, 1)],
)
def test_plan_gives_each_kept_sample_to_exactly_one_rank(sizes: tuple[int, ...], world: int, batch: int, accum: int) -> None:
    shards = tuple(ShardRef(f"shard{i}", n) for i, n in enumerate(sizes))
    plan = DataPlan(shards=shards, world_size=world, batch_size=batch, grad_accum=accum, seed=3)
    for epoch in range(3):
        taken = []
        for rank in range(world):
            pieces = plan.segments(epoch, rank)
            assert sum(stop - start for _, start, stop in pieces) == plan.samples_per_rank
            taken += [(shard.url, i) for shard, start, stop in pieces for i in range(start, stop)]
        assert len(taken) == len(set(taken)) == plan.steps_per_epoch * plan.global_batch
        assert plan.num_samples - len(taken) == plan.dropped_per_epoch < plan.global_batch


def test_resampled_plan_draws_full_epochs() -> None:
    shards = tuple(ShardRef(f"shard{i}", 10) for i in range(4))
    plan = DataPlan(shards=shards, world_size=2, batch_size=5, resampled=True)
    for rank in range(2):
        assert sum(stop - start for _, start, stop in plan.segments(0, rank)) == plan.samples_per_rank == 20
    assert plan.segments(0, 0) != plan.segments(1, 0) or plan.segments(0, 1) != plan.segments(1, 1)


def test_resampled_stream_is_reproducible_and_resumes_exactly(shard_dir: Path) -> None:
    plan = DataPlan(shards=refs(shard_dir), world_size=2, batch_size=4, seed=7, shuffle_buffer=10, resampled=True)
    for rank in range(2):
        full = keys_of(RankStream(plan, KeyTask(), rank, epoch=0))
        assert len(full) == plan.samples_per_rank == 24
        assert keys_of(RankStream(plan, KeyTask(), rank, epoch=0)) == full  # same draws after a restart
        assert keys_of(RankStream(plan, KeyTask(), rank, epoch=0, skip=2)) == full[2 * 4:]
    assert keys_of(RankStream(plan, KeyTask(), 0, 0)) != keys_of(RankStream(plan, KeyTask(), 0, 1))


def test_stream_resume_continues_exactly_where_it_stopped(shard_dir: Path) -> None:
    plan = DataPlan(shards=refs(shard_dir), world_size=2, batch_size=4, seed=7, shuffle_buffer=10)
    for rank in range(2):
        full = keys_of(RankStream(plan, KeyTask(), rank, epoch=1))
        assert len(full) == plan.samples_per_rank
        tail = keys_of(RankStream(plan, KeyTask(), rank, epoch=1, skip=3))
        assert tail == full[3 * 4:]
    both = keys_of(RankStream(plan, KeyTask(), 0, 1)) + keys_of(RankStream(plan, KeyTask(), 1, 1))
    assert len(set(both)) == len(both) == 48  # the epoch covers every sample once
    assert keys_of(RankStream(plan, KeyTask(), 0, 0)) != keys_of(RankStream(plan, KeyTask(), 0, 1))


@pytest.mark.parametrize(("count", "size"), [(0, 5), (3, 10), (50, 0), (50, 1), (50, 2), (50, 50), (1000, 37)])
def test_the_shuffle_buffer_is_a_permutation_that_holds_at_most_its_size(count: int, size: int) -> None:
    order = output_positions(count, size, random.Random("buffer/7"))
    assert sorted(order.tolist()) == list(range(count))
    if size <= 1:
        assert order.tolist() == list(range(count))
    else:  # output k is drawn when item k + size arrives: nothing comes out earlier than that
        assert all(position <= k + size for k, position in enumerate(order.tolist()))
        assert order.tolist() != list(range(count)) or count <= 1
    assert order.tolist() == list(shuffled(iter(range(count)), size, random.Random("buffer/7")))


def whole_stream_batches(stream: RankStream, worker: int, workers: int) -> list[Any]:
    """The reader before positions: every worker read the rank's whole stream through the shuffle buffer and
    decoded its own micro-batches."""
    plan, size = stream.plan, stream.plan.batch_size
    pieces = plan.segments(stream.epoch, stream.rank)
    raws = [raw for _, raw in read_positions(pieces, range(plan.samples_per_rank))]
    rng = random.Random(f"buffer/{plan.seed}/{stream.epoch}/{stream.rank}")
    outputs = list(shuffled(iter(raws), plan.shuffle_buffer, rng))
    batches = []
    for batch in range(stream.skip + worker, len(outputs) // size, workers):
        seeds = [sample_seed(plan.seed, stream.epoch, stream.rank, batch * size + i) for i in range(size)]
        batches.append(decode_batch(stream.task, outputs[batch * size:(batch + 1) * size], seeds))
    return batches


@pytest.mark.parametrize("resampled", [False, True])
def test_each_worker_reads_only_its_samples_and_makes_the_same_batches(shard_dir: Path, tmp_path: Path,
                                                                      resampled: bool) -> None:
    broken = tmp_path / "broken.tar"  # cut mid-shard: its later positions are dropped with their reason
    broken.write_bytes(Path(refs(shard_dir)[1].url).read_bytes()[:9000])
    shards = refs(shard_dir) + (ShardRef(str(broken), 16), ShardRef(str(tmp_path / "gone.tar"), 16))
    for world, batch, accum, buffer in ((1, 4, 1, 10), (2, 3, 2, 7), (1, 5, 1, 0), (2, 4, 1, 100)):
        plan = DataPlan(shards=shards, world_size=world, batch_size=batch, grad_accum=accum, seed=5,
                        shuffle_buffer=buffer, resampled=resampled)
        for rank, epoch, skip, workers in ((0, 0, 0, 1), (world - 1, 1, 3, 1), (0, 2, 0, 3), (0, 1, 5, 2)):
            stream = RankStream(plan, KeyTask(), rank, epoch, skip)
            for worker in range(workers):
                ours = [(m.batch, m.dropped) for m in stream.worker_batches(worker, workers)]
                assert ours == [(m.batch, m.dropped) for m in whole_stream_batches(stream, worker, workers)]
            assert sum(1 for _ in stream) == len(stream)


def test_a_resumed_stream_does_not_open_the_shards_it_has_trained_on(shard_dir: Path, tmp_path: Path) -> None:
    import shutil

    copies = []
    for number, shard in enumerate(refs(shard_dir) * 2):
        copy = tmp_path / f"copy-{number}.tar"
        shutil.copyfile(shard.url, copy)
        copies.append(ShardRef(str(copy), shard.num_samples))
    plan = DataPlan(shards=tuple(copies), world_size=1, batch_size=4, seed=3, shuffle_buffer=6)
    full = keys_of(RankStream(plan, KeyTask(), 0, epoch=0))
    skip = 14
    rng = random.Random(f"buffer/{plan.seed}/0/0")
    first_needed = int(output_positions(plan.samples_per_rank, plan.shuffle_buffer, rng)[skip * 4:].min())
    trained_on = [shard.url for shard, _, _ in plan.segments(0, 0)][:first_needed // 16]
    assert len(trained_on) >= 2
    for shard_url in trained_on:
        Path(shard_url).unlink()
    resumed = list(RankStream(plan, KeyTask(), 0, epoch=0, skip=skip))
    assert [key for micro in resumed for key in micro.batch["keys"]] == full[skip * 4:]
    assert not any(micro.dropped for micro in resumed)  # nothing was asked of the deleted shards


def test_loader_workers_do_not_change_the_order(shard_dir: Path) -> None:
    plan = DataPlan(shards=refs(shard_dir), world_size=1, batch_size=4, seed=7, shuffle_buffer=10)
    inline = keys_of(epoch_loader(plan, KeyTask(), 0, epoch=0, skip=2, num_workers=0))
    parallel = keys_of(epoch_loader(plan, KeyTask(), 0, epoch=0, skip=2, num_workers=2))
    assert parallel == inline and len(inline) == 48 - 8


def test_corrupt_and_missing_samples_are_dropped_and_counted(shard_dir: Path, tmp_path: Path) -> None:
    task = pretrain_task()
    first = refs(shard_dir)[0]
    raws = [raw for _, raw in read_positions([(first, 0, 8)], range(8))]
    micro = decode_batch(task, raws, list(range(8)))
    assert micro.dropped == {"undecodable_image": 1, "refilled": 1}  # sample 5 is corrupt; the batch is refilled
    assert micro.num_samples == 7 and micro.batch["image"].shape == (8, 3, 32, 32)
    broken = tmp_path / "broken.tar"
    broken.write_bytes(Path(first.url).read_bytes()[:3000])  # truncated mid-shard
    positions = [raw for _, raw in read_positions([(ShardRef(str(broken), 16), 0, 16)], range(16))]
    assert len(positions) == 16 and "unreadable_shard" in positions  # positions never shift
    empty = decode_batch(task, ["missing_from_shard"] * 4, [0] * 4)
    assert empty.batch is None and empty.dropped == {"missing_from_shard": 4} and empty.num_samples == 0
    # ... with placeholder samples the model runs on (loss times 0): the same whatever came before in the stream
    assert empty.filler["image"].shape == (4, 3, 32, 32) and len(set(empty.filler["image_ids"].tolist())) == 4
    assert torch.equal(decode_batch(task, ["unreadable_shard"] * 4, [9] * 4).filler["image"], empty.filler["image"])


def test_many_unreadable_shards_in_a_row_stop_the_run_with_the_error(shard_dir: Path, tmp_path: Path) -> None:
    from pipelines.tasks.train_data import UNREADABLE_IN_A_ROW, ShardsUnreadable

    good = refs(shard_dir)[0]
    gone = [ShardRef(str(tmp_path / f"gone-{i}.tar"), 16) for i in range(UNREADABLE_IN_A_ROW)]
    # fewer in a row, a readable shard between them: skipped and counted, as one bad shard is
    pieces = [(shard, 0, 16) for shard in [*gone[:-1], good, *gone[:-1]]]
    reasons = [raw for _, raw in read_positions(pieces, range(16 * len(pieces))) if isinstance(raw, str)]
    assert len(reasons) == 16 * 2 * (UNREADABLE_IN_A_ROW - 1) and set(reasons) == {"unreadable_shard"}
    reader = read_positions([(shard, 0, 16) for shard in [good, *gone]], range(16 * (1 + len(gone))))
    with pytest.raises(ShardsUnreadable, match=f"{UNREADABLE_IN_A_ROW} shards in a row could not be read, the last "
                                               f".*gone-{UNREADABLE_IN_A_ROW - 1}.tar: FileNotFoundError"):
        list(reader)
    stream = RankStream(DataPlan(shards=tuple(gone), world_size=1, batch_size=4), KeyTask(), 0, 0)
    with pytest.raises(ShardsUnreadable) as raised:  # through a DataLoader worker too: the training worker fails
        list(epoch_loader(stream.plan, KeyTask(), 0, epoch=0, skip=0, num_workers=1))
    # ... and the driver says it in one line (Ray Train hands it the workers' exceptions), a bug keeps Ray's error
    from types import SimpleNamespace

    from pipelines.tasks._ray_train import data_failure

    assert data_failure("run-a", SimpleNamespace(worker_failures={1: ValueError("x"), 0: ValueError("y")})) is None
    message = str(data_failure("run-a", SimpleNamespace(worker_failures={1: raised.value, 0: raised.value})))
    assert message.startswith(f"training run 'run-a' stopped on its data (rank 0): {UNREADABLE_IN_A_ROW} shards in a "
                              "row could not be read, the last ") and "\n" not in message and "Traceback" not in message
    # A peer failing beside it (here: its collective timed out when the data-failed rank left) is named, in one line.
    peer = RuntimeError("Traceback (most recent call last):\n  ...\nRuntimeError: [gloo] Connection closed by peer")
    mixed = str(data_failure("run-a", SimpleNamespace(worker_failures={0: peer, 1: raised.value})))
    assert mixed.startswith("training run 'run-a' stopped on its data (rank 1): ") and "\n" not in mixed
    assert "(rank 0 failed too: RuntimeError: [gloo] Connection closed by peer)" in mixed
    bare = str(data_failure("run-a", SimpleNamespace(worker_failures={2: ValueError("x"), 1: raised.value})))
    assert "(rank 2 failed too: ValueError: x)" in bare


def test_shards_of_refuses_a_split_with_no_intact_shard_and_warns_of_damaged_ones(
        shard_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    from datasets_manifests.manifest import Producer
    from datasets_manifests.registry import Registry, RegistryError
    from pipelines.tasks.train_data import shards_of

    registry = Registry(tmp_path / "registry")
    shards = write_scene_shards(tmp_path / "staging", num_shards=3, per_shard=4, image_size=16)
    files = [{"path": path, "role": "shard", "split": "train", "num_samples": n} for path, n in shards]
    version = registry.publish(kind="dataset", name="scenes", staging_dir=tmp_path / "staging",
                               producer=Producer(stage="test"), files=files)  # fmt: skip
    paths = [registry.local_path(version, entry.path) for entry in version.shards("train")]
    paths[0].unlink()
    with caplog.at_level("WARNING"):
        assert len(shards_of(registry, version)) == 3  # trained on: the lost shard's samples are counted
    warned = "scenes@v1: 1 of its 3 'train' shards are missing or cut short (shards/train-000000.tar: missing)"
    assert warned in caplog.text
    for path in paths[1:]:
        path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(RegistryError, match=r"scenes@v1: none of its 3 'train' shards is intact .*train-000002.tar: "
                                            r"\d+ bytes, manifest says \d+\); `blip data verify scenes@v1`"):
        shards_of(registry, version)


def test_capfilt_samples_train_on_each_kept_text() -> None:
    """A CapFilt sample's kept texts (web and synthetic) are drawn per sample seed; plain shards use `.txt`."""
    import io
    import json

    from PIL import Image

    from pipelines.tasks.pretrain import kept_text

    kept = ["a red circle on the left", "a picture of a red circle"]
    document = json.dumps({"caption": kept[0], "captions": kept, "texts": []}).encode()
    raw = {"txt": kept[0].encode(), "json": document}
    draws = [kept_text(raw, seed) for seed in range(40)]
    assert set(draws) == set(kept) and draws == [kept_text(raw, seed) for seed in range(40)]
    assert kept_text({"txt": b"web text", "json": b'{"url": "x"}'}, 0) == "web text"  # web shard: no `captions`
    assert kept_text({"txt": b"web text", "json": b"{broken"}, 0) == "web text"
    assert kept_text({"json": b'{"captions": []}'}, 0) is None
    pair = b'{"caption": "a man riding a horse", "image_id": "coco_1", "idx": 0}'  # a downstream train pair
    assert kept_text({"json": pair}, 3) == "a man riding a horse"
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buffer, format="JPEG")
    task = pretrain_task(augment=False)
    captions = {task.decode({**raw, "jpg": buffer.getvalue()}, seed)["caption"] for seed in range(20)}
    assert captions == set(kept)


def test_pairs_of_one_image_share_an_image_id() -> None:
    from pipelines.tasks.pretrain import image_identity

    first = {"__key__": "000001", "json": b'{"caption": "a horse", "image_id": "coco_1"}'}
    second = {"__key__": "000002", "json": b'{"caption": "a brown horse", "image_id": "coco_1"}'}
    other = {"__key__": "000003", "json": b'{"caption": "a dog", "image_id": "coco_2"}'}
    assert image_identity(first) == image_identity(second) != image_identity(other)
    web = [{"__key__": key, "txt": b"a photo", "json": b'{"image_id": "same"}'} for key in ("a1", "a2")]
    assert image_identity(web[0]) != image_identity(web[1])  # a web sample is its own image
    assert 0 <= image_identity(first) < 2**63


# ---------------------------------------------------------------------------------------------- the loop


def make_loop(shard_dir: Path, steps: int, augment: bool = True) -> tuple[TrainLoop, Any]:
    torch.manual_seed(0)
    seed_everything(0)
    task = pretrain_task(augment)
    plan = DataPlan(shards=refs(shard_dir)[:2], world_size=1, batch_size=8, seed=0, shuffle_buffer=8)
    loop = TrainLoop(task, task.build_model(), OptimConfig(lr=1e-3, warmup_lr=1e-4, warmup_steps=2),
                     LoopConfig(epochs=10, max_steps=steps, log_every=1, checkpoint_every=1000), plan.steps_per_epoch)
    return loop, lambda epoch, skip: epoch_loader(plan, task, 0, epoch, skip)


def test_tiny_blip_loss_falls(shard_dir: Path) -> None:
    loop, batches = make_loop(shard_dir, steps=12)
    logged: list[dict[str, float]] = []
    loop.run(batches, on_log=lambda step, metrics: logged.append(metrics))
    assert len(logged) == 12 and loop.state.step == 12 and loop.state.epoch == 3
    assert {"loss_itc", "loss_itm", "loss_lm", "lr", "samples_per_s", "data_wait_fraction"} <= set(logged[0])
    assert "gpu_utilisation" not in logged[0]  # absent on CPU, not 0
    first, last = sum(m["loss"] for m in logged[:3]) / 3, sum(m["loss"] for m in logged[-3:]) / 3
    assert math.isfinite(last) and last < first - 0.5
    assert loop.state.dropped.get("undecodable_image", 0) >= 1


def test_a_non_finite_loss_stops_the_step_before_the_update(shard_dir: Path) -> None:
    loop, batches = make_loop(shard_dir, steps=2)
    micro = next(iter(batches(0, 0)))
    assert math.isfinite(loop.train_step([micro])["loss"])  # metrics reach the host as floats
    with torch.no_grad():
        loop.model.text_decoder.cls.predictions.bias[0] = float("nan")  # the LM loss, hence the total, is NaN
    # trained weights only: the forward pass itself moves the momentum encoders, as in BLIP
    before = {name: p.detach().clone() for name, p in loop.model.named_parameters() if p.requires_grad}
    with pytest.raises(FloatingPointError, match="loss is not finite at step 1"):
        loop.train_step([micro])
    for name, parameter in loop.model.named_parameters():
        if name in before:
            torch.testing.assert_close(parameter, before[name], rtol=0, atol=0, equal_nan=True)


def test_checkpoint_restore_is_exact(shard_dir: Path, tmp_path: Path) -> None:
    straight, batches = make_loop(shard_dir, steps=6)  # 4 steps per epoch: the restore crosses an epoch
    straight.run(batches)

    first, batches_a = make_loop(shard_dir, steps=6)
    first.total_steps = 3  # stop mid-epoch, as a crash would
    first.run(batches_a)
    first.save(str(tmp_path / "state.pt"))
    torch.manual_seed(123)  # a restarted process has other RNG state until the checkpoint restores it
    resumed, batches_b = make_loop(shard_dir, steps=6)
    resumed.load(str(tmp_path / "state.pt"))
    assert (resumed.state.step, resumed.state.batches_in_epoch, resumed.state.restarts) == (3, 3, 1)
    resumed.run(batches_b)

    expected, actual = straight.model.state_dict(), resumed.model.state_dict()
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    assert resumed.state.samples_seen == straight.state.samples_seen


def test_an_epoch_without_one_usable_sample_stops_the_run_before_its_checkpoint(shard_dir: Path) -> None:
    from pipelines.tasks.train_loop import MicroBatch, NothingTrainedError

    loop, batches = linear_loop(shard_dir, batch_size=8, grad_accum=1, epochs=1)
    loop.run(batches)  # a readable first epoch...
    epochs, steps = loop.state.epoch, loop.steps_per_epoch

    def unreadable(epoch: int, skip: int) -> Any:  # ... then one whose every shard fails
        return (MicroBatch(batch=None, num_samples=0, dropped={"unreadable_shard": 6, "corrupt_sample": 2})
                for _ in range(skip, steps))  # fmt: skip

    checkpoints: list[int] = []
    loop.total_steps += steps
    with pytest.raises(NothingTrainedError, match=f"epoch {epochs}: this rank trained on no sample, every one was "
                                                  rf"dropped \(corrupt_sample: {2 * steps}, unreadable_shard: "
                                                  rf"{6 * steps}\)") as raised:
        loop.run(unreadable, on_checkpoint=lambda current, final: checkpoints.append(current.state.step))
    assert checkpoints == [] and loop.state.epoch == epochs  # the empty epoch is neither checkpointed nor counted
    import pickle

    assert str(pickle.loads(pickle.dumps(raised.value))) == str(raised.value)  # crosses Ray's process boundary


def test_every_task_runs_on_the_placeholder_samples_of_an_emptied_micro_batch() -> None:
    """The filler is decoded and collated by each task (pretraining, and the four finetuning tasks), and a batch
    of it has an ITM negative (distinct image ids)."""
    from blip_models.configuration_blip import preset, to_dict

    from pipelines.tasks.finetune_tasks import TASK_CLASSES
    from pipelines.tasks.train_data import filler_batch

    config = to_dict(preset("tiny"))
    tasks = {"pretrain": pretrain_task()} | {name: TASK_CLASSES[name](config, {"batch_size": 4, "loader_workers": 0})
                                            for name in ("retrieval", "caption", "vqa", "nlvr")}  # fmt: skip
    for name, task in tasks.items():
        filler = filler_batch(task, 4)
        assert filler is not None, name
        images = filler["left"] if name == "nlvr" else filler["image"]
        assert images.shape[1:] == (3, 32, 32) and len(images) == (4 if task.fixed_batch_size else 1), name
    assert filler_batch(KeyTask(), 4) == {"keys": ["filler-0"]}  # any task that decodes it; one that cannot: None
    assert filler_batch(LinearTask(), 4) is None


def test_a_retrieval_micro_batch_left_with_one_image_is_dropped_not_fatal() -> None:
    """Refilled with repeats of its one valid sample, a retrieval micro-batch shows a single image id and has no
    ITM negative: its collate raised and stopped the run on every retry. It is now dropped and counted; a whole
    micro-batch that cannot be collated (the batch size is the problem) still raises with the advice."""
    from blip_models.configuration_blip import preset, to_dict

    from pipelines.tasks.finetune_tasks import TASK_CLASSES

    task = TASK_CLASSES["retrieval"](to_dict(preset("tiny")), {"batch_size": 4, "loader_workers": 0})
    good = {"__key__": "0", "jpg": _jpeg_bytes(), "json": b'{"caption": "a red circle", "idx": 7}'}
    micro = decode_batch(task, [good, "unreadable_shard", "unreadable_shard", "unreadable_shard"], [0, 1, 2, 3])
    assert micro.batch is None and micro.filler is not None
    assert micro.dropped == {"unreadable_shard": 3, "refilled": 3, "batch_unusable": 1} and micro.num_samples == 0
    with pytest.raises(ValueError, match="ITM hard negatives need at least two distinct images"):
        decode_batch(task, [good] * 4, [0, 1, 2, 3])


def _jpeg_bytes() -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(out, format="JPEG")
    return out.getvalue()


def test_a_resumed_epoch_whose_rest_is_unreadable_counts_what_it_trained_before_the_stop(shard_dir: Path) -> None:
    """The check that an epoch trained on something counted from where the run (re)started: a run resumed in an
    epoch whose remaining micro-batches were all dropped stopped with NothingTrainedError on every retry, though
    the epoch had trained before the stop. The count of the epoch is part of the checkpoint now."""
    from pipelines.tasks.train_loop import MicroBatch

    loop, batches = linear_loop(shard_dir, batch_size=8, grad_accum=1, epochs=1)
    steps = loop.steps_per_epoch

    def first_half_readable(epoch: int, skip: int) -> Any:
        readable = list(batches(epoch, 0))
        return (readable[i] if i < steps // 2 else MicroBatch(batch=None, num_samples=0, dropped={"gone": 8})
                for i in range(skip, steps))  # fmt: skip

    loop.total_steps = steps // 2
    loop.run(first_half_readable)
    state = loop.state_dict()
    resumed, _ = linear_loop(shard_dir, batch_size=8, grad_accum=1, epochs=1)
    resumed.load_state_dict(state)
    resumed.run(first_half_readable)  # raised NothingTrainedError before
    assert resumed.state.step == steps and resumed.state.epoch == 1
    assert resumed.state.samples_seen == 8 * (steps // 2)
    assert resumed.state.dropped == {"gone": 8 * (steps - steps // 2)}
    old = {**state, "per_rank": [{key: value for key, value in mine.items() if key != "trained_in_epoch"}
                                 for mine in state["per_rank"]]}  # fmt: skip
    resumed.load_state_dict(old)  # a checkpoint written before the count: not known, not checked in that epoch
    assert resumed.state.trained_in_epoch == -1


def test_a_checkpoint_is_not_resumed_under_another_data_order(shard_dir: Path) -> None:
    """Batch 8 x 1 and 4 x 2 plan the same steps per epoch, but a saved position (micro-batches into the epoch)
    stands for other samples under the other: resumed, it trained some twice and skipped others."""
    loop, _ = linear_loop(shard_dir, batch_size=8, grad_accum=1)
    loop.data_order = {"batch_size": 8, "grad_accum": 1, "seed": 0, "shuffle_buffer": 8, "resampled": False}
    state = loop.state_dict()
    other, _ = linear_loop(shard_dir, batch_size=4, grad_accum=2)
    other.data_order = {**loop.data_order, "batch_size": 4, "grad_accum": 2}
    assert other.steps_per_epoch == loop.steps_per_epoch
    with pytest.raises(ValueError, match=r"the data order changed since the checkpoint \(batch_size 8 -> 4, "
                                         r"grad_accum 1 -> 2\)"):
        other.load_state_dict(state)
    other.data_order = dict(loop.data_order)
    other.load_state_dict(state)  # the same order: resumed
    other.data_order = {**loop.data_order, "seed": 1}
    other.load_state_dict({**state, "data_order": None})  # a checkpoint from before the check: not refused


class LinearTask(KeyTask):
    """y = w * x + b fitted to 1 on the sample numbers: a model small enough to compare exactly."""

    def decode(self, raw: dict[str, bytes], rng_seed: int) -> dict[str, Any]:
        return {"x": int(raw["__key__"]) / 48}

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return {"x": torch.tensor([[s["x"]] for s in samples])}

    def loss(self, model: Any, batch: dict[str, Any], info: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        loss = ((model(batch["x"]) - 1.0) ** 2).mean()
        return loss, {"loss": loss.detach()}


def linear_loop(shard_dir: Path, batch_size: int, grad_accum: int, **loop: Any) -> tuple[TrainLoop, Any]:
    torch.manual_seed(0)
    plan = DataPlan(shards=refs(shard_dir), world_size=1, batch_size=batch_size, grad_accum=grad_accum, seed=0,
                    shuffle_buffer=8)  # fmt: skip
    train = TrainLoop(LinearTask(), torch.nn.Linear(1, 1), OptimConfig(lr=1e-2, warmup_steps=0, grad_accum=grad_accum),
                      LoopConfig(**{"epochs": 3, "log_every": 1, **loop}), plan.steps_per_epoch)  # fmt: skip
    return train, lambda epoch, skip: epoch_loader(plan, LinearTask(), 0, epoch, skip)


def test_gradient_accumulation_equals_the_larger_batch(shard_dir: Path) -> None:
    """Micro-batch 4 x 2 accumulated == batch 8: the same samples per step, the same mean gradient."""
    runs = []
    for batch_size, accum in ((8, 1), (4, 2)):
        train, batches = linear_loop(shard_dir, batch_size, accum)
        train.run(batches)
        runs.append(train)
    single, accumulated = runs
    assert single.state.step == accumulated.state.step == 3 * 48 // 8
    assert single.state.samples_seen == accumulated.state.samples_seen == 3 * 48
    assert accumulated.state.epoch == 3 and accumulated.state.batches_in_epoch == 0
    for expected, actual in zip(single.model.parameters(), accumulated.model.parameters(), strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-7)


def test_gpu_utilisation_is_read_every_step_and_averaged_per_log_window(
    shard_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines.tasks import train_loop

    readings = iter([10.0, 30.0, 50.0, 90.0])
    monkeypatch.setattr(train_loop, "gpu_utilisation", lambda device: next(readings))
    monkeypatch.setattr(train_loop, "_to_device", lambda batch, device: batch)  # the "GPU" is the CPU here
    train, batches = linear_loop(shard_dir, 8, 1, log_every=2, max_steps=4, precision="fp32")
    train.device = torch.device("cuda")
    logged: list[dict[str, float]] = []
    train.run(batches, on_log=lambda step, metrics: logged.append(metrics))
    assert [m["gpu_utilisation"] for m in logged] == [20.0, 70.0]

    train, batches = linear_loop(shard_dir, 8, 1, log_every=2, max_steps=4, precision="fp32")
    train.device = torch.device("cuda")
    monkeypatch.setattr(train_loop, "gpu_utilisation", lambda device: None)  # e.g. NVML not readable
    logged.clear()
    train.run(batches, on_log=lambda step, metrics: logged.append(metrics))
    assert len(logged) == 2 and not any("gpu_utilisation" in m for m in logged)


def test_gpu_utilisation_reads_nvml_only_for_a_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    import pynvml

    from pipelines.tasks.train_loop import gpu_utilisation

    assert gpu_utilisation(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert gpu_utilisation(torch.device("cpu")) is None  # a CPU worker on a GPU node reports no GPU's load
    # NVML as torch.cuda.utilization calls it (pynvml = nvidia-ml-py), faked: device 0 is 63 % busy.
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda index: f"handle{index}")
    monkeypatch.setattr(pynvml, "nvmlDeviceGetUtilizationRates",
                        lambda handle: type("Rates", (), {"gpu": 63 if handle == "handle0" else 0})())
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu_utilisation(torch.device("cuda:0")) == 63.0

    def no_driver() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_driver)
    assert gpu_utilisation(torch.device("cuda:0")) is None


def test_micro_batches_pin_their_tensors_for_the_data_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    """DataLoader(pin_memory=True) pins what it yields through the object's own `pin_memory()`; a MicroBatch
    without one would reach `.to(device, non_blocking=True)` unpinned, i.e. as a synchronous copy."""
    from torch.utils.data._utils.pin_memory import pin_memory as loader_pin_memory  # what DataLoader calls

    from pipelines.tasks.train_loop import MicroBatch

    micro = MicroBatch(batch={"image": torch.zeros(2, 3), "captions": ["a", "b"]}, num_samples=2, dropped={"x": 1})
    if torch.cuda.is_available():
        assert loader_pin_memory(micro).batch["image"].is_pinned()
    pinned: list[torch.Tensor] = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda tensor, *args: pinned.append(tensor) or tensor.clone())
    result = loader_pin_memory(micro)
    assert isinstance(result, MicroBatch) and len(pinned) == 1 and pinned[0] is micro.batch["image"]
    assert result.batch["image"] is not micro.batch["image"] and result.batch["captions"] == ["a", "b"]
    assert (result.num_samples, result.dropped) == (2, {"x": 1})
    empty = MicroBatch(batch=None, num_samples=0)
    assert loader_pin_memory(empty) is empty


# ---------------------------------------------------------------------------------------------- initialisation


def test_init_from_imagenet_vit_weights_reports_what_did_not_fit(tmp_path: Path) -> None:
    """A timm ImageNet ViT's own state dict (here a small one with the tiny preset's dims) loads by key name."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    torch.manual_seed(5)
    vit = TimmViT(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)  # the tiny preset
    torch.save(vit.state_dict(), tmp_path / "vit_in1k.pth")
    task = pretrain_task()
    task.init = dataclasses.replace(task.init, vit_weights=str(tmp_path / "vit_in1k.pth"))
    model = task.build_model()
    assert task.init_report["from"] == "imagenet_vit"
    assert sorted(task.init_report["unexpected"]) == ["head.bias", "head.weight"] and not task.init_report["missing"]
    assert torch.equal(model.visual_encoder.pos_embed, vit.pos_embed)
    assert torch.equal(model.visual_encoder.blocks[1].mlp.fc2.weight, vit.blocks[1].mlp.fc2.weight)
    assert torch.equal(model.visual_encoder_m.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)


def test_base_vit_has_the_key_names_and_shapes_of_timm_vit_base_patch16_224() -> None:
    """What `init.vit_weights` expects of a real ImageNet checkpoint, on the meta device (no memory, no init)."""
    import timm

    from blip_models.configuration_blip import preset
    from blip_models.vit import VisionTransformer

    with torch.device("meta"):
        theirs = timm.create_model("vit_base_patch16_224", pretrained=False).state_dict()
        ours = VisionTransformer(preset("base").vision).state_dict()
    assert set(theirs) - set(ours) == {"head.weight", "head.bias"} and set(ours) <= set(theirs)
    assert all(theirs[key].shape == ours[key].shape for key in ours)


def test_init_from_a_saved_model(tmp_path: Path) -> None:
    from blip_models.checkpoints import save_pretrained

    source = pretrain_task().build_model()
    save_pretrained(source, tmp_path / "model")
    task = pretrain_task()
    task.init = dataclasses.replace(task.init, checkpoint=str(tmp_path / "model"))
    model = task.build_model()
    assert task.init_report["from"] == "version" and not task.init_report["missing"]
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), model.state_dict().values()))


def test_train_cli_resolves_every_dataset_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`blip train --dataset A --dataset B`: B joins A; an unknown one is a one-line error, before Ray starts."""
    from datasets_fixtures import publish_dataset, sample_rows

    from datasets_manifests.registry import Registry
    from pipelines.cli import main

    registry = Registry(tmp_path / "registry")
    publish_dataset(registry, tmp_path / "web", "web", sample_rows(4))
    code = main(["train", "pretrain_tiny", "--dataset", "web", "--dataset", "coco-pairs-nowhere",
                 "--registry", registry.url, "--no-progress"])  # fmt: skip
    error = capsys.readouterr().err
    assert code == 2 and "blip train: error:" in error and "coco-pairs-nowhere" in error
