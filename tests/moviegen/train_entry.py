"""`torchrun tests/moviegen/train_entry.py RECIPE --set ...`: the trainer's CLI with the tests' clip reader registered."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import tests.moviegen.synthetic  # noqa: E402,F401  registers "moviegen_synthetic"
from gigatron.core.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
