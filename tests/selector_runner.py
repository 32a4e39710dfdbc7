"""``python tests/selector_runner.py ARGS``: train/train_selector.py with its label scorer replaced by the
images' mean pixel value, for the tests that launch it as separate processes (the scorer is not what they
test; GIQA is tested in test_selector_data.py and the own-model run)."""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "train"))
import train_selector  # noqa: E402

train_selector.quality_target = (
    lambda args, source: lambda images, records: images.astype(np.float64).mean(axis=(1, 2, 3)))

if __name__ == "__main__":
    sys.exit(train_selector.main(sys.argv[1:]))
