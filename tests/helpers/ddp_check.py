"""Run under torchrun: every rank builds a RatioBatchSampler with the world size and rank taken
from torch.distributed (gloo, CPU), yields one epoch of index batches and loads one more epoch
through a DataLoader; rank 0 writes what all ranks saw to a JSON file.

    python -m torch.distributed.run --nproc_per_node=2 -m tests.helpers.ddp_check CACHE OUT_JSON N_REAL
"""

import json
import sys

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from synthaug import MixedDataset, RatioBatchSampler, SyntheticCache
from synthaug.data.fashion_mnist import FashionMNIST
from synthaug.mixing import is_synthetic


def to_tensor(image):
    import numpy as np

    return torch.from_numpy(np.asarray(image).copy())


def main() -> None:
    cache_path, out, n_real = sys.argv[1], sys.argv[2], int(sys.argv[3])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mixed = MixedDataset(Subset(FashionMNIST(train=True), range(n_real)), SyntheticCache(cache_path), transform=to_tensor)
    sampler = RatioBatchSampler(mixed, batch_size=8, synthetic_ratio=0.25, seed=3)
    batches = [[(["s", i.seq] if is_synthetic(i) else ["r", i]) for i in b] for b in sampler]
    sampler.set_epoch(1)
    loaded = [len(y) for _, y in DataLoader(mixed, batch_sampler=sampler, num_workers=1)]
    mine = {"rank": rank, "world": world, "sampler": [sampler.num_replicas, sampler.rank], "batches": batches,
            "loaded": loaded, "consumer": sampler.consumer}
    write_all_ranks(mine, out)


def write_all_ranks(mine, out) -> None:
    """Gather every rank's ``mine``; rank 0 writes the list to ``out`` (JSON); then leave the group."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(everyone, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
