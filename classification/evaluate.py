#!/usr/bin/env python
"""ANN vs SNN test accuracy and energy ratio of a converted model: ``sj-sfn eval`` with the same options.

    python classification/evaluate.py snn.pth --data /data/imagenet --json eval.json
    torchrun --nproc_per_node 8 classification/evaluate.py snn.pth --data /data/imagenet --json eval.json

Under ``torchrun`` each process evaluates its share of the test batches; correct counts and
operation counts are all-reduced and rank 0 writes the JSON.
"""

import sys

from sj_sfn.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
