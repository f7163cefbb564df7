"""classification/train.py: trains, resumes onto a longer schedule, and fine-tunes onto another class count."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch

from sj_sfn import zoo
from sj_sfn.utils import UserError

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "classification" / "train.py"


@pytest.fixture(scope="module")
def train():
    spec = importlib.util.spec_from_file_location("classification_train", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load(path: pathlib.Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_train_then_resume_onto_a_longer_schedule(train, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["zoo:digits_cnn", "--data", "digits", "--out", str(out), "--batch-size", "128", "--quiet"]
    assert train.main([*common, "--epochs", "2"]) == 0
    first = _load(out / "last.pth")
    assert first["epoch"] == 1 and [e["epoch"] for e in first["log"]] == [0, 1]
    steps_per_epoch = first["scheduler"]["last_epoch"] // 2
    assert steps_per_epoch > 0
    assert train.main([*common, "--epochs", "4", "--resume", str(out / "last.pth")]) == 0
    last = _load(out / "last.pth")
    assert [e["epoch"] for e in last["log"]] == [0, 1, 2, 3]
    # the schedule was rebuilt for 4 epochs and ran to its end: its last lr is that of a fresh 4-epoch one-cycle
    total = 4 * steps_per_epoch
    assert last["scheduler"]["total_steps"] == last["scheduler"]["last_epoch"] == total
    reference = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(reference, max_lr=3e-3, total_steps=total, pct_start=0.1)
    for _ in range(total):
        reference.step()
        sched.step()
    assert last["optimizer"]["param_groups"][0]["lr"] == pytest.approx(reference.param_groups[0]["lr"], rel=1e-6)
    # training went on from the checkpoint, not from scratch: the resumed epochs beat the first ones
    log = last["log"]
    assert log[3]["loss"] < log[1]["loss"] < log[0]["loss"], log
    assert log[3]["val_accuracy"] >= log[1]["val_accuracy"] and log[3]["val_accuracy"] > 75, log  # percent
    best = _load(out / "best.pth")
    assert best["best_acc"] == max(e["val_accuracy"] for e in log)
    # a shorter schedule than the epochs already trained is refused with a clear message
    capsys.readouterr()
    assert train.main([*common, "--epochs", "3", "--resume", str(out / "last.pth")]) == 2
    assert "already trained 4 epochs" in capsys.readouterr().err


def test_resume_errors_are_clear(train, tmp_path, capsys):
    common = ["--data", "digits", "--out", str(tmp_path / "r"), "--epochs", "1", "--quiet"]
    assert train.main(["zoo:digits_cnn", *common, "--resume", str(tmp_path / "nope.pth")]) == 2
    assert "not found" in capsys.readouterr().err
    torch.save({"model": zoo.small_resnet().state_dict(), "optimizer": {}, "scheduler": {}, "epoch": 0,
                "args": {"model": "zoo:small_resnet"}}, tmp_path / "other.pth")
    assert train.main(["zoo:digits_cnn", *common, "--resume", str(tmp_path / "other.pth")]) == 2
    err = capsys.readouterr().err
    assert "does not match" in err and "zoo:small_resnet" in err
    torch.save(zoo.digits_cnn().state_dict(), tmp_path / "weights.pth")
    assert train.main(["zoo:digits_cnn", *common, "--resume", str(tmp_path / "weights.pth")]) == 2
    assert "not a last.pth" in capsys.readouterr().err


@pytest.mark.parametrize("build", [zoo.digits_cnn, zoo.digits_vit], ids=["sequential_cnn", "timm_vit"])
def test_init_reinitialises_only_the_classifier_head(train, tmp_path, rng, build):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    source = build(num_classes=10)
    torch.save({"model": source.state_dict()}, tmp_path / "pre.pth")
    model = build(num_classes=3)
    fresh_head = {k: v.clone() for k, v in model.state_dict().items() if v.shape != source.state_dict()[k].shape}
    assert fresh_head, "the 3-class head must differ in shape from the 10-class one"
    train._load_init(model, str(tmp_path / "pre.pth"))
    for k, v in model.state_dict().items():
        if k in fresh_head:
            assert torch.equal(v, fresh_head[k]), k  # the head keeps its own fresh initialisation
        else:
            assert torch.equal(v, source.state_dict()[k]), k  # everything else is the pretrained weight
    with torch.no_grad():
        assert model(torch.rand(2, 1, 8, 8, generator=rng)).shape == (2, 3)


def test_init_rejects_a_different_body(train, tmp_path):
    torch.save(zoo.digits_cnn(width=8).state_dict(), tmp_path / "narrow.pth")
    with pytest.raises(UserError, match="outside the classifier head"):
        train._load_init(zoo.digits_cnn(width=16), str(tmp_path / "narrow.pth"))
    torch.save(zoo.small_resnet().state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(UserError, match="missing keys"):
        train._load_init(zoo.digits_cnn(), str(tmp_path / "resnet.pth"))
