#!/usr/bin/env python
"""Convert a trained classifier into a one-timestep SNN: ``sj-sfn convert`` with the same options.

    python classification/convert.py vit_base_patch16_224 --checkpoint vit.pth --data /data/imagenet --tune --out snn.pth
    torchrun --nproc_per_node 8 classification/convert.py ...     # calibration split across 8 processes

Under ``torchrun`` every process calibrates on its share of the batches and the observer
statistics are all-reduced, so the thresholds equal a single-process run; rank 0 writes files.
"""

import sys

from sj_sfn.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
