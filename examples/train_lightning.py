"""Train a small CNN on Fashion-MNIST with synthetic images mixed in, with PyTorch Lightning.

    python examples/train_lightning.py --cache cache/shirt.lmdb --ratio 0.25 --epochs 2

The ``LightningDataModule`` builds the :class:`synthaug.RatioBatchSampler` and hands it to the
DataLoader as ``batch_sampler``. Lightning calls the sampler's ``set_epoch`` itself each epoch
(through ``batch_sampler.sampler.set_epoch``), and saves the sampler's state in checkpoints
through the data module's ``state_dict`` — as of the last batch the training step consumed, not
the last one the DataLoader workers fetched ahead. With several devices keep
``use_distributed_sampler=False``: the sampler already shards by rank.
``--cache`` is a cache filled by ``synthaug generate``; ``--max-batches`` fixes the batches per
epoch for a quick run. The realized synthetic share is printed at the end.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning as L
import torch
from torch import nn

import synthaug
from synthaug.data.fashion_mnist import FashionMNIST

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_plain import TRANSFORM, open_cache, parse_classes, share_line, small_cnn  # noqa: E402


class MixedFashionMNIST(L.LightningDataModule):
    """Fashion-MNIST training data mixed with a synthetic cache at an exact ratio."""

    def __init__(self, cache_path: str, ratio: float, batch_size: int = 64, *, classes=None, seed: int = 0,
                 batches_per_epoch=None, workers: int = 2, data_root=None) -> None:
        super().__init__()
        self.cache_path, self.ratio, self.batch_size = cache_path, ratio, batch_size
        self.classes, self.seed, self.batches_per_epoch = classes, seed, batches_per_epoch
        self.workers, self.data_root = workers, data_root
        self.sampler = None
        self._pending_state = None

    def setup(self, stage: str) -> None:
        if self.sampler is not None:
            return
        mixed = synthaug.MixedDataset(FashionMNIST(self.data_root, train=True), open_cache(self.cache_path), transform=TRANSFORM)
        self.sampler = synthaug.RatioBatchSampler(
            mixed,
            batch_size=self.batch_size,
            synthetic_ratio=self.ratio,
            classes=self.classes,
            seed=self.seed,
            batches_per_epoch=self.batches_per_epoch,
        )  # num_replicas / rank come from torch.distributed when Lightning runs DDP
        if self._pending_state is not None:
            self.sampler.load_state_dict(self._pending_state)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            self.sampler.mixed, batch_sampler=self.sampler, num_workers=self.workers, persistent_workers=self.workers > 0
        )

    # saved in (and restored from) Lightning checkpoints
    def state_dict(self) -> dict:
        if self.sampler is None:
            return {}
        consumed = None
        if self.trainer is not None and self.trainer.training:
            # batches of this epoch the training step has processed; the workers fetched ahead
            consumed = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"sampler": self.sampler.state_dict(consumed=consumed)}

    def load_state_dict(self, state: dict) -> None:
        if "sampler" in state:
            if self.sampler is not None:
                self.sampler.load_state_dict(state["sampler"])
            else:
                self._pending_state = state["sampler"]


class Classifier(L.LightningModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.net = small_cnn()
        self.loss_fn = nn.CrossEntropyLoss()

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss_fn(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def on_train_epoch_end(self) -> None:
        stats = self.trainer.datamodule.sampler.stats()
        self.log_dict({"synthetic_share": stats["epoch_synthetic_share"], "synthetic_fresh": float(stats["epoch_fresh"]),
                       "synthetic_reused": float(stats["epoch_reused"])})

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", required=True, help="synthetic cache folder, filled by `synthaug generate`")
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--classes", nargs="*", default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-batches", type=int, default=None, help="batches per epoch (default: the whole real training set)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=None)
    p.add_argument("--default-root-dir", default=None, help="where Lightning writes logs and checkpoints (default: none written)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="also checkpoint every N training steps (needs --default-root-dir)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    L.seed_everything(args.seed, verbose=False)
    data = MixedFashionMNIST(args.cache, args.ratio, args.batch_size, classes=parse_classes(args.classes), seed=args.seed,
                             batches_per_epoch=args.max_batches, workers=args.workers, data_root=args.data_root)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        use_distributed_sampler=False,  # the RatioBatchSampler shards by rank itself
        logger=args.default_root_dir is not None,
        enable_checkpointing=args.default_root_dir is not None,
        default_root_dir=args.default_root_dir,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[L.pytorch.callbacks.ModelCheckpoint(every_n_train_steps=args.checkpoint_every, save_top_k=-1)]
        if args.checkpoint_every and args.default_root_dir
        else None,
    )
    trainer.fit(Classifier(args.lr), datamodule=data)
    stats = data.sampler.stats()
    print(share_line(stats, float(data.sampler.ratio())))
    return {"stats": stats, "global_step": trainer.global_step}


if __name__ == "__main__":
    main()
