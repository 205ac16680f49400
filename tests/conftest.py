import os
import sys

import torch

# the repository root holds mipt.py, train.py and data/
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# tests run many small ops, where extra threads cost more than they give
torch.set_num_threads(1)
