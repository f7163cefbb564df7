#!/usr/bin/env python
"""Train or fine-tune a classifier (timm name, ``torchvision:NAME`` or ``zoo:NAME``) for conversion.

    # the bundled digits (seconds on a CPU)
    python classification/train.py zoo:digits_cnn --data digits --epochs 15 --out runs/cls/digits_cnn
    # fine-tune a local pretrained timm checkpoint on an ImageFolder tree (DIR/train, DIR/val)
    torchrun --nproc_per_node 8 classification/train.py vit_base_patch16_224 --data /data/imagenet \\
        --init /weights/vit_base_patch16_224.pth --epochs 10 --lr 1e-4 --out runs/cls/vit_b
    # resume
    python classification/train.py ... --resume runs/cls/vit_b/last.pth

Writes ``last.pth`` every epoch and ``best.pth`` (best accuracy on the validation split, cut
from the training data; the test split is never used for model selection). Each checkpoint is
``{"model": state_dict, "optimizer", "scheduler", "epoch", "best_acc", "args"}``, which
``sj-sfn convert --checkpoint`` reads directly. Under ``torchrun`` training is data-parallel
(DDP with a ``DistributedSampler``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import torch
import torch.nn as nn
from torch.utils.data import DataLoader


def _train_set(args, model):
    """The training images (augmented for folders; never the validation or test split) and the data."""
    from torch.utils.data import Subset

    from sj_sfn.data import image_folder, load_data

    d = load_data(args.data, args.batch_size, None, args.val_samples, None, model, args.model, args.img_size, args.workers, args.seed)
    if d.train_root is None:  # digits / fashion-mnist: the training split of make_splits
        from sj_sfn.data import make_splits

        return make_splits(args.data, seed=args.seed).train, d
    transform = None
    if not args.model.startswith(("torchvision:", "zoo:")):
        try:
            from timm.data import create_transform, resolve_data_config

            transform = create_transform(**resolve_data_config({}, model=model), is_training=True)
        except Exception:  # noqa: BLE001 - fall back to a plain augmentation
            transform = None
    if transform is None:
        from torchvision import transforms as T

        size = args.img_size or 224
        transform = T.Compose([T.RandomResizedCrop(size, scale=(0.5, 1.0)), T.RandomHorizontalFlip(), T.ToTensor(),
                               T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    return Subset(image_folder(d.train_root, transform), d.train_indices), d


def main(argv: list[str] | None = None) -> int:
    from sj_sfn.cli import run_guarded

    p = argparse.ArgumentParser(prog="classification/train.py", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="timm model name, torchvision:NAME or zoo:NAME")
    p.add_argument("--data", required=True, help="digits, fashion-mnist or an ImageFolder directory")
    p.add_argument("--out", required=True, help="output folder for last.pth / best.pth / log.json")
    p.add_argument("--init", default=None, help="initial weights (a local pretrained checkpoint); a mismatched classifier head is re-initialised")
    p.add_argument("--resume", default=None, help="continue from a last.pth")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="--init: unpickle a checkpoint that holds Python objects besides tensors (runs code: only files you trust)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--val-samples", type=int, default=None, help="validation images held out of training (default 1000 for folders)")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", "-q", action="store_true")
    args = p.parse_args(argv)
    return run_guarded("train.py", lambda: _train(args))


def _train(args) -> int:
    from tqdm.auto import tqdm

    from sj_sfn.data import data_info
    from sj_sfn.distributed import init_from_env, is_main, shard_loader
    from sj_sfn.evaluation import distributed_accuracy
    from sj_sfn.io import check_output_dir, save
    from sj_sfn.utils import write_json
    from sj_sfn.zoo import build_model

    check_output_dir(args.out, "--out")  # before any work: a bad folder must not cost an epoch
    dist_on = init_from_env()
    device = torch.device(args.device or (f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    num_classes, in_chans, img_size = data_info(args.data)
    num_classes = args.num_classes or num_classes
    img_size = args.img_size or img_size
    model = build_model(args.model, num_classes, in_chans, img_size)
    if args.init:
        _load_init(model, args.init, args.trust_checkpoint)
    train_set, d = _train_set(args, model)
    sampler = None
    if dist_on:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(train_set, shuffle=True, seed=args.seed)
    order = torch.Generator()
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=sampler is None, sampler=sampler,
                        num_workers=args.workers, drop_last=len(train_set) > args.batch_size, generator=order)
    val_loader = shard_loader(d.val) if dist_on else d.val
    model.to(device)
    net: nn.Module = model
    if dist_on:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps = max(1, args.epochs * len(loader))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.1)
    start, best, log = 0, -1.0, []
    if args.resume:
        start, best, log = _resume(args.resume, model, opt, sched, args.epochs, len(loader))
    os.makedirs(args.out, exist_ok=True)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(start, args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        order.manual_seed(args.seed + epoch)  # the epoch's shuffle depends on (seed, epoch) only: resuming repeats it
        net.train()
        t0 = time.perf_counter()
        total_loss = n = 0.0
        for x, y in tqdm(loader, desc=f"epoch {epoch}", disable=args.quiet or not is_main(), leave=False):
            x, y = x.to(device), y.to(device)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(x), y)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * y.numel()
            n += y.numel()
        acc, _ = distributed_accuracy(model.eval(), val_loader, device)
        entry = {"epoch": epoch, "loss": total_loss / max(n, 1), "val_accuracy": acc, "seconds": time.perf_counter() - t0}
        log.append(entry)
        if is_main():
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": epoch,
                     "best_acc": max(best, acc), "log": log, "args": vars(args)}
            save(state, os.path.join(args.out, "last.pth"))  # atomic: an interrupted write keeps the previous file
            if acc > best:
                save(state, os.path.join(args.out, "best.pth"))
            write_json(os.path.join(args.out, "log.json"), log)
            if not args.quiet:
                print(json.dumps(entry), flush=True)
        best = max(best, acc)
    if is_main():
        print(json.dumps({"best_val_accuracy": best, "out": os.path.abspath(args.out), "epochs": args.epochs}))
    return 0


def _resume(path: str, model: nn.Module, opt: torch.optim.Optimizer, sched, epochs: int, steps_per_epoch: int):
    """Restore model, optimiser and schedule from ``last.pth``; returns ``(first epoch, best accuracy, log)``.

    With a different ``--epochs`` the one-cycle schedule is rebuilt for the new length and
    fast-forwarded to the steps already taken, so training continues on the longer (or shorter) curve.
    """
    from sj_sfn.io import load
    from sj_sfn.utils import UserError

    if not os.path.isfile(path):
        raise UserError(f"--resume: {path} not found")
    ck = load(path)  # last.pth holds tensors, numbers, strings and dicts only: the safe loader reads it
    if not isinstance(ck, dict) or not {"model", "optimizer", "scheduler", "epoch"} <= set(ck):
        raise UserError(f"--resume {path} is not a last.pth written by this script (needs model, optimizer, scheduler, epoch)")
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise UserError(f"--resume {path} does not match {type(model).__name__} "
                        f"(trained as {ck.get('args', {}).get('model', '?')}): {str(e).splitlines()[0]}") from None
    opt.load_state_dict(ck["optimizer"])
    start = ck["epoch"] + 1
    if ck.get("args", {}).get("epochs", epochs) == epochs:
        sched.load_state_dict(ck["scheduler"])
    else:
        done = start * steps_per_epoch
        if done >= sched.total_steps:
            raise UserError(f"--resume {path} has already trained {start} epochs; --epochs {epochs} leaves nothing to do")
        with warnings.catch_warnings():  # stepping the schedule without optimiser steps is the point here
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(done):
                sched.step()
    return start, ck.get("best_acc", -1.0), ck.get("log", [])


def _classifier_names(model: nn.Module) -> list[str]:
    """Module names of the classifier head: timm's ``get_classifier()``, else the last ``nn.Linear``."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Module) or isinstance(head, nn.Identity):
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        head = linears[-1] if linears else None
    return [name for name, m in model.named_modules() if head is not None and m is head]


def _load_init(model: nn.Module, path: str, trust: bool = False) -> None:
    """Load pretrained weights, re-initialising the classifier head when its shape differs (another class count)."""
    from sj_sfn.io import load, state_dict_of
    from sj_sfn.utils import UserError

    sd = state_dict_of(load(path, trusted=trust), path)
    own = model.state_dict()
    heads = tuple(f"{name}." for name in _classifier_names(model))
    mismatched = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    body = [k for k in mismatched if not k.startswith(heads)]
    if body:
        k = body[0]
        raise UserError(f"--init {path} does not match {type(model).__name__}: {len(body)} weights differ in shape outside "
                        f"the classifier head (e.g. {k}: {tuple(sd[k].shape)} in the file, {tuple(own[k].shape)} in the model)")
    for k in mismatched:
        sd[k] = own[k]
    missing = [k for k in own if k not in sd]
    if missing:
        raise UserError(f"--init {path} does not match {type(model).__name__}: {len(missing)} missing keys (e.g. {missing[0]})")
    model.load_state_dict({k: v for k, v in sd.items() if k in own})


if __name__ == "__main__":
    sys.exit(main())
