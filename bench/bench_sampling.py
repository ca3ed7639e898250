"""End-to-end sampling benchmark, admrt against guided-diffusion (see bench/measure.py;
`admrt bench --help`). Kept here so the benchmark scripts sit together in bench/."""
import sys

from measure import main

if __name__ == "__main__":
    sys.exit(main())
