"""Crash campaign: SIGKILL a real cache writer N times while readers read. See synthaug/benchmarks/crash.py."""
from synthaug.benchmarks.crash import main

if __name__ == "__main__":
    main()
