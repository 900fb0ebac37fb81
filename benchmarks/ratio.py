"""Ratio accuracy: our sampler vs per-sample coin flip vs WeightedRandomSampler. See synthaug/benchmarks/ratio.py."""
from synthaug.benchmarks.ratio import main

if __name__ == "__main__":
    main()
