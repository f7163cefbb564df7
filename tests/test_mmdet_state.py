"""MMDetection backbones: what a checkpoint says about its SNN trunk (calibrated or stale, λ and N).

Tiny backbones, no detector training: a checkpoint written after the ANN trained must not pass
the previous SNN trunk off as calibrated, and a converted checkpoint runs (and reports) the λ/N
it was converted with, whatever the config says.
"""

from __future__ import annotations

import copy
import importlib.util

import numpy as np
import pytest
import torch
from fixtures_det import ROOT, _have_mmdet

pytestmark = pytest.mark.skipif(not _have_mmdet(), reason="needs mmdet and mmcv with ops (pip install 'sj-sfn[det]')")

TINY = {
    "vit": (dict(type="SFormerViT", model_name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=1,
                 num_heads=2, out_strides=(8, 16)), 32),
    "cnn": (dict(type="SFNTimmBackbone", model_name="resnet10t", timm_kwargs=dict(channels=(8, 16, 32, 64), stem_width=8)), 64),
}


def _build(kind: str, **snn):
    from mmdet.registry import MODELS

    import sj_sfn.mmdet  # noqa: F401

    cfg, _ = TINY[kind]
    return MODELS.build(copy.deepcopy({**cfg, "snn": dict(snn)}))


def _inputs(kind: str, rng: torch.Generator, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, TINY[kind][1], TINY[kind][1], generator=rng)


def _fresh(kind: str, rng: torch.Generator, **snn):
    """A backbone with real BatchNorm statistics (CNN), before any calibration."""
    bb = _build(kind, **snn)
    if kind == "cnn":
        bb.train()
        with torch.no_grad():
            for _ in range(2):
                bb(_inputs(kind, rng, 8))
    return bb


def _train_step(bb, x: torch.Tensor) -> None:
    bb.train()
    opt = torch.optim.SGD(bb.parameters(), lr=0.1)
    sum(o.sum() for o in bb(x)).backward()
    opt.step()


