"""The ``sj-sfn`` command: ``demo``, ``convert``, ``eval``, ``tune``, ``info``, ``theorem``.

    sj-sfn demo                                   # digits: train a CNN and a ViT, convert at T=1, tune λ
    sj-sfn convert zoo:digits_cnn --checkpoint cnn.pth --data digits --tune --out snn.pth
    sj-sfn eval snn.pth --data digits --json eval.json
    sj-sfn tune snn.pth --data digits --trials 20 --json tune.json --plot tune.png
    sj-sfn info

MODEL is a timm model name, ``torchvision:NAME`` or ``zoo:NAME`` (``digits_cnn``,
``digits_vit``, ``small_resnet``); ``--data`` is ``digits``, ``fashion-mnist`` or an
ImageFolder tree (``DIR/train`` + ``DIR/val`` as for ImageNet, or one folder that is split).
λ is tuned on a validation split cut from the training data, never on the test split.
Every user error ends with exit code 2 and a one-line reason; ``SJ_SFN_TRACEBACK=1`` shows
the traceback instead. Under ``torchrun`` calibration, λ tuning and evaluation are split across the
processes (see :mod:`sj_sfn.distributed`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any

from .demo import DEMO_CACHE
from .utils import UserError

__all__ = ["main", "build_parser", "UserError", "build_model", "load_checkpoint", "load_data", "load_converted", "save_converted"]

FORMAT = "sj-sfn-snn"



# -- models --------------------------------------------------------------------------------


def build_model(spec: str, num_classes: int, in_chans: int = 3, img_size: int | None = None):
    """``timm`` name, ``torchvision:NAME`` or ``zoo:NAME`` → an untrained ``nn.Module``."""
    from . import zoo

    if spec.startswith("zoo:"):
        name = spec[4:]
        fns = {"digits_cnn": zoo.digits_cnn, "small_resnet": zoo.small_resnet, "digits_vit": zoo.digits_vit}
        if name not in fns:
            raise UserError(f"unknown model {spec!r}: zoo models are {', '.join('zoo:' + k for k in fns)}")
        kw: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_chans}
        if name == "digits_vit" and img_size is not None:
            kw.update(img_size=img_size, patch_size=2 if img_size <= 8 else 4)
        return fns[name](**kw)
    if spec.startswith("torchvision:"):
        import torchvision

        name = spec.split(":", 1)[1]
        if name not in torchvision.models.list_models():
            raise UserError(f"unknown model {spec!r}: not in torchvision.models.list_models()")
        if in_chans != 3:
            raise UserError(f"{spec} takes 3-channel images; this data set has {in_chans}")
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    try:
        import timm
    except ImportError as e:
        raise UserError(f"model {spec!r} needs timm: pip install 'sj-sfn[timm]'") from e
    name = spec[5:] if spec.startswith("timm:") else spec
    if not timm.is_model(name):
        raise UserError(f"unknown model {spec!r}: not a timm model name (see timm.list_models()), nor torchvision:NAME or zoo:NAME")
    kw = {"pretrained": False, "num_classes": num_classes, "in_chans": in_chans}
    if img_size is not None:
        try:
            return timm.create_model(name, img_size=img_size, **kw)
        except TypeError:
            pass
    return timm.create_model(name, **kw)


def state_dict_of(obj: Any, path: str) -> dict:
    import torch

    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict):
        if obj.get("format") == FORMAT:
            raise UserError(f"{path} is a converted SNN (sj-sfn convert output), not an ANN checkpoint")
        for key in ("state_dict_ema", "model_ema", "state_dict", "model", "module", "net"):
            if isinstance(obj.get(key), dict) and obj[key] and all(isinstance(v, torch.Tensor) for v in obj[key].values()):
                return obj[key]
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise UserError(f"{path} holds no state_dict (expected a dict of tensors or one under 'state_dict'/'model')")


def torch_load(path: str) -> Any:
    import pickle

    import torch

    if not os.path.isfile(path):
        raise UserError(f"file not found: {path}")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise UserError(f"{path}: reading .safetensors needs 'pip install safetensors'") from e
        try:
            return load_file(path, device="cpu")
        except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
            raise UserError(f"cannot read {path}: {str(e).splitlines()[0]}") from e
    bad = (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError, ModuleNotFoundError)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):  # not a torch file at all
            raise UserError(f"cannot read {path}: not a torch checkpoint ({str(e).splitlines()[0]})") from e
    except bad as e:
        raise UserError(f"cannot read {path}: {str(e).splitlines()[0]}") from e
    try:  # a full training checkpoint (optimizer state, args): a local file the user named
        return torch.load(path, map_location="cpu", weights_only=False)
    except bad as e:
        raise UserError(f"cannot read {path}: {str(e).splitlines()[0]}") from e


def load_checkpoint(model, path: str, spec: str = "model") -> None:
    """Load an ANN checkpoint into ``model``; a mismatch is a :class:`UserError` naming the keys."""
    sd = state_dict_of(torch_load(path), path)
    sd = {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[0]})")
        raise UserError(f"checkpoint {path} does not match {spec}: " + "; ".join(parts))
    model.load_state_dict(sd)


# -- data ----------------------------------------------------------------------------------


@dataclass
class Data:
    """Loaders of one data set: calibration and tuning splits come from training data."""

    name: str
    calib: Any
    val: Any
    test: Any
    num_classes: int
    in_chans: int
    img_size: int
    note: str
    train_root: str | None = None  # ImageFolder of the training images (folders only)
    train_indices: list[int] | None = None  # its images outside the validation and test splits


def _subset(ds, n: int | None, seed: int = 0):
    import torch
    from torch.utils.data import Subset

    if n is None or n >= len(ds):
        return ds
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    return Subset(ds, idx.tolist())


_BUNDLED_DATA = ("digits", "fashion-mnist", "fashion_mnist", "fmnist")  # data sets that ship with packages


def data_config(model, spec: str) -> dict | None:
    """timm's evaluation data config of ``model`` (input size, interpolation, crop, mean/std), or ``None``.

    ``None`` for ``torchvision:``/``zoo:`` models and when timm cannot resolve one; the converted
    file records it so that ``eval`` and ``tune`` preprocess exactly as ``convert`` did.
    """
    if model is None or spec.startswith(("torchvision:", "zoo:")):
        return None
    try:
        from timm.data import resolve_data_config

        return {k: list(v) if isinstance(v, tuple) else v for k, v in resolve_data_config({}, model=model).items()}
    except Exception:  # noqa: BLE001 - no config: the ImageNet eval transform is used
        return None


def _image_transform(config: dict | None, img_size: int | None):
    from torchvision import transforms as T

    if config is not None:
        from timm.data import create_transform

        return create_transform(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
    size = img_size or 224
    return T.Compose([
        T.Resize(int(round(size * 256 / 224))), T.CenterCrop(size), T.ToTensor(),
        T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])


def image_folder(path: str, transform, classes: dict[str, int] | None = None):
    """An ``ImageFolder``; with ``classes`` (``train/``'s class-to-index map) its labels follow that map."""
    from torchvision.datasets import ImageFolder

    try:
        ds = ImageFolder(path, transform=transform)
    except (FileNotFoundError, RuntimeError) as e:
        raise UserError(f"no images found under {path}: an ImageFolder tree needs one sub-folder of images per class") from e
    if len(ds) == 0:
        raise UserError(f"no images found under {path}")
    if classes is not None and ds.class_to_idx != classes:
        unknown = sorted(set(ds.class_to_idx) - set(classes))
        if unknown:
            raise UserError(f"{path} has classes that the training folder lacks: {', '.join(unknown[:5])}")
        # a test folder without some classes: relabel with the training folder's indices
        remap = {i: classes[c] for c, i in ds.class_to_idx.items()}
        ds.samples = [(f, remap[t]) for f, t in ds.samples]
        ds.targets = [t for _, t in ds.samples]
        ds.imgs = ds.samples
        ds.class_to_idx = {c: classes[c] for c in ds.classes}
    return ds


def data_info(data: str) -> tuple[int, int, int | None]:
    """``(num_classes, in_chans, img_size)`` of a ``--data`` value without loading images."""
    if data == "digits":
        return 10, 1, 8
    if data in ("fashion-mnist", "fashion_mnist", "fmnist"):
        return 10, 1, 28
    if not os.path.exists(data):
        raise UserError(f"data not found: {data!r} is neither 'digits', 'fashion-mnist' nor an existing folder")
    if not os.path.isdir(data):
        raise UserError(f"--data {data} is a file; give an ImageFolder directory")
    root = os.path.join(data, "train") if os.path.isdir(os.path.join(data, "train")) else data
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    if not classes:
        raise UserError(f"no class folders under {root}: an ImageFolder tree needs one sub-folder of images per class")
    return len(classes), 3, None


def load_data(
    data: str, batch_size: int = 64, calib_samples: int | None = None, val_samples: int | None = None,
    test_samples: int | None = None, model=None, spec: str = "", img_size: int | None = None, workers: int = 0,
    seed: int = 0, distributed: bool = False, config: dict | None = None,
) -> Data:
    """Calibration / validation (λ tuning) / test loaders for ``--data``.

    ``digits``: the 70/10/20 split of :func:`sj_sfn.data.make_splits`; ``fashion-mnist``: the
    validation split is cut from the official training set, the test split is the official test
    set; a folder with ``train/`` and ``val/``: calibration and validation from ``train/``
    (disjoint), ``val/`` is the test split (ImageNet's convention); a single folder is split
    80/10/10. Under ``torchrun`` (``distributed=True``) each process gets its share of batches.
    Images are preprocessed with ``config`` (a :func:`data_config`), else ``model``'s timm data
    config, else the ImageNet evaluation transform at ``img_size``.
    """
    import torch
    from torch.utils.data import DataLoader, Subset

    from . import data as sjdata

    train_root = train_indices = None
    if isinstance(batch_size, int) and batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    num_classes, in_chans, size = data_info(data)
    if data in _BUNDLED_DATA:
        try:
            sp = sjdata.make_splits("digits" if data == "digits" else "fashion-mnist", seed=seed)
        except FileNotFoundError as e:
            raise UserError(str(e)) from e
        calib, val, test = _subset(sp.train, calib_samples, seed), _subset(sp.val, val_samples, seed), _subset(sp.test, test_samples, seed)
        note = f"{data}: calibration = training split, validation (λ) = held-out part of training data, test = test split"
    else:
        transform = _image_transform(config if config is not None else data_config(model, spec), img_size)
        train_dir, val_dir = os.path.join(data, "train"), os.path.join(data, "val")
        if os.path.isdir(train_dir) and os.path.isdir(val_dir):
            whole = image_folder(train_dir, transform)
            pool = list(range(len(whole)))
            test = _subset(image_folder(val_dir, transform, whole.class_to_idx), test_samples, seed)
            note = f"{data}: calibration and validation (λ) from train/ (disjoint), test = val/"
            train_root = train_dir
        else:
            whole = image_folder(data, transform)
            perm = torch.randperm(len(whole), generator=torch.Generator().manual_seed(seed)).tolist()
            n_test = max(1, len(whole) // 10)
            test = _subset(Subset(whole, perm[:n_test]), test_samples, seed)
            pool = perm[n_test:]
            note = f"{data}: one folder split 90/10 into training (calibration, validation) and test"
            train_root = data
        n_val = min(val_samples or 1000, max(1, len(pool) // 5))
        perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed + 1)).tolist()
        val_idx = [pool[i] for i in perm[:n_val]]
        rest = [pool[i] for i in perm[n_val:]] or val_idx[:1]
        val = Subset(whole, val_idx)
        calib = Subset(whole, rest[: calib_samples or 1024])
        train_indices = rest
        size = img_size or size
    if len(calib) == 0 or len(val) == 0 or len(test) == 0:
        raise UserError(f"--data {data}: a split is empty (calibration {len(calib)}, validation {len(val)}, test {len(test)})")

    def mk(ds, split: str):
        loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers)
        if distributed:
            from .distributed import shard_loader, world_size

            if len(loader) < world_size():
                raise UserError(f"--data {data}: the {split} split has {len(loader)} batches of {batch_size} for "
                                f"{world_size()} processes (each needs one); lower --batch-size or use more samples")
            loader = shard_loader(loader)
        return loader

    # every split is sharded by batches: calibration statistics, λ-trial metrics (rank 0 runs Ax and
    # broadcasts each λ) and test metrics are all-reduced, so the numbers equal one process's
    return Data(data, mk(calib, "calibration"), mk(val, "validation"), mk(test, "test"), num_classes, in_chans, size or 224, note, train_root, train_indices)


def _sample_shape(loader) -> tuple[int, ...]:
    from .utils import batch_inputs

    for batch in loader:
        return tuple(batch_inputs(batch).shape[1:])
    raise UserError("the data loader is empty")


# -- converted files -----------------------------------------------------------------------


def save_converted(path: str, snn, meta: dict) -> str:
    """Write a converted SNN: its state_dict plus what rebuilds the module (model, options)."""
    import torch

    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    torch.save({"format": FORMAT, **meta, "state_dict": snn.state_dict()}, path)
    return path


def load_converted(path: str, device: str | None = None):
    """Rebuild a converted SNN from :func:`save_converted` output: ``(snn, meta)``.

    The module is rebuilt by converting the (untrained) architecture on one random batch of the
    recorded input shape, then every weight, threshold and λ comes from the saved state_dict.
    """
    import torch

    from .conversion import convert

    obj = torch_load(path)
    if not (isinstance(obj, dict) and obj.get("format") == FORMAT):
        raise UserError(f"{path} is not a converted SNN written by 'sj-sfn convert'")
    mk = obj["model_kwargs"]
    ann = build_model(obj["model"], mk["num_classes"], mk["in_chans"], mk.get("img_size"))
    x = torch.rand(2, *obj["input_shape"], generator=torch.Generator().manual_seed(0))
    ck = obj["convert_kwargs"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        snn = convert(ann, [(x,)], progress=False, **ck)
    try:
        snn.load_state_dict(obj["state_dict"])
    except RuntimeError as e:
        raise UserError(f"{path} does not match {obj['model']} as converted by this version: {str(e).splitlines()[0]}") from e
    if device is not None:
        snn.to(device)
    return snn.eval(), obj


# -- shared steps --------------------------------------------------------------------------


def _log(args, *msg: Any) -> None:
    from .distributed import is_main

    if not getattr(args, "quiet", False) and is_main():
        print(*msg, file=sys.stderr, flush=True)


def _write_json(path: str, obj: dict) -> None:
    from .distributed import is_main
    from .utils import write_json

    if not path or not is_main():
        return
    write_json(path, obj)


def _check_lam(v: str) -> float:
    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"λ must be a number, got {v!r}") from None
    if not (math.isfinite(x) and x > 0):
        raise argparse.ArgumentTypeError(f"λ must be finite and > 0, got {v}")
    return x


def _number(kind: str, ok, what: str):
    """An argparse type: a ``kind`` (int or float) for which ``ok(x)`` holds, else ``expected {what}``."""

    def parse(v: str):
        try:
            x = kind(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v!r}") from None
        if not ok(x):
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return x

    return parse


_positive_int = _number(int, lambda x: x >= 1, "an integer >= 1")
_non_negative_int = _number(int, lambda x: x >= 0, "an integer >= 0")
_non_negative_float = _number(float, lambda x: math.isfinite(x) and x >= 0, "a finite number >= 0")
_positive_float = _number(float, lambda x: math.isfinite(x) and x > 0, "a finite number > 0")
_quantile = _number(float, lambda x: 0 < x <= 1, "a quantile in (0, 1]")


def _groups(v: str) -> str | dict[str, list[str]]:
    """``--groups``: ``kind``, or ``NAME=PAT,PAT;NAME=PAT``."""
    if v == "kind":
        return v
    groups = {}
    for part in v.split(";"):
        name, eq, patterns = part.partition("=")
        pats = [q.strip() for q in patterns.split(",") if q.strip()]
        if not eq or not name.strip() or not pats:
            raise argparse.ArgumentTypeError(f"expected 'kind' or 'NAME=PATTERN,PATTERN;NAME=PATTERN', got {part!r} in {v!r}")
        groups[name.strip()] = pats
    return groups


def _tune(args, snn, val_loader, ann=None, device=None):
    from .tune import tune_lambda

    low, high = args.bounds
    if not low < high:
        raise UserError(f"--bounds LOW HIGH needs LOW < HIGH, got {low} {high}")
    try:
        return tune_lambda(
            snn, val_loader, objective=args.objective, beta=args.beta, trials=args.trials, bounds=(low, high),
            groups=args.groups, seed=args.seed, timeout=args.timeout, ann=ann, progress=not args.quiet, device=device,
        )
    except (ValueError, TypeError) as e:  # bad options (e.g. a group pattern that matches no site)
        raise UserError(f"cannot tune λ: {str(e).splitlines()[0]}") from e


def _evaluate(snn, ann, loader, device=None) -> dict:
    """ANN and SNN top-1 accuracy and the energy ratio over ``loader`` (all-reduced under torchrun)."""
    from .energy import measure_energy
    from .evaluation import all_reduce_report, distributed_accuracy

    t0 = time.perf_counter()
    snn_acc, n = distributed_accuracy(snn, loader, device)
    t_snn = time.perf_counter() - t0
    out: dict[str, Any] = {"samples": n, "snn_accuracy": snn_acc, "snn_seconds": t_snn}
    if ann is not None:
        out["ann_accuracy"], _ = distributed_accuracy(ann, loader, device)
    # the per-sample averages over every process (firing rates too); the ratios are EnergyReport's own formulas
    rep = all_reduce_report(measure_energy(snn, loader, ann=ann, device=device), device)
    out.update(
        energy_ratio=rep.ratio, event_ratio=rep.event_ratio, sops_per_sample=rep.sops, events_per_sample=rep.events,
        snn_macs_per_sample=rep.macs, ann_macs_per_sample=rep.ann_macs, firing_rates=rep.firing_rates,
    )
    return out


def _device(args, dist_on: bool) -> str | None:
    """``--device``, else the local GPU under torchrun (``LOCAL_RANK``), else ``None`` (CPU)."""
    if args.device:
        return args.device
    import torch

    if dist_on and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return None


# -- subcommands ---------------------------------------------------------------------------


def _cmd_convert(args) -> int:
    from .conversion import convert
    from .distributed import init_from_env, is_main
    from .tune import current_lams

    dist_on = init_from_env()
    num_classes, in_chans, img_size = data_info(args.data)
    num_classes = args.num_classes or num_classes
    img_size = args.img_size or img_size
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        raise UserError(f"checkpoint not found: {args.checkpoint}")
    ann = build_model(args.model, num_classes, in_chans, img_size)
    if args.checkpoint:
        load_checkpoint(ann, args.checkpoint, args.model)
    elif not args.allow_random_weights:
        raise UserError("--checkpoint is required (the ANN's trained weights); --allow-random-weights skips it for smoke tests")
    ann.eval()
    device = _device(args, dist_on)
    if device:
        ann.to(device)
    config = data_config(ann, args.model) if args.data not in _BUNDLED_DATA else None
    d = load_data(args.data, args.batch_size, args.calib_samples, args.val_samples, args.test_samples, ann, args.model,
                  args.img_size, args.workers, args.seed, distributed=dist_on, config=config)
    _log(args, f"data: {d.note}")
    _check_model_accepts(ann, d.calib, args, device)
    # λ and v_init left unset take the converter's per-family defaults (CNN / SFormer)
    ck = {"lam": args.lam, "max_spikes": args.max_spikes, "p": args.p, "per_channel": args.per_channel, "v_init": args.v_init}
    ck = {k: v for k, v in ck.items() if v is not None}
    t0 = time.perf_counter()
    try:
        snn = convert(ann, d.calib, device=device, progress=not args.quiet, **ck)
    except (ValueError, TypeError, NotImplementedError) as e:
        raise UserError(f"cannot convert {args.model}: {str(e).splitlines()[0]}") from e
    t_conv = time.perf_counter() - t0
    lams = current_lams(snn)
    if "lam" not in ck and lams and len(set(lams.values())) == 1:
        ck["lam"] = next(iter(lams.values()))  # the converter's default
    tune_info = None
    if args.tune:
        res = _tune(args, snn, d.val, ann if args.energy_vs_ann else None, device)
        res.apply(snn)
        tune_info = res.to_dict()
        ck["lam"] = res.best_lam
        if args.plot and is_main():
            res.plot(args.plot)
        _log(args, res.table())
    meta = {
        "model": args.model, "model_kwargs": {"num_classes": num_classes, "in_chans": in_chans, "img_size": img_size},
        "checkpoint": os.path.abspath(args.checkpoint) if args.checkpoint else None, "data": args.data,
        "convert_kwargs": ck, "input_shape": list(_sample_shape(d.calib)), "data_config": config,
        "lams": current_lams(snn), "tune": tune_info,
        "version": _version(),
    }
    summary = {"out": os.path.abspath(args.out), "model": args.model, "lam": ck.get("lam"), "max_spikes": args.max_spikes,
               "p": args.p, "convert_seconds": t_conv, "sites": len(meta["lams"]), "tuned": args.tune}
    if is_main():
        save_converted(args.out, snn.cpu() if device else snn, meta)
    if args.eval:
        summary.update(_evaluate(snn.to(device) if device else snn, ann, d.test, device))
    _write_json(args.json, summary)
    if is_main():
        print(json.dumps({k: v for k, v in summary.items() if k != "firing_rates"}, indent=None if args.quiet else 2))
    return 0


def _ann_for(meta: dict, checkpoint: str | None, device: str | None):
    ck = checkpoint or meta.get("checkpoint")
    if not ck:
        return None
    if not os.path.isfile(ck):
        raise UserError(f"ANN checkpoint not found: {ck} (give --checkpoint, or --no-ann)")
    mk = meta["model_kwargs"]
    ann = build_model(meta["model"], mk["num_classes"], mk["in_chans"], mk.get("img_size"))
    load_checkpoint(ann, ck, meta["model"])
    return ann.to(device).eval() if device else ann.eval()


def _check_model_accepts(ann, loader, args, device) -> None:
    """One calibration image through the ANN, so that a model/data mismatch is one clear line, not a traceback."""
    import torch

    from .utils import batch_inputs

    x = batch_inputs(next(iter(loader)))[:1]
    try:
        with torch.no_grad():
            ann(x.to(device) if device else x)
    except Exception as e:  # noqa: BLE001 - any failure here is a mismatch between the model and the data
        raise UserError(f"{args.model} does not accept the images of --data {args.data} (shape {list(x.shape[1:])}): "
                        f"{str(e).splitlines()[0]}; check --img-size and the model") from e


def _recorded_data_config(meta: dict, data: str, ann) -> dict | None:
    """The data config ``convert`` used; files written before it was recorded rebuild it from the model."""
    if "data_config" in meta:
        return meta["data_config"]
    if data in _BUNDLED_DATA:
        return None
    if ann is None:
        mk = meta["model_kwargs"]
        ann = build_model(meta["model"], mk["num_classes"], mk["in_chans"], mk.get("img_size"))
    return data_config(ann, meta["model"])


def _check_input_shape(loader, meta: dict, data: str, path: str) -> None:
    shape = _sample_shape(loader)
    if list(shape) != list(meta["input_shape"]):
        raise UserError(f"--data {data} gives inputs of shape {list(shape)} but {path} was converted for {meta['input_shape']}")


def _cmd_eval(args) -> int:
    from .distributed import init_from_env, is_main

    dist_on = init_from_env()
    device = _device(args, dist_on)
    snn, meta = load_converted(args.snn, device)
    ann = None if args.no_ann else _ann_for(meta, args.checkpoint, device)
    data = args.data or meta.get("data")
    mk = meta["model_kwargs"]
    d = load_data(data, args.batch_size, None, None, args.test_samples, ann, meta["model"], mk.get("img_size"), args.workers,
                  args.seed, distributed=dist_on, config=_recorded_data_config(meta, data, ann))
    _check_input_shape(d.test, meta, data, args.snn)
    _log(args, f"data: {d.note}")
    out = {"snn": os.path.abspath(args.snn), "model": meta["model"], "data": data, "split": "test",
           "lam": meta["convert_kwargs"]["lam"], "max_spikes": meta["convert_kwargs"]["max_spikes"]}
    out.update(_evaluate(snn, ann, d.test, device))
    _write_json(args.json, out)
    if is_main():
        keys = ("ann_accuracy", "snn_accuracy", "energy_ratio", "event_ratio", "samples", "lam")
        if args.quiet:
            print(json.dumps({k: out[k] for k in keys if k in out}))
        else:
            print(json.dumps({k: v for k, v in out.items() if k != "firing_rates"}, indent=2))
    return 0


def _cmd_tune(args) -> int:
    from .distributed import init_from_env, is_main
    from .tune import current_lams

    dist_on = init_from_env()
    device = _device(args, dist_on)
    snn, meta = load_converted(args.snn, device)
    data = args.data or meta.get("data")
    ann = _ann_for(meta, args.checkpoint, device) if args.energy_vs_ann else None
    mk = meta["model_kwargs"]
    d = load_data(data, args.batch_size, None, args.val_samples, None, ann, meta["model"], mk.get("img_size"), args.workers,
                  args.seed, distributed=dist_on, config=_recorded_data_config(meta, data, ann))
    _check_input_shape(d.val, meta, data, args.snn)
    _log(args, f"data: {d.note}")
    res = _tune(args, snn, d.val, ann, device)
    _log(args, res.table())
    if args.json and is_main():
        res.to_json(args.json)
    if args.plot and is_main():
        res.plot(args.plot)
    if args.out and is_main():
        res.apply(snn)
        meta = {k: v for k, v in meta.items() if k not in ("format", "state_dict")}
        meta["convert_kwargs"] = {**meta["convert_kwargs"], "lam": res.best_lam}
        meta.update(lams=current_lams(snn), tune=res.to_dict())
        save_converted(args.out, snn.cpu() if device else snn, meta)
    if not is_main():
        return 0
    b = res.best
    print(json.dumps({"best_lam": res.best_lam, "best_group_lams": res.best_group_lams, "val_accuracy": b.metric,
                      "energy_ratio": b.energy_ratio, "trials": len(res.trials), "failed": res.failed,
                      "seconds": res.seconds}))
    return 0


def _version() -> str:
    from .version import __version__

    return __version__


def _cmd_info(args) -> int:
    import importlib.metadata as md
    import platform

    import torch

    info: dict[str, Any] = {"sj-sfn": _version(), "python": platform.python_version(), "platform": platform.platform()}
    pkgs = {}
    for p in ("torch", "torchvision", "spikingjelly", "timm", "ax-platform", "matplotlib", "scikit-learn", "scikit-image",
              "cupy-cuda13x", "cupy-cuda12x", "mmengine", "mmcv", "mmdet"):
        try:
            pkgs[p] = md.version(p)
        except md.PackageNotFoundError:
            pkgs[p] = None
    info["packages"] = pkgs
    extras = {"timm": pkgs["timm"] is not None, "tune": pkgs["ax-platform"] is not None and pkgs["matplotlib"] is not None,
              "det": all(pkgs[p] for p in ("mmengine", "mmcv", "mmdet")),
              "cuda": bool(pkgs["cupy-cuda13x"] or pkgs["cupy-cuda12x"]), "data": pkgs["scikit-learn"] is not None}
    info["extras"] = extras
    info["cuda"] = {"torch_cuda": torch.version.cuda, "available": torch.cuda.is_available(),
                    "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    kernels = {}
    try:
        from .ops import implementation

        devs = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        if not torch.cuda.is_available():
            devs.append("cuda")
        for dev in devs:
            impl = implementation(dev)
            kernels[dev] = {"name": impl.name, "reason": impl.reason, "unavailable": impl.unavailable, "error": impl.error}
    except Exception as e:  # noqa: BLE001 - info must not fail
        kernels["error"] = str(e).splitlines()[0]
    info["kernels"] = kernels
    from .data import FASHION_MNIST_ROOT

    info["data"] = {"digits": extras["data"], "fashion-mnist": os.path.isdir(FASHION_MNIST_ROOT)}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"sj-sfn {info['sj-sfn']}  (Python {info['python']}, {info['platform']})")
    print("packages:")
    for k, v in pkgs.items():
        print(f"  {k:14s} {v or '-'}")
    print("extras: " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in extras.items()))
    c = info["cuda"]
    print(f"CUDA: torch built with {c['torch_cuda']}, available={c['available']} {c['devices']}")
    print("kernels:")
    for dev, k in kernels.items():
        if dev == "error":
            print(f"  (could not query: {k})")
            continue
        why = "; ".join(f"{n}: {r}" for n, r in (k["unavailable"] or {}).items())
        print(f"  {dev:7s} -> {k['name']} ({k['reason']}){'  [' + why + ']' if why else ''}")
    print("data: " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in info["data"].items())
          + ("" if info["data"]["fashion-mnist"] else "  (Fashion-MNIST: apt-get install dataset-fashion-mnist)"))
    return 0


