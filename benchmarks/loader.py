"""Loader throughput: plain vs mixed DataLoader vs the synthetic read path. See synthaug/benchmarks/loader.py."""
from synthaug.benchmarks.loader import main

if __name__ == "__main__":
    main()
