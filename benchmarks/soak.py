"""Soak: a worker evicting from a small cache while two prefetching trainers read it; every item checked. See synthaug/benchmarks/soak.py."""
from synthaug.benchmarks.soak import main

if __name__ == "__main__":
    main()
