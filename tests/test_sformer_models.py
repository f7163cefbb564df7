"""timm registry entry points ``sformer_*``: build, load a converted checkpoint, reproduce outputs."""

from __future__ import annotations

import socket

import pytest
import timm
import torch

import sj_sfn.models  # noqa: F401  (registers the entry points)
from sj_sfn import SFNode, sformer, zoo
from sj_sfn.models import SFORMER_ARCHS

REQUIRED = [
    "sformer_vit_tiny_patch16_224",
    "sformer_vit_small_patch16_224",
    "sformer_vit_base_patch16_224",
    "sformer_deit_small_patch16_224",
    "sformer_eva02_tiny_patch14_224",
    "sformer_test_vit",
]


def test_entry_points_are_registered():
    names = set(timm.list_models("sformer_*"))
    assert set(REQUIRED) <= names
    assert names == {f"sformer_{a}" for a in SFORMER_ARCHS}
    for a in SFORMER_ARCHS:  # every entry point wraps an architecture timm really has
        assert timm.is_model(a)


def test_pretrained_points_at_local_checkpoints():
    with pytest.raises(ValueError, match="checkpoint_path"):
        timm.create_model("sformer_vit_tiny_patch16_224", pretrained=True)


def test_entry_points_build_offline_with_sites(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("an sformer entry point tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    model = timm.create_model("sformer_eva02_tiny_patch14_224", num_classes=7, img_size=56).eval()
    kinds = [k for _, k, _ in sformer.site_modules(model)]
    assert kinds.count("attn") == len(model.blocks) == 12
    assert all(isinstance(m, SFNode) for _, _, m in sformer.site_modules(model))
    with torch.no_grad():
        assert model(torch.rand(1, 3, 56, 56)).shape == (1, 7)


def test_converted_checkpoint_loads_into_fresh_entry_point(tmp_path, rng):
    ann = timm.create_model("test_vit", img_size=64, num_classes=6).eval()
    calib = [(torch.rand(8, 3, 64, 64, generator=rng),) for _ in range(2)]
    snn = sformer.convert(ann, calib, lam=0.3, max_spikes=16, softmax_max_spikes=8, softmax_cap=0.999, progress=False)
    path = tmp_path / "converted.pth"
    torch.save(snn.state_dict(), path)
    fresh = timm.create_model("sformer_test_vit", img_size=64, num_classes=6, checkpoint_path=str(path)).eval()
    x = torch.rand(4, 3, 64, 64, generator=rng)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), snn(x), rtol=0, atol=0)
    a = {s.name: s.to_dict() for s in sformer.sites(snn)}
    b = {s.name: s.to_dict() for s in sformer.sites(fresh)}
    assert a == b and {s["max_spikes"] for s in a.values() if s["kind"] == "attn"} == {8}


def test_digits_snn_round_trips_through_state_dict(vit_digits_snn, tmp_path, cnn_digits_splits):
    path = tmp_path / "digits_sformer.pth"
    torch.save(vit_digits_snn.state_dict(), path)
    fresh = sformer.prepare(zoo.digits_vit(patch_size=4)).eval()
    fresh.load_state_dict(torch.load(path, weights_only=True))
    x = next(iter(cnn_digits_splits.loader("test", 128)))[0]
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), vit_digits_snn(x), rtol=0, atol=0)
    # repeated calls give the same answer: every forward is one timestep from a zero membrane
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), fresh(x), rtol=0, atol=0)


def test_spike_head_option_must_match(rng, tmp_path):
    ann = timm.create_model("test_vit", img_size=32, num_classes=3).eval()
    snn = sformer.convert(ann, [(torch.rand(4, 3, 32, 32, generator=rng),)], spike_head=False, progress=False)
    assert "head_in" not in {s.kind for s in sformer.sites(snn)}
    path = tmp_path / "nohead.pth"
    torch.save(snn.state_dict(), path)
    timm.create_model("sformer_test_vit", img_size=32, num_classes=3, spike_head=False, checkpoint_path=str(path))
    with pytest.raises(RuntimeError, match="sfn_head_in"):
        timm.create_model("sformer_test_vit", img_size=32, num_classes=3, checkpoint_path=str(path))
