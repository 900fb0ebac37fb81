"""Cache throughput per encoding vs a bare py-lmdb loop. See synthaug/benchmarks/cache.py."""
from synthaug.benchmarks.cache import main

if __name__ == "__main__":
    main()
