"""Export the best trial of a sweep: ``python scripts/export_best.py SWEEP`` is ``finetune-export SWEEP``.

The code is ``sweeps/export.py``; this file keeps the documented command working from a checkout.
"""
import sys

from sweeps.export import main

if __name__ == "__main__":
    sys.exit(main())
