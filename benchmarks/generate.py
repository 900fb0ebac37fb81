"""Generator throughput: pixel DDPM on CPU; SD-1.5 at 512 px, diffusers default vs ours, on CUDA.
See synthaug/benchmarks/generate.py."""
from synthaug.benchmarks.generate import main

if __name__ == "__main__":
    main()
