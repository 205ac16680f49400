"""
Multi-query associative recall (MQAR; Arora, Eyuboglu et al. 2023, "Zoology: Measuring and improving recall
in efficient language models"), generated with numpy and written in the 'seq' format (see data/common.py).

A sequence of seq_len (L) tokens over a vocabulary of V = vocab_size ids:
  * N = n_pairs distinct keys from [1, V//2) and N distinct values from [V//2, V), drawn uniformly;
  * it opens with the N pairs  k1 v1 k2 v2 ... kN vN  (positions 0 .. 2N-1);
  * every later position holds 0, except that key i appears once more, as a query, at position 2N + 2 g_i.
    The gaps g_1, g_2, ... are drawn one after the other without replacement from {0, ..., S-1},
    S = (L - 2N) // 2, with P(g) proportional to (g + 1)^(alpha - 1) (alpha = 0.01: short gaps dominate);
    g_i is the i-th draw. This is Zoology's multiquery_ar exactly (its p = a * arange(1, S+1)**(a-1) over
    arange(S), its np.random.choice(replace=False) draws in order, its put_along_axis(keys at 2 * gaps)).
  * targets: at a query position, the key's value; everywhere else -1 (ignored by the loss).

Where the label sits: as in Zoology (its labels are shifted left by one against its inputs), the target
sits on the query key itself: the model reads key k_i at position 2N + 2 g_i and must output v_i at that
same position; the value is NOT in the input at the next position (that position holds 0). So
x[r, p] = k_i and y[r, p] = v_i at each query, with next-token models predicting y[p] from x[:p+1].
Differences from Zoology: the non-query positions hold 0 (Zoology's default random_non_queries=True fills
them with uniform ids from [0, V), keys included; --random_non_queries does the same here), and the random
numbers come from numpy's PCG64 per block of 4,096 rows, seeded with (seed, split stream, block), so
splits never share a stream for any --seed and the first rows of a split do not depend on its size.
Sampling is vectorised: a partial Fisher-Yates shuffle per row for the distinct keys and values, and the
Gumbel-top-k trick (argmax of log w - log E, E ~ Exp(1)) for the ordered gaps, which draws exactly as
sequential weighted sampling without replacement does.

Splits: train 100,000 (stream 0), val 3,000 (stream 1; the training distribution, its own stream),
test 3,000 (stream 2). 100,000 x 512 takes a few seconds.

Files: {split}.bin = inputs, uint16 (uint32 if V > 65536), n * L flat (row r = [r*L, (r+1)*L));
{split}.targets.bin = targets, int16 (int32 if V > 32768), n * L flat, -1 = ignore; meta.json
{name, format 'seq', tokenizer 'ids', vocab_size, dtype, target_dtype, seq_len, n_pairs, alpha, counts
{split: {tokens, docs}}, eot_token None, pad_token None, n_classes 0, label_names [], generator, files}.

    python data/mqar/prepare.py                                             # -> data/mqar, L 512, N 64
    python data/mqar/prepare.py --seq_len 256 --n_pairs 16 --out_dir data/mqar256   # --dataset=mqar256
"""
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

BLOCK = 4096  # rows per random stream
STREAMS = {'train': 0, 'val': 1, 'test': 2}

def sample_distinct(rng, n, lo, hi, k):
    """(n, k) int64: per row, k distinct ids from [lo, hi) in uniformly random order (partial Fisher-Yates)."""
    m = hi - lo
    if not 0 <= k <= m:
        raise ValueError(f'cannot draw {k} distinct ids from [{lo}, {hi})')
    pool = np.empty((n, m), dtype=np.int16 if m <= np.iinfo(np.int16).max else np.int64)
    pool[:] = np.arange(m, dtype=pool.dtype)
    rows = np.arange(n)
    for i in range(k):
        j = rng.integers(i, m, size=n)
        a = pool[:, i].copy()
        pool[:, i] = pool[rows, j]
        pool[rows, j] = a
    return pool[:, :k].astype(np.int64) + lo

def gumbel_top_k(rng, log_w, n, k):
    """(n, k) int64: per row, k indices into log_w drawn one after the other without replacement with
    P proportional to exp(log_w) among those left, in draw order (the Gumbel-top-k trick)."""
    if not 0 < k <= len(log_w):
        raise ValueError(f'cannot draw {k} of {len(log_w)} without replacement')
    keys = log_w[None, :] - np.log(rng.standard_exponential((n, len(log_w))))
    top = np.argpartition(-keys, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(keys, top, axis=1), axis=1, kind='stable')
    return np.take_along_axis(top, order, axis=1)

def gap_log_weights(space, alpha):
    """log of Zoology's gap law: gap g in [0, space) has weight (g + 1)^(alpha - 1)."""
    return (alpha - 1.0) * np.log(np.arange(1, space + 1, dtype=np.float64))

def check_args(seq_len, n_pairs, vocab_size, alpha, seed):
    if n_pairs < 1:
        raise ValueError(f'n_pairs must be >= 1, got {n_pairs}')
    if n_pairs > vocab_size // 2 - 1:
        raise ValueError(f'{n_pairs} distinct keys do not fit in [1, {vocab_size // 2}) (vocab_size {vocab_size})')
    if seq_len < 4 * n_pairs:
        raise ValueError(f'seq_len must be >= 4 * n_pairs = {4 * n_pairs} (the pairs, then a query slot for '
                         f'each key among (seq_len - 2 n_pairs) // 2 gaps), got {seq_len}')
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f'alpha must be a positive number, got {alpha}')
    if seed < 0:
        raise ValueError(f'seed must be >= 0, got {seed}')

