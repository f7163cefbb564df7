"""Calibration and evaluation under torch.distributed (2 processes, gloo, CPU) equal one process."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset

from sj_sfn.distributed import ShardedBatchSampler, shard_loader


def _thresholds(snn) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in snn.state_dict().items() if k.endswith(("theta_pos", "theta_neg"))}


def _worker(rank: int, world: int, init_file: str, payload: dict, out_dir: str) -> None:
    import torch.distributed as dist

    import sj_sfn
    from sj_sfn import sformer
    from sj_sfn.data import load_data
    from sj_sfn.distributed import shard_loader
    from sj_sfn.energy import measure_energy
    from sj_sfn.evaluation import all_reduce_report, distributed_accuracy
    from sj_sfn.tune import tune_lambda
    from sj_sfn.utils import UserError

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ds = TensorDataset(payload["x"], payload["y"])
        loader = shard_loader(DataLoader(ds, batch_size=payload["bs"], shuffle=False))
        cnn = sj_sfn.convert(payload["cnn"], loader, lam=0.05, progress=False)  # the quantile rule, all-reduced
        vit = sformer.convert(payload["vit"], loader, progress=False)
        acc, n = distributed_accuracy(cnn, loader)
        report = all_reduce_report(measure_energy(cnn, loader, ann=payload["cnn"]))
        tuned = tune_lambda(cnn, loader, trials=4, seed=0, progress=False).to_dict()
        try:  # a custom metric that differs between ranks is refused on every rank (no hang)
            tune_lambda(cnn, loader, metric=lambda m, batches: float(dist.get_rank()), trials=1, progress=False)
            refused = ""
        except ValueError as e:
            refused = str(e)
        # the CLI's data splits: every split sharded by whole batches; too few batches for the processes is a clear error
        d = load_data("digits", batch_size=50, distributed=True)
        split_batches = {k: len(getattr(d, k)) for k in ("calib", "val", "test")}
        try:
            load_data("digits", batch_size=1000, distributed=True)
            too_few = ""
        except UserError as e:
            too_few = str(e)
        torch.save({"cnn": _thresholds(cnn), "vit": _thresholds(vit), "acc": acc, "n": n, "batches": len(loader),
                    "report": report.to_dict(), "tuned": tuned, "refused": refused, "split_batches": split_batches,
                    "too_few": too_few}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sharded_batch_sampler_covers_every_batch_once():
    from torch.utils.data import BatchSampler, SequentialSampler

    bs = BatchSampler(SequentialSampler(range(23)), batch_size=4, drop_last=False)
    shards = [list(ShardedBatchSampler(bs, r, 3)) for r in range(3)]
    assert sorted(b for s in shards for b in map(tuple, s)) == sorted(map(tuple, bs))
    assert [len(ShardedBatchSampler(bs, r, 3)) for r in range(3)] == [len(s) for s in shards] == [2, 2, 2]
    with pytest.raises(ValueError):
        ShardedBatchSampler(bs, 3, 3)
    loader = DataLoader(TensorDataset(torch.arange(10.0)), batch_size=3)
    assert shard_loader(loader) is loader  # no process group: unchanged


def _pair_collate(batch):
    return torch.stack([b[0] for b in batch]) * 2


def _noop_init(worker_id):
    torch.manual_seed(worker_id)


def test_shard_loader_keeps_the_loader_options():
    ds = TensorDataset(torch.arange(23.0))
    loader = DataLoader(ds, batch_size=4, collate_fn=_pair_collate, num_workers=1, prefetch_factor=3,
                        persistent_workers=True, timeout=30, worker_init_fn=_noop_init, multiprocessing_context="spawn")
    shards = [shard_loader(loader, rank=r, world=2) for r in range(2)]
    for shard in shards:
        for option in ("num_workers", "prefetch_factor", "persistent_workers", "timeout", "worker_init_fn",
                       "collate_fn", "pin_memory", "multiprocessing_context"):
            assert getattr(shard, option) == getattr(loader, option), option
    # rank r gets batches r, r + 2, ... of the original, through the same collate (×2)
    batches = [b.tolist() for b in DataLoader(ds, batch_size=4, collate_fn=_pair_collate)]
    assert [b.tolist() for b in shards[0]] == batches[0::2]
    assert [b.tolist() for b in shards[1]] == batches[1::2]


@pytest.mark.slow
def test_two_process_calibration_evaluation_and_tuning_equal_single_process(cnn_digits_model, vit_digits_model, cnn_digits_splits):
    import sj_sfn
    from sj_sfn import sformer, zoo
    from sj_sfn.energy import measure_energy
    from sj_sfn.tune import tune_lambda

    x, y = cnn_digits_splits.train.tensors
    x, y = x[:700], y[:700]  # 7 batches of 100: rank 0 gets 4, rank 1 gets 3
    payload = {"x": x, "y": y, "bs": 100, "cnn": cnn_digits_model, "vit": vit_digits_model}
    loader = DataLoader(TensorDataset(x, y), batch_size=100, shuffle=False)
    single_cnn = sj_sfn.convert(cnn_digits_model, loader, lam=0.05, progress=False)
    single_vit = sformer.convert(vit_digits_model, loader, progress=False)
    single_acc = zoo.accuracy(single_cnn, loader)
    single_report = measure_energy(single_cnn, loader, ann=cnn_digits_model).to_dict()
    single_tuned = tune_lambda(single_cnn, loader, trials=4, seed=0, progress=False).to_dict()
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_worker, args=(2, os.path.join(d, "init"), payload, d), nprocs=2, join=True, start_method="spawn")
        r0, r1 = (torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False) for r in range(2))
    assert (r0["batches"], r1["batches"]) == (4, 3)
    for name, single in (("cnn", single_cnn), ("vit", single_vit)):
        ref = _thresholds(single)
        assert ref and set(r0[name]) == set(ref)
        for k, v in ref.items():
            torch.testing.assert_close(r0[name][k], v, rtol=1e-6, atol=1e-7, msg=f"{name} {k}")
            torch.testing.assert_close(r1[name][k], v, rtol=1e-6, atol=1e-7, msg=f"{name} {k}")
    assert r0["n"] == r1["n"] == 700
    assert r0["acc"] == pytest.approx(single_acc, abs=1e-9) and r1["acc"] == r0["acc"]
    # energy: the sample-weighted merge of the two shards' reports is the single-process report
    for r in (r0, r1):
        assert r["report"]["samples"] == 700
        for key in ("ratio", "sops", "events", "macs", "ann_macs"):
            assert r["report"][key] == pytest.approx(single_report[key], rel=1e-9), key
        assert r["report"]["firing_rates"] == pytest.approx(single_report["firing_rates"], rel=1e-9)
        for mine, ref in zip(r["report"]["per_layer"], single_report["per_layer"], strict=True):
            _assert_layer_close(mine, ref)
    # the CLI's splits: the two shards together are the single-process loader, whole batches each
    from sj_sfn.data import load_data

    single_data = load_data("digits", batch_size=50)
    for split in ("calib", "val", "test"):
        total = len(getattr(single_data, split))
        assert r0["split_batches"][split] + r1["split_batches"][split] == total, split
        assert r0["split_batches"][split] - r1["split_batches"][split] in (0, 1), split
    assert r0["too_few"] == r1["too_few"] and "validation split has 1 batches of 1000 for 2 processes" in r0["too_few"]
    # tuning: rank 0's Ax drives both ranks; every trial's λ, accuracy and energy equal one process's
    for r in (r0, r1):
        got, ref = r["tuned"]["trials"], single_tuned["trials"]
        assert [t["lam"] for t in got] == pytest.approx([t["lam"] for t in ref], rel=1e-12)
        assert [t["metric"] for t in got] == pytest.approx([t["metric"] for t in ref], abs=1e-9)
        assert [t["energy_ratio"] for t in got] == pytest.approx([t["energy_ratio"] for t in ref], rel=1e-9)
        assert r["tuned"]["best_lam"] == pytest.approx(single_tuned["best_lam"], rel=1e-12)
        assert "different ranks" in r["refused"]


def _assert_layer_close(mine: dict, ref: dict) -> None:
    for key, value in ref.items():
        if isinstance(value, float):
            assert mine[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (ref["name"], key)
        else:
            assert mine[key] == value, (ref["name"], key)
