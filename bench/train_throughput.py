"""Training and inference throughput of the backbones, bf16 autocast against full precision (the baseline).

    python bench/train_throughput.py [--backbones resnet34 resnet50] [--batch 64] [--json out.json]

Both precisions run in this one process on the same random 112×112 batch, so the ratio is meaningful on a
noisy machine. Images/s are the median of the timed steps after warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from arcface.device import autocast, resolve_device
from arcface.losses import build_loss
from arcface.models.backbones import build_backbone
from arcface.models.heads import NormalizedLinear


def measure(name: str, dtype: torch.dtype | None, batch: int, steps: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = build_backbone(name).to(device, memory_format=torch.channels_last)
    head = NormalizedLinear(512, 1000).to(device)
    loss_fn = build_loss("arcface", 64.0, 0.5)
    optimizer = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.01, momentum=0.9)
    images = torch.randn(batch, 3, 112, 112, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch,), device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    train_times = []
    for step in range(steps + 2):  # two warm-up steps
        sync()
        started = time.perf_counter()
        with autocast(device, dtype):
            embeddings = model(images)
        loss = loss_fn(head(embeddings), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync()
        if step >= 2:
            train_times.append(time.perf_counter() - started)
    model.eval()
    infer_times = []
    with torch.inference_mode():
        for step in range(steps + 2):
            sync()
            started = time.perf_counter()
            with autocast(device, dtype):
                model(images)
            sync()
            if step >= 2:
                infer_times.append(time.perf_counter() - started)
    return {
        "backbone": name,
        "precision": "bf16" if dtype else "fp32",
        "train_img_s": batch / statistics.median(train_times),
        "infer_img_s": batch / statistics.median(infer_times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["resnet34", "resnet50"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    device = resolve_device(args.device)
    rows = []
    for name in args.backbones:
        baseline = measure(name, None, args.batch, args.steps, device)
        fast = measure(name, torch.bfloat16, args.batch, args.steps, device)
        for row in (baseline, fast):
            row["train_ratio"] = row["train_img_s"] / baseline["train_img_s"]
            row["infer_ratio"] = row["infer_img_s"] / baseline["infer_img_s"]
            rows.append(row)
    print(f"device: {device}, batch {args.batch}, median of {args.steps} steps")
    header = ("backbone", "precision", "train img/s", "× fp32", "infer img/s", "× fp32")
    print("{:<10} {:<9} {:>12} {:>7} {:>12} {:>7}".format(*header))
    for r in rows:
        print(
            f"{r['backbone']:<10} {r['precision']:<9} {r['train_img_s']:>12.1f} {r['train_ratio']:>7.2f}"
            f" {r['infer_img_s']:>12.1f} {r['infer_ratio']:>7.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "batch": args.batch, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
