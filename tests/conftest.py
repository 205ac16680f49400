import os
import sys

import torch

# the repository root holds mipt.py, train.py and data/
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# tests run many small ops, where extra threads cost more than they give
torch.set_num_threads(1)
# without a GPU, Triton's interpreter runs the fused cache kernel (cache_kernel.py) on the CPU for its tests;
# it must be chosen before the kernel module is first imported
if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')
