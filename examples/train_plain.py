"""Train a small CNN on Fashion-MNIST with synthetic images mixed in at an exact ratio: a plain loop.

    python examples/train_plain.py --cache cache/shirt.lmdb --ratio 0.25 --epochs 2

``--cache`` is a synthetic cache of 28×28 gray images labelled with Fashion-MNIST classes, as
``synthaug generate`` writes it (see ``synthaug generate --help``). ``--max-batches N`` makes each
epoch exactly N batches (``batches_per_epoch``) for a quick run. At the end the script prints the
realized synthetic share, from the sampler's counters.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torchvision import transforms

import synthaug
from synthaug.data.fashion_mnist import FashionMNIST


def small_cnn(num_classes: int = 10) -> nn.Module:
    """A two-conv CNN for 1×28×28 inputs (float32, normalized)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, num_classes),
    )


TRANSFORM = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.286,), (0.353,))])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", required=True, help="synthetic cache folder, filled by `synthaug generate`")
    p.add_argument("--ratio", type=float, default=0.25, help="synthetic share of every batch (default 0.25)")
    p.add_argument("--classes", nargs="*", default=None, help="draw synthetic images of these classes only (names or indices)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-batches", type=int, default=None, help="batches per epoch (default: the whole real training set)")
    p.add_argument("--eval-batches", type=int, default=20, help="test batches to evaluate on at the end (0: skip)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=None, help="folder with the Fashion-MNIST IDX files (default: the Debian package's)")
    return p.parse_args(argv)


def open_cache(path: str) -> synthaug.SyntheticCache:
    if not (Path(path) / "data.mdb").exists():
        sys.exit(f"no synthetic cache at {path}; fill one first with `synthaug generate` (see `synthaug generate --help`)")
    return synthaug.SyntheticCache(path)


def parse_classes(values):
    if not values:
        return None
    return [int(v) if v.lstrip("-").isdigit() else v for v in values]


@torch.no_grad()
def evaluate(model: nn.Module, root, batches: int, batch_size: int) -> dict:
    test = FashionMNIST(root, train=False, transform=TRANSFORM)
    loader = torch.utils.data.DataLoader(test, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    model.eval()
    correct = total = 0
    per_class = torch.zeros(10, 2)
    for i, (x, y) in enumerate(loader):
        if i >= batches:
            break
        pred = model(x).argmax(1)
        correct += int((pred == y).sum())
        total += len(y)
        per_class[:, 1] += torch.bincount(y, minlength=10)
        per_class[:, 0] += torch.bincount(y[pred == y], minlength=10)
    model.train()
    recall = (per_class[:, 0] / per_class[:, 1].clamp(min=1)).tolist()
    return {"accuracy": correct / max(total, 1), "recall": recall}


def share_line(stats: dict, ratio: float) -> str:
    total = stats["served"] + stats["real"]
    return (
        f"realized synthetic share: {stats['synthetic_share']:.4f} (target {ratio:.4f}; {stats['served']} synthetic of "
        f"{total} items; fresh {stats['fresh']}, reused {stats['reused']}, waited {stats['waited_s']:.1f} s)"
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    cache = open_cache(args.cache)
    real = FashionMNIST(args.data_root, train=True)
    loader = synthaug.mixed_loader(
        real,
        cache,
        args.batch_size,
        args.ratio,
        transform=TRANSFORM,
        classes=parse_classes(args.classes),
        seed=args.seed,
        batches_per_epoch=args.max_batches,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
    )
    sampler = loader.batch_sampler
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        total_loss, steps = 0.0, 0
        for x, y in loader:
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total_loss += loss.item()
            steps += 1
        s = sampler.stats()
        print(f"epoch {epoch}: {steps} batches, loss {total_loss / max(steps, 1):.4f}, synthetic share {s['epoch_synthetic_share']:.4f}", flush=True)
    result = {"stats": sampler.stats(), "seconds": time.perf_counter() - t0, "bad_records": loader.dataset.stats()}
    if args.eval_batches:
        result["eval"] = evaluate(model, args.data_root, args.eval_batches, 256)
        classes = FashionMNIST.classes
        recall = ", ".join(f"{classes[c]} {r:.2f}" for c, r in enumerate(result["eval"]["recall"]))
        print(f"test accuracy {result['eval']['accuracy']:.4f} ({args.eval_batches} batches); recall: {recall}")
    print(share_line(result["stats"], float(sampler.ratio())))
    return result


if __name__ == "__main__":
    main()
