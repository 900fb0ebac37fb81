"""Sampler/steps/options of the embedded pixel DDPM: images/s on one CPU thread against class
recognition of its images. See synthaug/benchmarks/sampler.py."""
from synthaug.benchmarks.sampler import main

if __name__ == "__main__":
    main()
