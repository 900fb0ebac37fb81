"""Run under torchrun: every rank builds a RatioBatchSampler with an AdaptiveRatio, loads two
epochs through a DataLoader (one worker, prefetching) and observes a metric every 4 steps that
differs from rank to rank; rank 0 writes what all ranks saw to a JSON file.

    python -m torch.distributed.run --nproc_per_node=2 -m tests.helpers.ddp_adaptive CACHE OUT_JSON
"""

import sys

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from synthaug import MixedDataset, RatioBatchSampler, SyntheticCache
from synthaug.data.fashion_mnist import FashionMNIST
from synthaug.mixing.adaptive import AdaptiveRatio
from tests.helpers.ddp_check import write_all_ranks


def zeros(image):
    return torch.zeros(1)


def main() -> None:
    cache_path, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mixed = MixedDataset(Subset(FashionMNIST(train=True), range(200)), SyntheticCache(cache_path), transform=zeros, mark_synthetic=True)
    ctrl = AdaptiveRatio({"Shirt": 0.1, "Coat": 0.1}, grid=[0.05, 0.1, 0.2, 0.3], interval=4, min_pairs=1, z=0.0)
    sampler = RatioBatchSampler(mixed, batch_size=8, synthetic_ratio=ctrl, seed=3)
    # rank 1 also fetches further ahead than rank 0: the change must still land on the same batch
    loader = DataLoader(mixed, batch_sampler=sampler, num_workers=1, prefetch_factor=2 + rank)
    shapes, step = [], 0
    for epoch in range(2):
        sampler.set_epoch(epoch)
        seen = []
        for _, _, synthetic in loader:
            seen.append(int(synthetic.sum()))
            step += 1
            if ctrl.due(step):
                # only rank 0's reading is read: rank 1 passes one of its own, or none at all
                mine = {"Shirt": (step * (7 + rank)) % 5, "Coat": (step * (3 + rank)) % 4}
                ctrl.observe(step, mine if rank == 0 or step % 8 else None)
        shapes.append(seen)
    try:  # a reading rank 0 refuses raises on every rank (none is left waiting in a collective)
        ctrl.observe(step + 1, {"Shirt": float("nan"), "Coat": 0.0} if rank == 0 else None)
        refused = None
    except ValueError as exc:
        refused = str(exc)
    mine = {"rank": rank, "changes": sampler.changes(), "controller": ctrl.state_dict(), "shapes": shapes, "refused": refused}
    write_all_ranks(mine, out)


if __name__ == "__main__":
    main()
