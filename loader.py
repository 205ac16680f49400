"""
The data side of train.py: a prepared dataset (data/<name>/, written by its prepare.py; formats in
data/common.py) checked against its meta.json, and the batches of each task.

    meta = open_dataset(data_dir, task)                    # checked; exit 1 (2 if the task does not fit)
    data = load_task(data_dir, meta, task, block_size, device)
    order = TrainOrder(seed, rank, world)                 # the training order's generators and epoch position
    x, y, lengths = data.train_batch(order, batch_size)   # lengths: classify only (else None)
    n, batches = data.eval_batches('val', eval_bs, eval_iters, seed, full=False)

Tasks: 'lm' (LM: random windows of block_size + 1 tokens of one stream per split), 'classify' (Docs: one
document per row, right padded, with its length and label), 'seq' (Rows: fixed-length rows with a target
per position, -1 = none). Every file is opened once, when the run starts: a prepare that rewrites the
dataset while the run trains (new files under the same names) does not change what the run reads.
"""
import os
import subprocess
import sys

import numpy as np
import torch

from checkpoint import die
from codec import truncate_doc
from data.common import SPLITS, DatasetError, check_dataset

TASKS = ('lm', 'classify', 'seq')


def ensure_prepared(data_dir, dataset, root, default_dir):
    """The default run's dataset (shakespeare_char in its own folder) is prepared on first use."""
    if default_dir and dataset == 'shakespeare_char' and not os.path.exists(os.path.join(data_dir, 'meta.json')):
        print(f"{data_dir}/meta.json not found: running data/shakespeare_char/prepare.py")
        if subprocess.run([sys.executable, os.path.join(root, 'data', dataset, 'prepare.py')]).returncode:
            die("data/shakespeare_char/prepare.py failed")


def open_dataset(data_dir, task, verify_hashes=True):
    """meta.json of data_dir, after check_dataset (sizes; sha256 too if verify_hashes): exit 1 on a dataset that
    does not match its stamp, 2 on a task that does not fit its format."""
    try:
        meta = check_dataset(data_dir, verify_hashes=verify_hashes)
    except DatasetError as e:
        die(str(e))
    fmt = meta.get('format') or ('classify' if meta.get('n_classes') else 'lm')
    if (task == 'seq') != (fmt == 'seq') or (task == 'classify' and fmt != 'classify'):
        die(f"--task={task} does not fit {data_dir}, a {fmt!r} dataset: use " +
            ("--task=seq" if fmt == 'seq' else "--task=lm" if fmt == 'lm' else "--task=classify or --task=lm"), 2)
    return meta


class Tokens:
    """A split's flat token file, opened once. map() is a fresh memmap of that open file (per batch: a memmap
    kept for the whole run grows the resident memory, nanoGPT), never of a newer file under the same name."""

    def __init__(self, path, dtype):
        self.path, self.dtype, self.file = path, np.dtype(dtype), open(path, 'rb')

    def __len__(self):
        return os.fstat(self.file.fileno()).st_size // self.dtype.itemsize

    def map(self):
        return np.memmap(self.file, dtype=self.dtype, mode='r')


class TrainOrder:
    """Where training reads next, with generators of its own (evaluation never moves them; ckpt_last.pt keeps
    them): lm windows drawn with data_gen (seed + rank: each process its own); classify/seq shuffled epochs
    (drop_last) from perm_gen (seed: the same permutation on every process), at sampler['pos']."""

    def __init__(self, seed, rank=0, world=1):
        self.rank, self.world = rank, world
        self.data_gen = torch.Generator().manual_seed(seed + rank)
        self.perm_gen = torch.Generator().manual_seed(seed)
        self.sampler = {'epoch': 0, 'pos': 0, 'perm': None}


def to_device(device, *ts):
    if 'cuda' in str(device):
        return [t.pin_memory().to(device, non_blocking=True) if t is not None else None for t in ts]
    return [t.to(device) if t is not None else None for t in ts]


class LM:
    """lm: windows of the token stream of each split; targets are the inputs shifted by one token."""

    def __init__(self, data_dir, meta, block_size, device):
        self.block_size, self.device = block_size, device
        self.splits = {s: Tokens(os.path.join(data_dir, f'{s}.bin'), meta['dtype']) for s in SPLITS}
        for s, need in (('train', block_size + 2), ('val', 2), ('test', 2)):
            if len(self.splits[s]) < need:
                die(f"{self.splits[s].path} holds {len(self.splits[s])} tokens, fewer than " +
                    (f"block_size + 2 = {need}: lower --block_size" if s == 'train' else f"{need}"), 2)

    def windows(self, data, ix, n):
        """Rows data[i:i+n] (x) and data[i+1:i+1+n] (y) for each start i in ix."""
        ix = np.asarray(ix, dtype=np.int64)[:, None] + np.arange(n)
        x, y = (torch.from_numpy(data[ix + k].astype(np.int64)) for k in (0, 1))
        return to_device(self.device, x, y) + [None]

    def batch(self, split, gen, bs):
        """bs random windows of block_size + 1 tokens (nanoGPT's get_batch), drawn with generator `gen`."""
        data = self.splits[split].map()
        ix = torch.randint(len(data) - self.block_size - 1, (bs,), generator=gen).tolist()
        return self.windows(data, ix, self.block_size)

    def eval_batches(self, split, eval_bs, eval_iters, seed, full=False):
        """-> (number of batches, iterator over (x, y, None)): non-overlapping windows covering the split when
        it fits in eval_iters batches (or full), else eval_iters random batches, the same at every evaluation."""
        data = self.splits[split].map()
        n = min(self.block_size, len(data) - 1)
        starts = list(range(0, len(data) - n, n))
        if full or len(starts) <= eval_iters * eval_bs:
            chunks = [starts[b:b + eval_bs] for b in range(0, len(starts), eval_bs)]
            return len(chunks), (self.windows(data, ix, n) for ix in chunks)
        gen = torch.Generator().manual_seed(seed + 1)
        return eval_iters, (self.batch(split, gen, eval_bs) for _ in range(eval_iters))

    def train_batch(self, order, bs):
        return self.batch('train', order.data_gen, bs)

    def probe_batch(self, bs, seed):
        return self.batch('val', torch.Generator().manual_seed(seed + 1), bs)


