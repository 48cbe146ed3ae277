#!/usr/bin/env python3
"""Stand-in for kohya-ss/sd-scripts `flux_train_network.py` (see kohya_standin.py)."""
import os
import sys

sys.dont_write_bytecode = True  # keep the test tree free of __pycache__
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kohya_standin  # noqa: E402

if __name__ == "__main__":
    kohya_standin.main("flux")
