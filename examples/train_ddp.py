"""Train a small CNN on Fashion-MNIST with synthetic images mixed in, on several processes (DDP).

    torchrun --nproc_per_node=2 examples/train_ddp.py --cache cache/shirt.lmdb --ratio 0.25

Each rank reads its own shard of the real data and only the synthetic records with
``seq % world_size == rank``; the sampler takes the world size and rank from
``torch.distributed``, and every rank yields the same number of batches. Runs on CPU with the
gloo backend (nccl when CUDA is available). ``--cache`` is a cache filled by ``synthaug
generate``; ``--max-batches`` fixes the batches per epoch for a quick run. Rank 0 prints the
realized synthetic share over all ranks.

Generating while training, one node-local cache and one worker per node::

    torchrun --nnodes=2 --nproc_per_node=4 --rdzv_backend=c10d --rdzv_endpoint=HOST0:29500 \
        examples/train_ddp.py --cache /local/scratch/shirt.lmdb --worker cache/adapters/shirt --ratio 0.25

``--worker SOURCE`` (an adapter folder or model, as for ``synthaug worker``): the process with
``LOCAL_RANK`` 0 on each node starts a GenerationWorker on that node's ``--cache`` (a path on
node-local disk: LMDB must not live on NFS), with a seed range of its own node, and the node's
ranks split that cache's records among themselves (``cache_shard="local"``). The real data is
still sharded over the whole world. ``--worker-device`` puts the generator on its own GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import synthaug
from synthaug.data.fashion_mnist import FashionMNIST

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_plain import TRANSFORM, open_cache, parse_classes, share_line, small_cnn  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", required=True, help="synthetic cache folder, filled by `synthaug generate` (or by --worker)")
    p.add_argument("--worker", default=None, metavar="SOURCE", help="generate while training: one GenerationWorker per node on a node-local --cache")
    p.add_argument("--worker-device", default=None, help="device of each node's worker (default: the generator's)")
    p.add_argument("--worker-threads", type=int, default=1, help="torch CPU threads of each node's worker (default 1)")
    p.add_argument("--worker-label", type=int, default=None, help="class the worker generates, for a model without adapter (e.g. builtin:fashion-mnist-ddpm)")
    p.add_argument("--min-fresh", type=int, default=1024, help="records each node's worker keeps unconsumed (default 1024)")
    p.add_argument("--max-items", type=int, default=50_000, help="records each node's cache keeps at most (default 50,000; see the README's freshness rule)")
    p.add_argument("--cache-shard", choices=["global", "local"], default=None,
                   help="global: one cache (or identical copies) read by all ranks, seq %% world_size; local: one cache per node, split among "
                        "the node's ranks (default: local with --worker, else global)")
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--classes", nargs="*", default=None)
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-batches", type=int, default=None, help="batches per epoch and rank (default: the whole real shard)")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers per rank")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=None)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if backend == "nccl" else torch.device("cpu")
    torch.manual_seed(args.seed)  # same initial weights on every rank
    worker = None
    if args.worker:
        local_rank, local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        node = rank // local_world
        if local_rank == 0:  # one worker per node, on the node's own cache; seeds never overlap between nodes
            cache = synthaug.SyntheticCache(args.cache, label_names=list(FashionMNIST.classes))
            spec = {"source": args.worker, "overrides": {} if args.worker_label is None else {"label": args.worker_label}}
            worker = synthaug.GenerationWorker(cache, spec, min_fresh=args.min_fresh, max_items=args.max_items, seed=node * 10**9,
                                               device=args.worker_device, num_threads=args.worker_threads).start()
        dist.barrier()  # the cache exists before the node's other ranks open it
        cache = synthaug.SyntheticCache(args.cache)
    else:
        cache = open_cache(args.cache)
    shard = {"cache_shard": "local"} if (args.cache_shard or ("local" if args.worker else "global")) == "local" else {}
    try:
        train(args, cache, shard, rank, world, device)
    finally:
        if worker is not None:
            status = worker.stop()
            print(f"node {rank // int(os.environ.get('LOCAL_WORLD_SIZE', 1))}: worker made {status['generated']} images "
                  f"({status['images_per_s']:.2f} images/s)", flush=True)
        dist.destroy_process_group()


def train(args, cache, shard, rank: int, world: int, device) -> None:
    real = FashionMNIST(args.data_root, train=True)
    loader = synthaug.mixed_loader(
        real,
        cache,
        args.batch_size,
        args.ratio,
        transform=TRANSFORM,
        classes=parse_classes(args.classes),
        seed=args.seed,  # the same on every rank: the real shuffle is global, then sharded
        batches_per_epoch=args.max_batches,
        num_workers=args.workers,
        **shard,
    )
    sampler = loader.batch_sampler
    model = DistributedDataParallel(small_cnn().to(device))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        steps, total_loss = 0, 0.0
        for x, y in loader:
            loss = loss_fn(model(x.to(device)), y.to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            total_loss += loss.item()
        if rank == 0:
            print(f"epoch {epoch}: {steps} batches per rank, loss {total_loss / max(steps, 1):.4f} (rank 0)", flush=True)
    s = sampler.stats()
    counts = torch.tensor([s["served"], s["real"], s["fresh"], s["reused"], steps], dtype=torch.float64)
    gathered = [torch.zeros_like(counts) for _ in range(world)]
    dist.all_gather(gathered, counts)
    if rank == 0:
        served, real_items, fresh, reused = (float(sum(g[i] for g in gathered)) for i in range(4))
        batches = [int(g[4]) for g in gathered]
        total = {"served": int(served), "real": int(real_items), "fresh": int(fresh), "reused": int(reused),
                 "waited_s": s["waited_s"], "synthetic_share": served / max(served + real_items, 1)}
        print(f"batches in the last epoch per rank: {batches}")
        print(share_line(total, float(sampler.ratio())) + f" over {world} ranks")


if __name__ == "__main__":
    main()