class Docs:
    """classify: docs[i] = tokens[idx[i]:idx[i+1]], label labels[i], right padded into (B, T) batches."""

    def __init__(self, data_dir, split, meta, block_size, device):
        path = lambda suffix: os.path.join(data_dir, split + suffix)
        self.tokens, self.idx = Tokens(path('.bin'), meta['dtype']).map(), np.load(path('.idx.npy'))
        self.labels = torch.from_numpy(np.load(path('.labels.npy')).astype(np.int64))
        self.n, self.pad, self.eot = len(self.labels), meta.get('pad_token') or 0, meta.get('eot_token')
        self.block_size, self.device = block_size, device

    def batch(self, ids):
        docs = []
        for i in ids:
            d = truncate_doc(self.tokens[self.idx[i]:self.idx[i + 1]].astype(np.int64), self.block_size, self.eot)
            docs.append(d if len(d) else np.array([self.pad], dtype=np.int64))
        lengths = torch.tensor([len(d) for d in docs])
        T = min(self.block_size, -(-int(lengths.max()) // 64) * 64)  # few distinct shapes; docs of 512: T = 512
        x = torch.full((len(docs), T), self.pad, dtype=torch.long)
        for j, d in enumerate(docs):
            x[j, :len(d)] = torch.from_numpy(d)
        return to_device(self.device, x, self.labels[list(ids)], lengths)


class Rows:
    """seq: row i = tokens[i*L:(i+1)*L] with one target per position (-1: none), L = meta['seq_len']."""

    def __init__(self, data_dir, split, meta, block_size, device):
        L = meta['seq_len']
        self.x = Tokens(os.path.join(data_dir, f'{split}.bin'), meta['dtype']).map().reshape(-1, L)
        self.y = Tokens(os.path.join(data_dir, f'{split}.targets.bin'),
                        meta.get('target_dtype', 'int16')).map().reshape(-1, L)
        self.n, self.device = len(self.x), device

    def batch(self, ids):
        x, y = (torch.from_numpy(a[ids].astype(np.int64)) for a in (self.x, self.y))
        return to_device(self.device, x, y, None)


class Examples:
    """classify / seq: the three splits of Docs or Rows, read in shuffled epochs for training (drop_last; the
    same permutation on every process, each its own slice of every global batch) and in order for evaluation."""

    def __init__(self, data_dir, meta, task, block_size, device):
        self.splits = {s: (Docs if task == 'classify' else Rows)(data_dir, s, meta, block_size, device)
                       for s in SPLITS}
        self.n_train = self.splits['train'].n

    def check_batch(self, batch_size, world, data_dir):
        """The training examples per process and epoch (> 0, else exit 2)."""
        per_epoch = self.n_train // (batch_size * world)
        if per_epoch == 0:
            die(f"batch_size {batch_size} x {world} process(es) = {batch_size * world} exceeds the {self.n_train} "
                f"training examples of {data_dir}: lower --batch_size", 2)
        return per_epoch

    def n_cut(self, block_size):
        """classify: training documents longer than block_size (they are cut)."""
        docs = self.splits['train']
        return int((np.diff(docs.idx) > block_size).sum()) if isinstance(docs, Docs) else 0

    def train_batch(self, order, bs):
        """This process's next training batch: its slice of the next bs * world examples of the epoch."""
        s, B = order.sampler, bs * order.world
        if s['perm'] is None or s['pos'] + B > self.n_train:
            if s['perm'] is not None:
                s['epoch'] += 1
            s['perm'] = torch.randperm(self.n_train, generator=order.perm_gen)
            s['pos'] = 0
        lo = s['pos'] + order.rank * bs
        ids = s['perm'][lo:lo + bs].tolist()
        s['pos'] += B
        return self.splits['train'].batch(ids)

    def eval_batches(self, split, eval_bs, eval_iters=None, seed=None, full=True):
        data = self.splits[split]
        chunks = [list(range(b, min(b + eval_bs, data.n))) for b in range(0, data.n, eval_bs)]
        return len(chunks), (data.batch(ids) for ids in chunks)

    def probe_batch(self, bs, seed=None):
        val = self.splits['val']
        return val.batch(list(range(min(bs, val.n))))


def load_task(data_dir, meta, task, block_size, device):
    return LM(data_dir, meta, block_size, device) if task == 'lm' else Examples(data_dir, meta, task, block_size, device)
