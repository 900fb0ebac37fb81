"""A writer process for the crash-safety tests: appends batches forever, announcing each commit.

Each image is derived from its (batch, index) pair, and the meta records them, so a reader can
check every byte of every record it finds. After each append returns it prints
``committed <batch> <last_seq>`` (flushed), so the parent knows what must survive a SIGKILL.

    python -m tests.helpers.cache_writer CACHE_DIR START_BATCH BATCH_SIZE SIZE [MAP_SIZE] [ENCODING] [PAUSE_S]
"""

import sys
import time

import numpy as np

from synthaug.cache.store import SyntheticCache


def image_for(batch: int, index: int, size: int, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng([batch, index])
    return rng.integers(0, 256, (size, size, channels), dtype=np.uint8)


def main() -> None:
    path, start, batch_size, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    map_size = int(sys.argv[5]) if len(sys.argv) > 5 else 1 << 20
    encoding = sys.argv[6] if len(sys.argv) > 6 else "raw"
    pause = float(sys.argv[7]) if len(sys.argv) > 7 else 0.0
    cache = SyntheticCache(path, map_size=map_size, encoding=encoding)
    print("ready", flush=True)
    batch = start
    while True:
        images = np.stack([image_for(batch, i, size) for i in range(batch_size)])
        metas = [{"batch": batch, "index": i, "size": size} for i in range(batch_size)]
        seqs = cache.append(images, [batch % 10] * batch_size, metas)
        print(f"committed {batch} {seqs[-1]}", flush=True)
        batch += 1
        if pause:
            time.sleep(pause)


if __name__ == "__main__":
    main()
