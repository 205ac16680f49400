"""
Synthetic needle-in-a-haystack classification (PAPER.md §3), generated in memory.

Each of the n sequences holds seq_len noise tokens drawn uniformly from [noise_lo, vocab_size), except
for one "needle" at a uniform position in [floor(span[0] * seq_len), floor(span[1] * seq_len)) (at
least one position). The needle's class c is uniform in [0, n_classes), its id is
first_id + c * ids_per_class + j with j uniform in [0, ids_per_class), and the label is c.

The paper's demo: seq_len 512, vocab 300, noise 200..299, needle in the first 10% (positions 0..50),
4 classes of 5 ids (10..29); 5,000 train and 1,000 test sequences, e.g.
    x_train, y_train = make_needle(5000, seed=0); x_test, y_test = make_needle(1000, seed=1)
(train.py draws val from yet another seed).
"""
import math

import torch

def make_needle(n, seq_len=512, vocab_size=300, noise_lo=200, needle_span=(0.0, 0.1), n_classes=4,
                ids_per_class=5, first_id=10, seed=0):
    """-> (x: LongTensor (n, seq_len), y: LongTensor (n,)), deterministic given the arguments."""
    lo = math.floor(needle_span[0] * seq_len)
    hi = max(math.floor(needle_span[1] * seq_len), lo + 1)
    if n < 0 or seq_len < 1:
        raise ValueError(f'need n >= 0 and seq_len >= 1, got n={n}, seq_len={seq_len}')
    if not 0 <= noise_lo < vocab_size:
        raise ValueError(f'need 0 <= noise_lo < vocab_size, got noise_lo={noise_lo}, vocab_size={vocab_size}')
    if not 0.0 <= needle_span[0] <= needle_span[1] <= 1.0 or hi > seq_len:
        raise ValueError(f'needle_span={needle_span} must satisfy 0 <= span[0] <= span[1] <= 1 and leave a '
                         f'position inside seq_len={seq_len}')
    if n_classes < 1 or ids_per_class < 1 or first_id < 0:
        raise ValueError(f'need n_classes >= 1, ids_per_class >= 1, first_id >= 0, got {n_classes}, '
                         f'{ids_per_class}, {first_id}')
    if first_id + n_classes * ids_per_class > noise_lo:
        raise ValueError(f'needle ids {first_id}..{first_id + n_classes * ids_per_class - 1} must lie below '
                         f'the noise ids (noise_lo={noise_lo})')
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(noise_lo, vocab_size, (n, seq_len), generator=g)
    pos = torch.randint(lo, hi, (n,), generator=g)
    y = torch.randint(0, n_classes, (n,), generator=g)
    x[torch.arange(n), pos] = first_id + y * ids_per_class + torch.randint(0, ids_per_class, (n,), generator=g)
    return x, y
