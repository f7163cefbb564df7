"""sj_sfn.report: sites by kind, each weight layer's input (spiking or why not), what stays float, the MAC share."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import sj_sfn
from sj_sfn import cli
from sj_sfn.energy import measure_energy

timm = pytest.importorskip("timm")

FINE = {"lam": 1 / 256, "max_spikes": 4096, "calibration": "quantile", "progress": False}
pytestmark = pytest.mark.filterwarnings("ignore:site .*quantile is 0")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.Hardswish(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).eval()


def test_report_of_an_fx_conversion(rng):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    ann = _cnn()
    calib = [torch.randn(8, 3, 8, 8, generator=rng)]
    snn = sj_sfn.convert(ann, calib, **FINE)
    rep = sj_sfn.report(snn)
    assert rep.path == "fx" and not rep.measured
    assert rep.sites_by_kind == {"relu": {"sites": 1, "signed": 0, "positive": 1, "per_channel": 0},
                                 "input": {"sites": 1, "signed": 1, "positive": 0, "per_channel": 0}}
    by = {e.name: e for e in rep.layers}
    assert list(by) == ["0", "4", "8"]
    assert (by["0"].spiking, by["0"].reason) == (False, "analog model input")
    assert by["4"].spiking and by["8"].spiking  # through the max-pool; the signed site after the average pool
    assert rep.floating_point == {"AdaptiveAvgPool2d": 1, "Hardswish": 1}
    # measured: the share of MACs left analog is the first convolution's, as measure_energy counts it
    measured = sj_sfn.report(snn, ann, calib)
    e = measure_energy(snn, calib, ann=ann)
    first = next(r for r in e.per_layer if r.name == "0")
    assert measured.analog_share == pytest.approx(first.ann_macs / e.ann_macs)
    assert measured.ac_share == pytest.approx(1 - e.macs / e.ann_macs)
    assert measured.energy_ratio == pytest.approx(e.ratio)
    assert [x.name for x in measured.analog_layers] == ["0"]
    text = str(measured)
    assert "conversion path: fx; 2 spiking sites" in text and "analog input: 0 (Conv2d" in text
    json.dumps(measured.to_dict())  # JSON-ready


class TinyHybrid(nn.Module):
    """Convolutions around a timm Transformer block, as in MobileViT."""

    def __init__(self) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.act = nn.SiLU()
        self.block = Block(16, num_heads=2, mlp_ratio=2.0)
        self.fuse = nn.Conv2d(32, 16, 1)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv(self.act(self.stem(x))))
        b, c, h, w = y.shape
        t = self.block(y.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, c, h, w)
        y = self.act(self.fuse(torch.cat((y, t), dim=1)))
        return self.head(y.mean((2, 3)))


def test_hybrid_model_gets_input_sites_outside_the_transformer_blocks(rng):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    ann = TinyHybrid().eval()
    calib = [torch.randn(8, 3, 8, 8, generator=rng) for _ in range(2)]
    x = torch.randn(4, 3, 8, 8, generator=rng)
    sformer_only = sj_sfn.sformer.convert(ann, calib, lam=FINE["lam"], max_spikes=FINE["max_spikes"], progress=False)
    snn = sj_sfn.convert(ann, calib, **FINE)
    assert snn.sfn_conversion_path == "sformer+module"
    placed = {e.name: e for e in snn.sfn_placement.layers}
    assert placed["stem"].reason == "analog model input"
    assert placed["block.attn.qkv"].spiking and placed["block.attn.qkv"].site is None  # the SFormer site feeds it
    assert [s for s in snn.sfn_placement.sites] == ["conv.input_site", "fuse.input_site", "head.input_site"]
    before = sj_sfn.report(sformer_only, ann, [x])
    after = sj_sfn.report(snn, ann, [x])
    assert {e.name for e in before.analog_layers} == {"stem", "conv", "fuse", "head"}
    assert [e.name for e in after.analog_layers] == ["stem"]
    assert after.analog_share < before.analog_share
    assert {"qkv_in", "fc1_in", "attn", "input", "linear_in"} <= set(after.sites_by_kind)
    with torch.no_grad():  # fine resolution: the hybrid SNN reproduces the ANN (median 8e-4, max 2e-3 over 10 seeds)
        assert _rel(snn(x), ann(x)) < 0.02, _rel(snn(x), ann(x))
    # the energy-budget allocation (what calibration='budget' runs) sees the new sites and their consumers
    coarse = sj_sfn.convert(ann, calib, lam=0.25, max_spikes=32, calibration="quantile", progress=False)
    alloc = sj_sfn.calibration.allocate_thresholds(coarse, calib[:1], 0.5, grid=8, samples_per_batch=512,
                                                   level_sets="uniform", progress=False)
    chosen = {s.name: s for s in alloc.sites}
    assert all(chosen[n].fanout > 0 for n in ("conv.input_site", "fuse.input_site", "head.input_site"))


def test_cli_convert_prints_the_report_and_writes_it_to_json(tmp_path, capsys):
    out, js = tmp_path / "snn.pth", tmp_path / "c.json"
    rc = cli.main(["convert", "zoo:digits_cnn", "--allow-random-weights", "--data", "digits", "--lam", "0.1",
                   "--calib-samples", "64", "--batch-size", "32", "--out", str(out), "--json", str(js)])
    assert rc == 0
    captured = capsys.readouterr()
    assert "conversion path: fx" in captured.err and "analog input:" in captured.err
    summary = json.loads(js.read_text())
    assert summary["conversion_path"] == "fx"
    assert summary["report"]["layers"][0]["reason"] == "analog model input"
    assert "report" not in json.loads(captured.out)  # stdout keeps the short summary


def test_report_of_an_mtn_conversion_sees_spikes_through_the_scaler(rng):
    from spikingjelly.activation_based import ann2snn

    ann = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    calib = [torch.rand(4, 3, 8, 8, generator=rng)]
    snn = ann2snn.Converter(sj_sfn.MTNRecipe(calib, time_steps=4)).convert(ann)
    rep = sj_sfn.report(snn)
    assert rep.sites_by_kind == {"MTNode": {"sites": 1, "signed": 0, "positive": 1, "per_channel": 0}}
    assert [(e.name, e.spiking) for e in rep.layers] == [("0", False), ("3", True)]  # x·s after the neuron: spikes
    assert [(e.name, e.spiking) for e in sj_sfn.report(snn, ann, calib).layers] == [("0", False), ("3", True)]


def test_a_tied_weight_is_reported_under_its_layer(rng):
    class Tied(nn.Module):  # the head shares the embedding's matrix (GPT-2's lm_head): energy names it 'emb'
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.fc = nn.Linear(8, 8)
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x):
            return self.head(torch.relu(self.fc(x)))

    ann = Tied().eval()
    calib = [torch.randn(8, 8, generator=rng)]
    snn = sj_sfn.convert(ann, calib, placement="module", **FINE)  # keeps emb, the first owner of the matrix
    rep = sj_sfn.report(snn, ann, calib)
    assert [(e.name, e.spiking) for e in rep.layers] == [("fc", False), ("head", True)]
    assert rep.layers[1].ann_macs == pytest.approx(80)
