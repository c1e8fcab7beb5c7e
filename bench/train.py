"""Training speed: this pipeline's loop against a plain float32 eager loop, same model and batch, one run.

    python bench/train.py [--backbones resnet50 iresnet50] [--batch 64] [--steps 6] [--json out.json]

plain: float32, NCHW, no autocast: `loss(head(model(x)))`, backward, SGD step, on a ready-made batch.
loop:  `arcface.train.train_one_epoch` with the default params: faces held as uint8 on the device and
       flipped/normalized there, channels_last, bf16 autocast where the hardware has it.
Images/s are measured after warm-up steps. On a GPU the table also shows the share of the GPU's bf16 peak
that the loop reaches (training ≈ 3 × the forward pass's FLOPs, counted by torch's FLOP counter).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from arcface.config import TrainParams
from arcface.data.datasets import DeviceBatches
from arcface.device import autocast_dtype, resolve_device
from arcface.losses import build_loss
from arcface.models.backbones import build_backbone
from arcface.models.heads import NormalizedLinear
from arcface.train import Distributed, FaceClassifier, build_state, train_one_epoch

CLASSES = 1000


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain(name: str, batch: int, steps: int, warmup: int, device: torch.device) -> float:
    torch.manual_seed(0)
    model = build_backbone(name).to(device)
    head = NormalizedLinear(512, CLASSES).to(device)
    loss_fn = build_loss("arcface", 64.0, 0.5)
    optimizer = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.01, momentum=0.9)
    images = torch.randn(batch, 3, 112, 112, device=device)
    labels = torch.randint(0, CLASSES, (batch,), device=device)
    for step in range(warmup + steps):
        if step == warmup:
            synchronize(device)
            started = time.perf_counter()
        loss = loss_fn(head(model(images)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    synchronize(device)
    return batch * steps / (time.perf_counter() - started)


def loop(name: str, batch: int, steps: int, warmup: int, device: torch.device, compile: bool) -> float:
    params = TrainParams(backbone=name, batch_size=batch, warmup_epochs=0, compile=compile)
    rng = np.random.default_rng(0)
    faces = rng.integers(0, 256, (batch * max(steps, warmup), 112, 112, 3), dtype=np.uint8)
    labels = rng.integers(0, CLASSES, len(faces))
    batches = DeviceBatches(faces, labels, batch, device, seed=0)
    state = build_state(params, CLASSES, len(batches), seed=0)
    state.backbone.to(device, memory_format=torch.channels_last)
    state.head.to(device)
    backbone = torch.compile(state.backbone) if compile else state.backbone
    model = FaceClassifier(backbone, state.head, autocast_dtype(params.amp, device))
    loss_fn = build_loss(params.loss, params.scale, params.margin)
    batches_warm = DeviceBatches(faces[: batch * warmup], labels[: batch * warmup], batch, device, seed=0)
    train_one_epoch(state, model, loss_fn, batches_warm, 1, params, Distributed())
    synchronize(device)
    started = time.perf_counter()
    train_one_epoch(state, model, loss_fn, batches, 2, params, Distributed())
    synchronize(device)
    return len(batches) * batch / (time.perf_counter() - started)


def forward_flops(name: str, device: torch.device) -> int:
    model = build_backbone(name).to(device).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, 112, 112, device=device))
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["resnet50", "iresnet50"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6, help="timed steps (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also torch.compile the loop's backbone")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="GPU bf16 peak (H200: ~790)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    rows = []
    for name in args.backbones:
        baseline = plain(name, args.batch, args.steps, args.warmup, device)
        fast = loop(name, args.batch, args.steps, args.warmup, device, args.compile)
        row = {"backbone": name, "plain_img_s": baseline, "loop_img_s": fast, "ratio": fast / baseline}
        if device.type == "cuda":
            flops = 3 * forward_flops(name, device)  # forward + backward ≈ 3 forwards
            row["peak_fraction"] = flops * fast / (args.peak_tflops * 1e12)
        rows.append(row)
    print(f"device: {device}, batch {args.batch}, {args.steps} timed steps after {args.warmup} warm-up")
    width = max(11, *(len(name) for name in args.backbones))  # resnet18-fast-half is 18 characters
    header = f"{'backbone':<{width}} {'plain img/s':>12} {'loop img/s':>11} {'ratio':>6}"
    print(header + ("  bf16 peak used" if device.type == "cuda" else ""))
    for row in rows:
        line = (
            f"{row['backbone']:<{width}} {row['plain_img_s']:>12.1f} {row['loop_img_s']:>11.1f} "
            f"{row['ratio']:>6.2f}"
        )
        if "peak_fraction" in row:
            line += f"  {row['peak_fraction']:>14.1%}"
        print(line)
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "batch": args.batch, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