def _theorem(args: argparse.Namespace) -> int:
    """Check Theorem 1 on random data: T-step IF average == one MTN step."""
    import torch
    from spikingjelly.activation_based import functional, neuron

    from .neuron import MTNode

    g = torch.Generator().manual_seed(args.seed)
    worst, total = 0.0, 0
    for T in (1, 2, 4, 8, 16, 32):
        theta = 0.5 + torch.rand((), generator=g, dtype=torch.float64).item()
        x_seq = torch.rand(T, args.n, generator=g, dtype=torch.float64) * theta
        v0 = torch.rand(args.n, generator=g, dtype=torch.float64) * theta
        ifn = neuron.IFNode(v_threshold=theta, v_reset=None, step_mode="m")
        ifn.v = v0.clone()
        if_avg = ifn(x_seq).mean(0) * theta
        mtn = MTNode(theta / T, max_spikes=T, v_init=0.0)
        mtn.v = v0 / T
        err = (mtn(x_seq.mean(0)) - if_avg).abs().max().item()
        functional.reset_net(mtn)
        worst = max(worst, err)
        total += args.n
        print(f"T={T:3d}  θ={theta:.3f}  max |IF avg − MTN| = {err:.2e}")
    print(f"Theorem 1 on {total} random neurons: worst difference {worst:.2e}")
    return 0 if worst < 1e-6 else 1