def _snn_out(bb, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    bb.eval()
    with torch.no_grad():
        return bb(x)


def _assert_same(a, b, exact: bool = True) -> None:
    for u, v in zip(a, b, strict=True):
        if exact:
            torch.testing.assert_close(u, v, rtol=0, atol=0)
        else:
            torch.testing.assert_close(u, v)


def _sites(bb) -> dict[str, set]:
    """λ and N over the SFN sites of the SNN trunk."""
    from sj_sfn import sfn_nodes

    nodes = [m for _, m in sfn_nodes(bb.snn_trunk)]
    assert nodes
    return {"lam": {round(float(m.lam), 6) for m in nodes}, "max_spikes": {int(m.max_spikes) for m in nodes}}


def _reload(kind: str, state: dict, **snn):
    bb = _build(kind, **snn)
    bb.load_state_dict(state)
    bb.eval()
    return bb


@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_checkpoint_after_ann_training_is_not_calibrated(kind, rng):
    from sj_sfn.mmdet import SNNNotCalibratedError

    snn = dict(lam=0.25, max_spikes=32)
    bb = _fresh(kind, rng, **snn)
    calib = [_inputs(kind, rng, 4) for _ in range(2)]
    x = _inputs(kind, rng)
    bb.eval()
    bb.convert_trunk(calib)  # the validation after epoch 1
    assert bb.is_snn_ready and bool(bb.state_dict()["snn_calibrated"])
    snn_out = _snn_out(bb, x)  # an eval forward (validation) leaves it calibrated
    assert bb.is_snn_ready

    # an unchanged calibrated backbone reloads as ready and runs the same SNN
    same = _reload(kind, bb.state_dict(), **snn)
    assert same.is_snn_ready
    _assert_same(_snn_out(same, x), snn_out)

    _train_step(bb, x)  # epoch 2 trains the ANN: the SNN trunk is the previous epoch's
    assert not bb.is_snn_ready
    state = bb.state_dict()
    assert not bool(state["snn_calibrated"])
    with pytest.raises(SNNNotCalibratedError, match="after the SNN was calibrated"):
        _snn_out(bb, x)

    stale = _reload(kind, state, **snn)
    assert not stale.is_snn_ready
    with pytest.raises(SNNNotCalibratedError, match=r"no calibration source.*snn\.calib"):
        _snn_out(stale, x)

    bb.convert_trunk(calib)  # the validation after epoch 2 recalibrates: ready and saved as such again
    assert bb.is_snn_ready and bool(bb.state_dict()["snn_calibrated"])
    again = _reload(kind, bb.state_dict(), **snn)
    assert again.is_snn_ready
    _assert_same(_snn_out(again, x), _snn_out(bb, x))


def test_stale_checkpoint_recalibrates_from_the_config_source(tmp_path, rng):
    """A reloaded stale checkpoint converts again from snn.calib, exactly as the trained backbone does."""
    from PIL import Image

    for i in range(3):
        px = torch.randint(0, 256, (32, 32, 3), generator=rng, dtype=torch.uint8).numpy()
        Image.fromarray(np.ascontiguousarray(px)).save(tmp_path / f"{i}.png")
    pipeline = [dict(type="LoadImageFromFile"), dict(type="Resize", scale=(32, 32), keep_ratio=False),
                dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor"))]
    snn = dict(lam=0.25, max_spikes=32, calib=dict(img_dir=str(tmp_path), pipeline=pipeline, num_images=3, batch_size=2))
    bb = _fresh("vit", rng, **snn)
    x = _inputs("vit", rng)
    bb.eval()
    bb.convert_trunk()
    _train_step(bb, x)
    stale = _reload("vit", bb.state_dict(), **snn)
    assert not stale.is_snn_ready
    out = _snn_out(stale, x)  # converts first, from snn.calib
    assert stale.is_snn_ready
    bb.eval()
    bb.convert_trunk()
    _assert_same(out, _snn_out(bb, x), exact=False)


@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_converted_lambda_and_n_come_from_the_checkpoint(kind, rng):
    # detection/convert.py --max-spikes 16 --lam 0.6 on a config with λ = 0.25
    bb = _fresh(kind, rng, lam=0.25, max_spikes=16)
    calib = [_inputs(kind, rng, 4) for _ in range(2)]
    x = _inputs(kind, rng)
    bb.eval()
    bb.convert_trunk(calib, lam=0.6)
    assert _sites(bb) == {"lam": {0.6}, "max_spikes": {16}}
    snn_out = _snn_out(bb, x)

    loaded = _reload(kind, bb.state_dict(), lam=0.25, max_spikes=32)  # the config says λ = 0.25, N = 32
    assert loaded.is_snn_ready
    assert loaded.snn_cfg["lam"] == 0.6 and loaded.snn_cfg["max_spikes"] == 16
    _assert_same(_snn_out(loaded, x), snn_out)
    assert loaded.snn_site_settings() == bb.snn_site_settings()

    # a later recalibration keeps the checkpoint's λ and N, not the config's
    _train_step(loaded, x)
    loaded.eval()
    loaded.convert_trunk(calib)
    assert _sites(loaded) == {"lam": {0.6}, "max_spikes": {16}}


def _detection_test_script():
    spec = importlib.util.spec_from_file_location("detection_test_script", ROOT / "detection" / "test.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_detection_test_reports_the_lambda_the_trunk_runs(tmp_path, capsys):
    """detection/test.py on a real converted RetinaNet: λ and N of the loaded SNN trunk (not the config's),
    one value or min–max over the sites."""
    from fixtures_det import RETINA_CFG

    from sj_sfn import set_lambda, sfn_nodes
    from sj_sfn.mmdet import tools
    from sj_sfn.mmdet.synthetic import make_shapes_dataset

    root = str(tmp_path / "shapes")
    make_shapes_dataset(root, {"train": 4, "val": 4}, image_size=96, seed=0)
    # converted at N=16 and λ=0.6; the config that test.py reads says N=32, λ=0.25 (both give the SoftMax
    # sites 128 levels: softmax_max_spikes), so N is reported as the range 16-128
    cfg = tools.load_config(RETINA_CFG, data_root=root, cfg_options={"model.backbone.snn.max_spikes": 16})
    model = tools.build_detector(cfg)
    tools.convert_detector(model, tools.calib_loader_from_cfg(cfg, "train", 4, 2, model=model), lam=0.6)
    ckpt = tools.save_checkpoint(model, str(tmp_path / "snn.pth"))
    script = _detection_test_script()
    argv = [RETINA_CFG, ckpt, "--data-root", root, "--split", "val", "--energy-images", "2"]
    res = script.main(argv)
    assert res["lam"] == 0.6 and res["max_spikes"] == [16, 128]
    assert set(res["snn"]) >= {"bbox_mAP"} and 0 < res["energy_ratio"] < 10
    assert "λ=0.6, N=16–128" in capsys.readouterr().out

    snn_trunk = tools.spiking_backbone(model).snn_trunk
    names = [n for n, _ in sfn_nodes(snn_trunk)]
    assert len(names) > 1
    set_lambda(snn_trunk, 0.3, names=names[:1])  # per-site λ
    argv[1] = tools.save_checkpoint(model, str(tmp_path / "mixed.pth"))
    res = script.main(argv)
    assert res["lam"] == [0.3, 0.6] and res["max_spikes"] == [16, 128]
    assert "λ=0.3–0.6, N=16–128" in capsys.readouterr().out


@pytest.mark.parametrize("model_name, frozen", [("resnet10t", ("conv1", "bn1", "layer1")), ("mobilenetv2_100", ("conv_stem", "bn1", "blocks.0", "blocks.1"))])
def test_frozen_stages_stop_gradients_and_batchnorm_updates(rng, model_name, frozen):
    """``frozen_stages=1`` (mmdet's ResNet default): the stem and stage 1 neither learn nor update BN statistics."""
    from sj_sfn.mmdet.backbones import SFNTimmBackbone

    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    b = SFNTimmBackbone(model_name, frozen_stages=1)

    def is_frozen(name: str) -> bool:
        return any(name == f or name.startswith(f + ".") for f in frozen)

    before = {k: v.clone() for k, v in b.trunk.state_dict().items()}
    assert {n for n, p in b.trunk.named_parameters() if not p.requires_grad} == {n for n, _ in b.trunk.named_parameters() if is_frozen(n)}
    b.train()
    assert all(not m.training for n, m in b.trunk.named_modules() if n and is_frozen(n))
    opt = torch.optim.SGD([p for p in b.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        sum(o.square().mean() for o in b(torch.randn(2, 3, 64, 64, generator=rng))).backward()
        opt.step()
    after = b.trunk.state_dict()
    changed = {k for k in before if k.endswith(("weight", "running_mean")) and not torch.equal(before[k], after[k])}
    assert changed and not any(is_frozen(k.rsplit(".", 1)[0]) for k in changed)  # later stages learn, frozen ones do not
    assert all(torch.equal(before[k], after[k]) for k in before if is_frozen(k.rsplit(".", 1)[0]))
    with pytest.raises(ValueError, match="frozen_stages must be an int in"):
        SFNTimmBackbone(model_name, frozen_stages=9)


def test_set_epochs_stretches_schedules_and_intervals():
    from sj_sfn.mmdet import tools

    shapes = tools.load_config(str(ROOT / "detection" / "configs" / "shapes" / "mask-rcnn_sformer-vit-tiny_shapes.py"))
    tools.set_epochs(shapes, 10)
    warmup, cosine = shapes.param_scheduler
    assert shapes.train_cfg.max_epochs == 10 and cosine["end"] == 10 and warmup["end"] == 20  # iteration warm-up stays
    assert shapes.default_hooks.checkpoint.interval == 10 and shapes.train_cfg.val_interval == 11  # last only; never
    coco = tools.load_config(str(ROOT / "detection" / "configs" / "coco" / "mask-rcnn_sfn-r50_fpn_1x_coco.py"))
    tools.set_epochs(coco, 24)
    steps = next(s for s in coco.param_scheduler if s["type"] == "MultiStepLR")
    assert coco.train_cfg.max_epochs == 24 and steps["end"] == 24 and steps["milestones"] == [16, 22]
    assert coco.default_hooks.checkpoint.interval == 1 and coco.train_cfg.val_interval == 1  # every epoch, as before
    with pytest.raises(ValueError, match="epochs must be an int >= 1"):
        tools.set_epochs(coco, 0)


def test_metric_names_follow_the_evaluator():
    from sj_sfn.mmdet import tools

    coco = ROOT / "detection" / "configs" / "coco"
    retina = tools.load_config(str(coco / "retinanet_sfn-r50_fpn_1x_coco.py"))
    mask = tools.load_config(str(coco / "mask-rcnn_sfn-r50_fpn_1x_coco.py"))
    assert "bbox_mAP" in tools.metric_names(retina) and not any(m.startswith("segm") for m in tools.metric_names(retina))
    assert {"bbox_mAP", "segm_mAP", "segm_mAP_50"} <= set(tools.metric_names(mask))
    with pytest.raises(ValueError, match="is not one the val evaluator reports"):
        tools.check_metric(retina, "segm_mAP")


def test_img_dir_calibration_takes_the_test_pipeline_and_the_detector_preprocessor(tmp_path):
    """A config's ``snn.calib=dict(img_dir=...)`` calibrates on what the backbone will see, not on library defaults."""
    from sj_sfn.mmdet import tools

    cfg_path = tmp_path / "cfg.py"
    base = ROOT / "detection" / "configs" / "shapes" / "mask-rcnn_sformer-vit-tiny_shapes.py"
    cfg_path.write_text(
        f"_base_ = [{str(base)!r}]\n"
        "model = dict(data_preprocessor=dict(mean=[127.5, 127.5, 127.5], std=[127.5, 127.5, 127.5]),\n"
        "             backbone=dict(snn=dict(calib=dict(_delete_=True, img_dir='imgs', num_images=2))))\n"
    )
    cfg = tools.load_config(str(cfg_path))
    calib = cfg.model.backbone.snn.calib
    assert calib.preprocessor["mean"] == [127.5, 127.5, 127.5]
    resize = [t for t in calib.pipeline if t["type"] == "Resize"]
    test_resize = [t for t in cfg.test_dataloader.dataset.pipeline if t["type"] == "Resize"]
    assert resize == test_resize and not any(t["type"] == "LoadAnnotations" for t in calib.pipeline)


def _run_script(name: str, argv: list[str], monkeypatch, capsys) -> str:
    """``python detection/NAME ...`` in this process: expect exit code 2 and one line on stderr; return it."""
    import runpy
    import sys

    monkeypatch.setattr(sys, "argv", [f"detection/{name}", *argv])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / "detection" / name), run_name="__main__")
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1, lines
    return lines[0]


def test_detection_scripts_file_errors_are_one_line(tmp_path, monkeypatch, capsys):
    """Output paths under a regular file, a text file as checkpoint, a missing checkpoint: one line, exit code 2."""
    from fixtures_det import RETINA_CFG

    regular = tmp_path / "a-file"
    regular.write_text("x")
    text = tmp_path / "text.pth"
    text.write_text("not a checkpoint\n")
    msg = _run_script("convert.py", [RETINA_CFG, str(text), str(regular / "snn.pth")], monkeypatch, capsys)
    assert "is a file, not a folder" in msg
    msg = _run_script("convert.py", [RETINA_CFG, str(tmp_path / "missing.pth"), str(tmp_path / "snn.pth")], monkeypatch, capsys)
    assert "checkpoint not found" in msg
    msg = _run_script("test.py", [RETINA_CFG, str(text), "--json", str(tmp_path)], monkeypatch, capsys)
    assert "is a directory" in msg
    msg = _run_script("test.py", [RETINA_CFG, str(text)], monkeypatch, capsys)
    assert "cannot read" in msg and "not a torch checkpoint" in msg
    msg = _run_script("train.py", [RETINA_CFG, "--work-dir", str(regular / "work")], monkeypatch, capsys)
    assert "is a file, not a folder" in msg
