"""python -m relaxeq_fast.train (and torchrun ... -m relaxeq_fast.train): relaxeq-train."""
import sys

from .cli import main

sys.exit(main())