def _cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args)


# -- parser --------------------------------------------------------------------------------


def _add_tune_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("λ tuning (Ax Bayesian optimisation on the validation split)")
    g.add_argument("--trials", type=_positive_int, default=20, help="number of trials (default 20)")
    g.add_argument("--objective", choices=("accuracy", "tradeoff", "pareto"), default="accuracy",
                   help="maximise accuracy, accuracy − β·energy ratio, or both (Pareto front)")
    g.add_argument("--beta", type=_non_negative_float, default=10.0, help="β of the tradeoff objective (accuracy points per unit of energy ratio)")
    g.add_argument("--bounds", type=_check_lam, nargs=2, default=(0.05, 1.0), metavar=("LOW", "HIGH"), help="λ range (log scale)")
    g.add_argument("--groups", type=_groups, default=None,
                   help="separate λ per group: 'kind' (SFormer site kinds) or 'NAME=PAT,PAT;NAME=PAT' (fnmatch patterns or kinds)")
    g.add_argument("--timeout", type=_positive_float, default=None, help="start no new trial after this many seconds")
    g.add_argument("--energy-vs-ann", action="store_true", help="measure the energy denominator on the ANN itself")
    g.add_argument("--val-samples", type=_positive_int, default=None, help="cap the validation split (images)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=_positive_int, default=64, help="batch size (default 64)")
    p.add_argument("--device", default=None, help="torch device (default: CPU, or the local GPU under torchrun)")
    p.add_argument("--workers", type=_non_negative_int, default=0, help="data loader workers")
    p.add_argument("--seed", type=int, default=0, help="seed of the data splits and of Ax")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or logs, one JSON line")


def _add_converted_input(p: argparse.ArgumentParser, checkpoint_help: str) -> None:
    """The converted file, its data and its ANN checkpoint: what ``eval`` and ``tune`` read."""
    p.add_argument("snn", metavar="CONVERTED", help="file written by 'sj-sfn convert'")
    p.add_argument("--data", default=None, help="data set (default: the one it was converted on)")
    p.add_argument("--checkpoint", default=None, help=checkpoint_help)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sj-sfn", description="One-timestep ANN-to-SNN conversion for SpikingJelly (MTN, SFN, SFormer).",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n  sj-sfn demo\n  sj-sfn convert zoo:digits_cnn --checkpoint cnn.pth --data digits --tune --out snn.pth\n"
                                       "  sj-sfn eval snn.pth --data digits --json eval.json\n  sj-sfn info")
    p.add_argument("--version", action="version", version=f"sj-sfn {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="train a small CNN and ViT on digits, convert at T=1, tune λ, print the table",
                       description="Train (or load from the cache) a small CNN and ViT, convert both to one-timestep SNNs, tune λ "
                                   "with a few Ax trials on the validation split and compare with SpikingJelly's IF rate coding.")
    d.add_argument("--dataset", choices=("digits", "fashion-mnist"), default="digits", help="bundled data set (default digits)")
    d.add_argument("--models", default="cnn,vit", help="comma-separated subset of cnn,vit")
    d.add_argument("--trials", type=_positive_int, default=8, help="Ax trials per model (default 8)")
    d.add_argument("--epochs", type=float, default=1.0, help="scale the training epochs (e.g. 0.2 for a smoke test)")
    d.add_argument("--cache", default=None, help=f"trained-model cache (default {DEMO_CACHE})")
    d.add_argument("--out", default=os.path.join("runs", "demo"), help="where the JSON and λ plots go (default runs/demo)")
    d.add_argument("--retrain", action="store_true", help="ignore the cache")
    d.add_argument("--max-if-steps", type=_positive_int, default=256, help="largest T tried for IF rate coding")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quiet", "-q", action="store_true", help="only the table")
    d.set_defaults(func=_cmd_demo)

    c = sub.add_parser("convert", help="convert a trained ANN (timm, torchvision:NAME, zoo:NAME) into a T=1 SNN",
                       description="Calibrate SFN thresholds on the training data, set λ (or tune it on a validation split) "
                                   "and save the SNN.")
    c.add_argument("model", metavar="MODEL", help="timm model name, torchvision:NAME or zoo:NAME")
    c.add_argument("--checkpoint", default=None, help="the ANN's weights (state_dict or a training checkpoint)")
    c.add_argument("--allow-random-weights", action="store_true", help=argparse.SUPPRESS)
    c.add_argument("--data", required=True, help="digits, fashion-mnist or an ImageFolder directory")
    lam = c.add_mutually_exclusive_group()
    lam.add_argument("--lam", type=_check_lam, default=None, help="λ (default: the converter's, 0.05 for CNNs, 0.25 for ViTs)")
    lam.add_argument("--tune", action="store_true", help="tune λ with Ax on the validation split")
    c.add_argument("--out", required=True, help="converted model file (.pth)")
    c.add_argument("--max-spikes", "-N", type=_positive_int, default=32, help="N, spikes per sign and step (default 32)")
    c.add_argument("--p", type=_quantile, default=0.99, help="calibration quantile (default 0.99)")
    c.add_argument("--per-channel", action="store_true", help="per-channel thresholds")
    c.add_argument("--v-init", type=float, default=None, help="threshold offset in [0, 1) (default: the converter's, 0.5 = round)")
    c.add_argument("--calib-samples", type=_positive_int, default=None, help="calibration images (default: all, 1024 for folders)")
    c.add_argument("--test-samples", type=_positive_int, default=None, help="cap the test split for --eval")
    c.add_argument("--num-classes", type=_positive_int, default=None, help="override the number of classes")
    c.add_argument("--img-size", type=_positive_int, default=None, help="input size for models that take one")
    c.add_argument("--eval", action="store_true", help="also report ANN/SNN test accuracy and energy")
    c.add_argument("--plot", default=None, help="with --tune: λ plot (PNG)")
    _add_common(c)
    _add_tune_options(c)
    c.set_defaults(func=_cmd_convert)

    e = sub.add_parser("eval", help="ANN vs SNN test accuracy and energy ratio of a converted model",
                       description="Evaluate a converted model (and its ANN) on the test split; JSON output.")
    _add_converted_input(e, "the ANN's weights (default: the path recorded at conversion)")
    e.add_argument("--no-ann", action="store_true", help="evaluate the SNN only")
    e.add_argument("--test-samples", type=_positive_int, default=None, help="cap the test split")
    _add_common(e)
    e.set_defaults(func=_cmd_eval)

    t = sub.add_parser("tune", help="tune λ of a converted model with Ax on the validation split",
                       description="Bayesian optimisation of λ (accuracy, accuracy − β·energy, or a Pareto front).")
    _add_converted_input(t, "the ANN's weights (for --energy-vs-ann)")
    t.add_argument("--out", default=None, help="write the model with the chosen λ here")
    t.add_argument("--plot", default=None, help="λ plot (PNG)")
    _add_common(t)
    _add_tune_options(t)
    t.set_defaults(func=_cmd_tune)

    i = sub.add_parser("info", help="versions, kernels (CuPy/CUDA) and extras installed")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=_cmd_info)

    th = sub.add_parser("theorem", help="check Theorem 1 (IF over T steps == one MTN step) on random data")
    th.add_argument("--n", type=_positive_int, default=20000, help="random neurons per T")
    th.add_argument("--seed", type=int, default=0)
    th.set_defaults(func=_theorem)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        os.environ.setdefault("TQDM_DISABLE", "1")
    if os.environ.get("SJ_SFN_TRACEBACK"):
        return args.func(args)
    try:
        return args.func(args)
    except UserError as e:
        print(f"sj-sfn {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ImportError) as e:
        print(f"sj-sfn {args.command}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sj-sfn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
