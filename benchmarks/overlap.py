"""Overlap of generation and training: real-only vs pre-generate vs on-the-fly. See synthaug/benchmarks/overlap.py."""
from synthaug.benchmarks.overlap import main

if __name__ == "__main__":
    main()
