"""One generation worker with 3 LoRA adapters (one base model, adapters swapped per batch) against
3 workers with one adapter each on the same cores, and the cost of one adapter swap. See
synthaug/benchmarks/adapters.py."""
from synthaug.benchmarks.adapters import main

if __name__ == "__main__":
    main()
