"""``sj-sfn theorem``: Theorem 1 on random data (an IF neuron's T-step average equals one MTN step)."""

from __future__ import annotations

import argparse

import torch
from spikingjelly.activation_based import functional, neuron

from ..neuron import MTNode
from .common import positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    th = sub.add_parser("theorem", help="check Theorem 1 (IF over T steps == one MTN step) on random data")
    th.add_argument("--n", type=positive_int, default=20000, help="random neurons per T")
    th.add_argument("--seed", type=int, default=0)
    th.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check Theorem 1 on random data: T-step IF average == one MTN step."""
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
