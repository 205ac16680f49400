"""
Synthetic needle-in-a-haystack classification (PAPER.md §3), written in the 'classify' format that
train.py's classify task reads (see data/common.py): every sequence is one document of seq_len tokens.

Each of the n sequences holds seq_len noise tokens drawn uniformly from [noise_lo, vocab_size), except
for one "needle" at a uniform position in [floor(span[0] * seq_len), floor(span[1] * seq_len)) (at
least one position). The needle's class c is uniform in [0, n_classes), its id is
first_id + c * ids_per_class + j with j uniform in [0, ids_per_class), and the label is c.

The paper's demo (the defaults): seq_len 512, vocab 300, noise 200..299, needle in the first 10% (positions
0..50), 4 classes of 5 ids (10..29); train 5,000 sequences (torch seed `seed`), test 1,000 (seed + 1),
val 1,000 (seed + 2):
    python data/needle/prepare.py                                   # -> data/needle, --dataset=needle
Harder variants go to their own folder (meta.json's name is the folder's name):
    python data/needle/prepare.py --seq_len 2048 --span 0.0 1.0 --out_dir data/needle2048
    python train.py config/needle.py --dataset=needle2048 --block_size=2048   # needle anywhere in 2048 tokens
    python data/needle/prepare.py --span 0.5 0.5 --out_dir data/needle_mid   # always at position seq_len/2

Files: {train,val,test}.bin (uint16 ids, all sequences concatenated), <split>.idx.npy (int64 offsets
0, seq_len, 2 seq_len, ...), <split>.labels.npy (int64 classes), meta.json (tokenizer 'ids', label_names
class0.., generator: every argument). In Python: `from data.needle import make_needle`.
"""
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

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

SPLIT_SEED_OFFSET = {'train': 0, 'val': 2, 'test': 1}  # train.py's old in-process needle used the same seeds

def main(args):
    t0 = time.time()
    out_dir = os.path.abspath(args.out_dir)
    gen = dict(seq_len=args.seq_len, vocab_size=args.vocab_size, noise_lo=args.noise_lo,
               needle_span=tuple(args.span), n_classes=args.n_classes, ids_per_class=args.ids_per_class,
               first_id=args.first_id)
    sizes = {'train': args.n_train, 'val': args.n_val, 'test': args.n_test}
    for split, n in sizes.items():
        if n < 1:
            raise common.PrepareError(f'--n_{split}', f'{n}: need at least 1 sequence per split to make '
                                                      f'non-empty train/val/test splits')
    seeds = {s: args.seed + SPLIT_SEED_OFFSET[s] for s in common.SPLITS}
    dtype = common.token_dtype(args.vocab_size)
    arrays, counts, label_counts = {}, {}, {}
    for split in common.SPLITS:
        n = sizes[split]
        try:
            x, y = make_needle(n, seed=seeds[split], **gen)
        except ValueError as e:
            raise common.PrepareError(None, f'needle arguments: {e}') from None
        arrays[f'{split}.bin'] = x.numpy().astype(dtype).reshape(-1)
        arrays[f'{split}.idx.npy'] = np.arange(n + 1, dtype=np.int64) * args.seq_len
        arrays[f'{split}.labels.npy'] = y.numpy().astype(np.int64)
        counts[split] = {'tokens': n * args.seq_len, 'docs': n}
        label_counts[split] = np.bincount(arrays[f'{split}.labels.npy'], minlength=args.n_classes).tolist()
    generator = {'script': 'data/needle/prepare.py', 'function': 'make_needle', **gen, 'needle_span': list(args.span),
                 'seed': args.seed, 'split_seeds': seeds, **{f'n_{s}': sizes[s] for s in sizes}}
    meta = {'name': args.name, 'format': 'classify', 'tokenizer': 'ids', 'vocab_size': args.vocab_size,
            'dtype': np.dtype(dtype).name, 'eot_token': None, 'pad_token': None, 'n_classes': args.n_classes,
            'label_names': [f'class{i}' for i in range(args.n_classes)], 'counts': counts,
            'source': 'synthetic: data/needle/prepare.py (see generator)', 'generator': generator}
    meta = common.write_files(out_dir, arrays, meta)
    common.summary(meta, out_dir, time.time() - t0, label_counts)

if __name__ == '__main__':
    common.cli(__file__, __doc__, main, src=False,
               seq_len=dict(type=int, default=512, help='tokens per sequence (default: %(default)s)'),
               vocab_size=dict(type=int, default=300, help='vocabulary size (default: %(default)s)'),
               span=dict(type=float, nargs=2, default=[0.0, 0.1], metavar=('LO', 'HI'),
                         help='the needle lies in [floor(LO*seq_len), floor(HI*seq_len)) (at least one position); '
                              '0.0 1.0 = anywhere (default: 0.0 0.1)'),
               n_classes=dict(type=int, default=4, help='classes (default: %(default)s)'),
               n_train=dict(type=int, default=5000, help='train sequences, seed SEED (default: %(default)s)'),
               n_val=dict(type=int, default=1000, help='val sequences, seed SEED+2 (default: %(default)s)'),
               n_test=dict(type=int, default=1000, help='test sequences, seed SEED+1 (default: %(default)s)'),
               seed=dict(type=int, default=0, help='torch seed of train (default: %(default)s)'),
               noise_lo=dict(type=int, default=200, help='noise ids are [noise_lo, vocab_size) (default: %(default)s)'),
               ids_per_class=dict(type=int, default=5, help='needle ids per class (default: %(default)s)'),
               first_id=dict(type=int, default=10, help='the first needle id (default: %(default)s)'))