def target_dtype(vocab_size):
    return np.int16 if vocab_size <= np.iinfo(np.int16).max + 1 else np.int32

def make_mqar(n, seq_len=512, n_pairs=64, vocab_size=8192, alpha=0.01, seed=0, stream=0, random_non_queries=False):
    """-> (x (n, seq_len) uint16/uint32 inputs, y (n, seq_len) int16/int32 targets, -1 = ignore), deterministic
    given the arguments; rows [0, m) are the same for every n >= m."""
    check_args(seq_len, n_pairs, vocab_size, alpha, seed)
    N, half = n_pairs, vocab_size // 2
    space = (seq_len - 2 * N) // 2
    log_w = gap_log_weights(space, alpha)
    x = np.zeros((n, seq_len), common.token_dtype(vocab_size))
    y = np.full((n, seq_len), -1, target_dtype(vocab_size))
    for b, r0 in enumerate(range(0, n, BLOCK)):
        rng = np.random.default_rng([seed, stream, b])
        c = min(BLOCK, n - r0)  # a whole block is drawn, so that its rows do not depend on n
        keys = sample_distinct(rng, BLOCK, 1, half, N)[:c]
        values = sample_distinct(rng, BLOCK, half, vocab_size, N)[:c]
        gaps = gumbel_top_k(rng, log_w, BLOCK, N)[:c]
        xb, yb = x[r0:r0 + c], y[r0:r0 + c]
        xb[:, 0:2 * N:2] = keys
        xb[:, 1:2 * N:2] = values
        q = 2 * N + 2 * gaps  # key i is queried at its i-th drawn gap
        np.put_along_axis(xb, q, keys, axis=1)
        np.put_along_axis(yb, q, values, axis=1)
        if random_non_queries:
            fill = rng.integers(0, vocab_size, size=(BLOCK, seq_len))[:c]
            xb[xb == 0] = fill[xb == 0]
    return x, y

def main(args):
    t0 = time.time()
    out_dir = os.path.abspath(args.out_dir)
    sizes = {'train': args.n_train, 'val': args.n_val, 'test': args.n_test}
    for split, n in sizes.items():
        if n < 1:
            raise common.PrepareError(f'--n_{split}', f'{n}: need at least 1 sequence per split to make '
                                                      f'non-empty train/val/test splits')
    gen = dict(seq_len=args.seq_len, n_pairs=args.n_pairs, vocab_size=args.vocab_size, alpha=args.alpha,
               seed=args.seed, random_non_queries=args.random_non_queries)
    try:
        check_args(args.seq_len, args.n_pairs, args.vocab_size, args.alpha, args.seed)
    except ValueError as e:
        raise common.PrepareError(None, f'mqar arguments: {e}') from None
    arrays, counts = {}, {}
    for split in common.SPLITS:
        x, y = make_mqar(sizes[split], stream=STREAMS[split], **gen)
        arrays[f'{split}.bin'], arrays[f'{split}.targets.bin'] = x.reshape(-1), y.reshape(-1)
        counts[split] = {'tokens': x.size, 'docs': len(x)}
    generator = {'script': 'data/mqar/prepare.py', 'function': 'make_mqar', **gen,
                 'key_range': [1, args.vocab_size // 2], 'value_range': [args.vocab_size // 2, args.vocab_size],
                 'gap_law': '(g + 1) ** (alpha - 1), g in [0, (seq_len - 2 n_pairs) // 2)',
                 'split_streams': STREAMS, 'block_rows': BLOCK, **{f'n_{s}': sizes[s] for s in sizes}}
    meta = {'name': args.name, 'format': 'seq', 'tokenizer': 'ids', 'vocab_size': args.vocab_size,
            'dtype': arrays['train.bin'].dtype.name, 'target_dtype': arrays['train.targets.bin'].dtype.name,
            'seq_len': args.seq_len, 'n_pairs': args.n_pairs, 'alpha': args.alpha, 'counts': counts,
            'eot_token': None, 'pad_token': None, 'n_classes': 0, 'label_names': [],
            'source': 'synthetic: data/mqar/prepare.py (see generator)', 'generator': generator}
    meta = common.write_files(out_dir, arrays, meta)
    common.summary(meta, out_dir, time.time() - t0)

if __name__ == '__main__':
    common.cli(__file__, __doc__, main, src=False,
               seq_len=dict(type=int, default=512, help='tokens per sequence (default: %(default)s)'),
               n_pairs=dict(type=int, default=64, help='key-value pairs per sequence (default: %(default)s)'),
               vocab_size=dict(type=int, default=8192, help='keys [1, V/2), values [V/2, V) (default: %(default)s)'),
               n_train=dict(type=int, default=100_000, help='train sequences (default: %(default)s)'),
               n_val=dict(type=int, default=3000,
                          help='val sequences, from the training distribution (default: %(default)s)'),
               n_test=dict(type=int, default=3000, help='test sequences (default: %(default)s)'),
               alpha=dict(type=float, default=0.01, help='gap law (g+1)^(alpha-1) (default: %(default)s)'),
               seed=dict(type=int, default=0, help='seed; the splits use streams 0 / 1 / 2 (default: %(default)s)'),
               random_non_queries=dict(action='store_true',
                                       help="fill non-query positions with uniform ids, as Zoology's default does"))
