"""
Train a MIPT-SSM model (or its Transformer twin, --mixer=attention). After nanoGPT's train.py.

    python train.py                                   # small MIPT char-LM on shakespeare_char (CPU: minutes)
    python train.py config/train_shakespeare_char.py  # a config file, then --key=value overrides
    python train.py config/needle.py --mixer=attention
    python train.py --init_from=resume --out_dir=out  # continue exactly from out/ckpt_last.pt
    torchrun --standalone --nproc_per_node=4 train.py config/lm_wikitext103.py --gradient_accumulation_steps=4   # DDP
    python train.py --help                            # every key and its default

Tasks: 'lm' (random windows of data/<dataset>/train.bin; val loss/ppl), 'classify' (one document per
row, right padded, read out at its last token; val accuracy), 'needle' (synthetic needle-in-a-haystack
from data/needle.py; accuracy). Model selection uses val; the best checkpoint (out_dir/ckpt.pt) is
evaluated on test exactly once at the end, and everything lands in out_dir/metrics.json.
out_dir/ckpt_last.pt (written at every eval and on Ctrl-C) resumes a run exactly; out_dir/log.jsonl
holds the loss of every iteration and every evaluation.
"""
import os
import sys
import json
import math
import time
import random
import signal
import platform
import resource
import subprocess
import dataclasses
from contextlib import nullcontext

import numpy as np
import torch
from tqdm import tqdm

from mipt import MIPTConfig, MIPT
from configurator import configure

# -----------------------------------------------------------------------------
# default config: a small MIPT char-LM on shakespeare_char, a few minutes on a 2-core CPU
# I/O
out_dir = 'out'
eval_interval = 200          # evaluate on val (and write ckpt_last.pt) every this many iterations
eval_iters = 20              # lm: val batches per evaluation, or the whole val split if it fits in
                             # fewer (classify/needle: always the whole val split)
eval_batch_size = 0          # 0 = batch_size
init_from = 'scratch'        # 'scratch' | 'resume' (from out_dir/ckpt_last.pt)
# data
task = 'lm'                  # 'lm' | 'classify' | 'needle'
dataset = 'shakespeare_char'
data_dir = ''                # '' = data/<dataset> next to this file
batch_size = 12              # micro-batch size per process
block_size = 64              # lm: window length; classify: truncation length; needle: uses needle_len
gradient_accumulation_steps = 1  # total over all DDP processes
max_epochs = 0               # classify/needle: > 0 sets max_iters to max_epochs passes over train
vocab_multiple = 1           # lm: pad the vocabulary up to a multiple of this (64: 100277 -> 100288)
# needle task (data/needle.py): train / test / val use seeds needle_seed, +1, +2 (as in data/needle.py)
n_train = 5000
n_val = 1000
n_test = 1000
needle_len = 512
needle_vocab = 300
needle_span = (0.0, 0.1)
needle_classes = 4
needle_seed = 0
# model: every MIPTConfig field is a key (vocab_size and n_classes come from the data); those not set
# here (bias, attn_impl, cache_tau, cache_chunk, scan_impl, p_init, ...) default to MIPTConfig's values
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
mixer = 'mipt'               # 'mipt' | 'attention' (the Transformer twin; it needs cache_size 0 or default)
cache_size = 16              # K: 0 = no cache, -1 = unbounded
# optimizer: AdamW (weight_decay=0.0 is Adam)
learning_rate = 2e-3
max_iters = 1200
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0              # 0.0 = off
# learning-rate schedule: linear warmup, cosine decay to min_lr at lr_decay_iters
decay_lr = True
warmup_iters = 100
lr_decay_iters = 0           # 0 = max_iters
min_lr = 2e-4
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'
compile = False              # torch.compile the model
backend = 'nccl'             # DDP backend
seed = 1337
# the other MIPTConfig fields, with the dataclass defaults
for _f in dataclasses.fields(MIPTConfig):
    if _f.name not in ('vocab_size', 'n_classes') and _f.name not in globals():
        globals()[_f.name] = _f.default
# -----------------------------------------------------------------------------
config = configure(globals(), doc=__doc__)
# -----------------------------------------------------------------------------
CKPT_FORMAT = 'mipt-ckpt-1'
ROOT = os.path.dirname(os.path.abspath(__file__))


def die(msg, code=1):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


if task not in ('lm', 'classify', 'needle'):
    die(f"task must be 'lm', 'classify' or 'needle', got {task!r}", 2)
if init_from not in ('scratch', 'resume'):
    die(f"init_from must be 'scratch' or 'resume', got {init_from!r}", 2)
if dtype not in ('float32', 'bfloat16', 'float16'):
    die(f"dtype must be 'float32', 'bfloat16' or 'float16', got {dtype!r}", 2)

# DDP (torchrun sets RANK): rank 0 writes; gradient accumulation is split across processes
ddp = int(os.environ.get('RANK', -1)) != -1
if ddp:
    from torch.distributed import init_process_group, destroy_process_group, all_reduce
    init_process_group(backend=backend)
    rank, local_rank, world = int(os.environ['RANK']), int(os.environ['LOCAL_RANK']), int(os.environ['WORLD_SIZE'])
    if device != 'cpu':  # device='cpu' with backend='gloo' runs DDP on CPU processes (tests)
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    if gradient_accumulation_steps % world:
        die(f"gradient_accumulation_steps={gradient_accumulation_steps} must be divisible by the {world} processes", 2)
    gradient_accumulation_steps //= world
else:
    rank, local_rank, world = 0, 0, 1
master = rank == 0
device_type = 'cuda' if 'cuda' in device else 'cpu'
if device_type == 'cuda' and not torch.cuda.is_available():
    die("device='cuda' but CUDA is not available: pass --device=cpu", 2)
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
ctx = nullcontext() if device_type == 'cpu' else torch.amp.autocast(device_type=device_type, dtype=ptdtype)
torch.manual_seed(seed)  # same init everywhere (DDP also broadcasts rank 0's weights)
random.seed(seed)
np.random.seed(seed)
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
eval_bs = eval_batch_size or batch_size
t_start = time.time()

# -----------------------------------------------------------------------------
# data
if task == 'needle':
    from data.needle import make_needle
    meta = {'name': 'needle', 'tokenizer': 'ids', 'vocab_size': needle_vocab, 'n_classes': needle_classes,
            'label_names': [f'class{i}' for i in range(needle_classes)], 'eot_token': None, 'pad_token': None}
    needle = {}
    for split, n, off in [('train', n_train, 0), ('val', n_val, 2), ('test', n_test, 1)]:
        try:
            x, y = make_needle(n, seq_len=needle_len, vocab_size=needle_vocab, needle_span=tuple(needle_span),
                               n_classes=needle_classes, seed=needle_seed + off)
        except ValueError as e:
            die(f"needle task: {e}", 2)
        needle[split] = (x, y)
else:
    default_dir = not data_dir
    data_dir = data_dir or os.path.join(ROOT, 'data', dataset)
    prepare = os.path.join('data', dataset, 'prepare.py')
    meta_path = os.path.join(data_dir, 'meta.json')
    if not os.path.exists(meta_path) and default_dir and dataset == 'shakespeare_char' and master:
        print(f"{meta_path} not found: running {prepare}")
        r = subprocess.run([sys.executable, os.path.join(ROOT, prepare)])
        if r.returncode != 0:
            die(f"{prepare} failed (exit {r.returncode})")
    if ddp:
        torch.distributed.barrier()
    if not os.path.exists(meta_path):
        die(f"dataset {dataset!r} not found ({meta_path} is missing): run `python {prepare}` first "
            f"(sources come from --src=DIR, $MIPT_DATA_MIRROR or a download)")
    with open(meta_path) as f:
        meta = json.load(f)
    if task == 'classify' and not meta.get('n_classes'):
        die(f"dataset {dataset!r} has no labels (meta n_classes={meta.get('n_classes')}); use --task=lm")


def split_path(split, suffix='.bin'):
    return os.path.join(data_dir, split + suffix)


def load_tokens(split):
    path = split_path(split)
    if not os.path.exists(path):
        die(f"{path} is missing: run `python {prepare}`")
    return np.memmap(path, dtype=np.dtype(meta['dtype']), mode='r')


def to_device(*ts):
    if device_type == 'cuda':
        return [t.pin_memory().to(device, non_blocking=True) if t is not None else None for t in ts]
    return [t.to(device) if t is not None else None for t in ts]


def lm_batch(split, gen, bs):
    """Random windows of block_size + 1 tokens (nanoGPT's get_batch), drawn with generator `gen`."""
    data = load_tokens(split)  # a fresh memmap per batch avoids a memory leak (nanoGPT)
    if len(data) <= block_size + 1:
        die(f"{split_path(split)} has {len(data)} tokens, fewer than block_size + 2 = {block_size + 2}")
    ix = torch.randint(len(data) - block_size - 1, (bs,), generator=gen).tolist()
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix])
    return to_device(x, y) + [None]


class Docs:
    """One split of a classification set: docs[i] = tokens[idx[i]:idx[i+1]], label labels[i]."""

    def __init__(self, split):
        for suffix in ('.bin', '.idx.npy', '.labels.npy'):
            if not os.path.exists(split_path(split, suffix)):
                die(f"{split_path(split, suffix)} is missing: run `python {prepare}`")
        self.tokens = load_tokens(split)
        self.idx = np.load(split_path(split, '.idx.npy'))
        self.labels = torch.from_numpy(np.load(split_path(split, '.labels.npy')).astype(np.int64))
        self.n = len(self.labels)
        self.pad = meta.get('pad_token')
        self.pad = 0 if self.pad is None else self.pad
        self.eot = meta.get('eot_token')

    def batch(self, ids):
        docs = []
        for i in ids:
            d = self.tokens[self.idx[i]:self.idx[i + 1]].astype(np.int64)
            if len(d) > block_size:
                if self.eot is not None and d[-1] == self.eot:
                    d = np.concatenate([d[:block_size - 1], d[-1:]])  # keep the EOT read-out token
                else:
                    d = d[:block_size]  # keep the beginning
            docs.append(d if len(d) else np.array([self.pad], dtype=np.int64))
        lengths = torch.tensor([len(d) for d in docs])
        T = min(block_size, -(-int(lengths.max()) // 64) * 64)  # few distinct shapes
        x = torch.full((len(docs), T), self.pad, dtype=torch.long)
        for j, d in enumerate(docs):
            x[j, :len(d)] = torch.from_numpy(d)
        return to_device(x, self.labels[list(ids)], lengths)


class Arrays:
    """A split held in memory as (x (n, T), y (n,)) tensors, e.g. the needle task."""

    def __init__(self, x, y):
        self.x, self.labels, self.n = x, y, len(y)

    def batch(self, ids):
        ids = torch.as_tensor(list(ids), dtype=torch.long)
        return to_device(self.x[ids], self.labels[ids]) + [None]


if task == 'lm':
    train_n = None
    vocab_size = -(-meta['vocab_size'] // vocab_multiple) * vocab_multiple
    n_classes = 0
else:
    if task == 'needle':
        splits = {s: Arrays(*needle[s]) for s in ('train', 'val', 'test')}
    else:
        splits = {s: Docs(s) for s in ('train', 'val', 'test') if s != 'test' or os.path.exists(split_path(s))}
    train_n = splits['train'].n
    vocab_size = meta['vocab_size']
    n_classes = meta['n_classes']
    if task == 'needle':
        block_size = needle_len
    micro_per_epoch = train_n // (batch_size * world)
    if micro_per_epoch == 0:
        die(f"batch_size * processes = {batch_size * world} exceeds the {train_n} training examples")
    if max_epochs > 0:
        max_iters = max(1, max_epochs * micro_per_epoch // gradient_accumulation_steps)

# training data samplers: their own generators, so that evaluation never moves them and resume is exact.
# LM windows differ per process (seed + rank); the epoch permutation is the same on every process.
data_gen = torch.Generator().manual_seed(seed + rank)
perm_gen = torch.Generator().manual_seed(seed)
sampler = {'epoch': 0, 'pos': 0, 'perm': None}  # classify/needle: shuffled epochs, drop_last


def next_train_batch():
    if task == 'lm':
        return lm_batch('train', data_gen, batch_size)
    B = batch_size * world
    if sampler['perm'] is None or sampler['pos'] + B > train_n:
        if sampler['perm'] is not None:
            sampler['epoch'] += 1
        sampler['perm'] = torch.randperm(train_n, generator=perm_gen)
        sampler['pos'] = 0
    lo = sampler['pos'] + rank * batch_size
    ids = sampler['perm'][lo:lo + batch_size].tolist()
    sampler['pos'] += B
    return splits['train'].batch(ids)


# -----------------------------------------------------------------------------
# model
model_args = {f.name: globals()[f.name] for f in dataclasses.fields(MIPTConfig) if f.name in globals()}
model_args.update(vocab_size=vocab_size, n_classes=n_classes, block_size=block_size)
iter_num, best_val, best_iter, ckpt = 0, None, None, None
last_path, best_path = os.path.join(out_dir, 'ckpt_last.pt'), os.path.join(out_dir, 'ckpt.pt')
if init_from == 'resume':
    if not os.path.exists(last_path):
        die(f"--init_from=resume: no checkpoint at {last_path}")
    try:
        ckpt = torch.load(last_path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same message
        die(f"cannot read {last_path}: {e}")
    if not isinstance(ckpt, dict) or ckpt.get('format') != CKPT_FORMAT:
        die(f"{last_path} is not a mipt checkpoint (format {CKPT_FORMAT!r})")
    changed = {k: (v, model_args.get(k)) for k, v in ckpt['model_args'].items() if model_args.get(k, v) != v}
    if changed and master:
        print(f"resume: the model config comes from the checkpoint; ignoring {changed}")
    model_args = ckpt['model_args']
try:
    model_config = MIPTConfig(**model_args)
except (TypeError, ValueError) as e:
    die(f"invalid model config: {e}", 2)
model = MIPT(model_config)
if ckpt is not None:
    model.load_state_dict(ckpt['model'])
    iter_num, best_val, best_iter = ckpt['iter_num'], ckpt['best_val'], ckpt.get('best_iter')
model.to(device)
raw_model = model
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
if ckpt is not None:
    optimizer.load_state_dict(ckpt['optimizer'])
    if 'scaler' in ckpt:
        scaler.load_state_dict(ckpt['scaler'])
if compile:
    model = torch.compile(model)
if ddp:
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)
params_total = raw_model.get_num_params(non_embedding=False)
params_non_emb = raw_model.get_num_params(non_embedding=True)


def rng_state():
    npst = np.random.get_state()
    return {'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state(device) if 'cuda' in device else None,
            'numpy': [npst[0], torch.from_numpy(npst[1].astype(np.int64)), int(npst[2]), int(npst[3]), float(npst[4])],
            'python': random.getstate(),
            'data': data_gen.get_state(), 'perm': perm_gen.get_state()}


def set_rng_state(st):
    torch.set_rng_state(st['torch'])
    if st['cuda'] is not None and 'cuda' in device:
        torch.cuda.set_rng_state(st['cuda'], device)
    n = st['numpy']
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    random.setstate(st['python'])
    data_gen.set_state(st['data'])
    perm_gen.set_state(st['perm'])


if ckpt is not None:
    rngs = ckpt['rng'] if isinstance(ckpt['rng'], list) else [ckpt['rng']]
    set_rng_state(rngs[rank % len(rngs)])
    if len(rngs) != world:  # exactness needs the same number of processes; keep the ranks' data apart
        data_gen.manual_seed(seed + rank + 7919 * iter_num)
        if master:
            print(f"resume: {len(rngs)} process(es) wrote the checkpoint, {world} resume it: "
                  f"the run continues, but not exactly as an uninterrupted one would")
    sampler.update(ckpt['sampler'])
    resumed_evaluated = ckpt.get('evaluated', True)  # False: saved on Ctrl-C, between evaluations
    del ckpt


def params_finite():
    return all(torch.isfinite(p).all() for p in raw_model.parameters())


def save_checkpoint(path, rngs, evaluated=True):
    if not params_finite():
        die("non-finite parameters: refusing to write a checkpoint")
    ckpt = {'format': CKPT_FORMAT, 'model': raw_model.state_dict(), 'model_args': dataclasses.asdict(model_config),
            'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict(),
            'iter_num': iter_num, 'best_val': best_val, 'best_iter': best_iter,
            'train_config': config, 'meta': meta, 'rng': rngs,
            'sampler': dict(sampler), 'evaluated': evaluated}
    tmp = path + '.tmp'
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def gather_rng():
    """RNG states of every process (rank 0 saves them all, so a DDP resume is exact too)."""
    st = rng_state()
    if not ddp:
        return st
    out = [None] * world
    torch.distributed.all_gather_object(out, st)
    return out


# -----------------------------------------------------------------------------
# evaluation (on raw_model: no DDP collectives; every process computes the same numbers)
higher_is_better = task != 'lm'


@torch.no_grad()
def evaluate(split, full=False):
    raw_model.eval()
    if task == 'lm':
        data = load_tokens(split)
        n = min(block_size, len(data) - 1)
        starts = list(range(0, len(data) - n, n))  # non-overlapping windows covering the split
        if full or len(starts) <= eval_iters * eval_bs:  # the whole split (test: always)
            tot, cnt = 0.0, 0
            for b in range(0, len(starts), eval_bs):
                ix = starts[b:b + eval_bs]
                x = torch.stack([torch.from_numpy(data[i:i + n].astype(np.int64)) for i in ix])
                y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + n].astype(np.int64)) for i in ix])
                x, y = to_device(x, y)
                with ctx:
                    _, loss = raw_model(x, y)
                tot += loss.item() * y.numel()
                cnt += y.numel()
            loss = tot / cnt
        else:  # eval_iters random windows, the same ones at every evaluation
            gen = torch.Generator().manual_seed(seed + 1)
            losses = []
            for _ in range(eval_iters):
                x, y, _ = lm_batch(split, gen, eval_bs)
                with ctx:
                    _, loss = raw_model(x, y)
                losses.append(loss.item())
            loss = sum(losses) / len(losses)
        out = {'loss': loss, 'ppl': math.exp(min(loss, 50.0))}
    else:
        data = splits[split]
        correct, tot_loss = 0, 0.0
        for b in range(0, data.n, eval_bs):
            ids = list(range(b, min(b + eval_bs, data.n)))
            x, y, lengths = data.batch(ids)
            with ctx:
                logits, loss = raw_model(x, y, lengths=lengths)
            correct += (logits.argmax(-1) == y).sum().item()
            tot_loss += loss.item() * len(ids)
        out = {'acc': correct / data.n, 'loss': tot_loss / data.n}
    raw_model.train()
    return out


def metric(res):
    return res['acc'] if higher_is_better else res['loss']


def get_lr(it):
    if not decay_lr:
        return learning_rate
    decay_iters = lr_decay_iters or max_iters
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


# -----------------------------------------------------------------------------
# training loop
if master:
    os.makedirs(out_dir, exist_ok=True)
    log_path = os.path.join(out_dir, 'log.jsonl')
    if init_from == 'resume' and os.path.exists(log_path):  # drop what came after the checkpoint
        with open(log_path) as f:
            entries = [json.loads(ln) for ln in f if ln.strip()]
        with open(log_path, 'w') as f:
            for e in entries:
                if e['iter'] < iter_num or ('eval' in e and e['iter'] == iter_num):
                    f.write(json.dumps(e) + '\n')
    log_file = open(log_path, 'a' if init_from == 'resume' else 'w', buffering=1)


def log(**entry):
    if master:
        log_file.write(json.dumps(entry) + '\n')


stop_requested = False


def on_signal(signum, frame):
    global stop_requested
    if stop_requested:
        raise KeyboardInterrupt
    stop_requested = True
    if master:
        tqdm.write("\ninterrupted: finishing this iteration, then saving ckpt_last.pt (again to abort)")


signal.signal(signal.SIGINT, on_signal)
signal.signal(signal.SIGTERM, on_signal)

if master:
    print(f"task {task} | dataset {meta['name']} | {model_config.mixer} | "
          f"{params_total / 1e6:.2f}M params ({params_non_emb / 1e6:.3f}M non-embedding) | "
          f"{max_iters} iters x {batch_size * gradient_accumulation_steps * world} seqs | {device} {dtype}")
resumed_at = iter_num if init_from == 'resume' and resumed_evaluated else None
train_time, train_tokens, last_loss = 0.0, 0, None
pbar = tqdm(total=max_iters, initial=iter_num, disable=not master, dynamic_ncols=True, desc='train',
            mininterval=0.5 if sys.stderr.isatty() else 30)  # a log file gets a line every 30 s
tok_rate = None
while True:
    # evaluate, keep the best checkpoint, write ckpt_last.pt (skipped right after a resume: done already)
    if (iter_num % eval_interval == 0 or iter_num >= max_iters) and iter_num != resumed_at:
        res = evaluate('val')
        if not math.isfinite(res['loss']):
            die(f"non-finite val loss {res['loss']} at iter {iter_num}: stopping, no checkpoint written")
        improved = best_val is None or (metric(res) > best_val if higher_is_better else metric(res) < best_val)
        if improved:
            best_val, best_iter = metric(res), iter_num
        rngs = gather_rng()
        if master:
            tqdm.write(f"iter {iter_num}: val " + ' '.join(f"{k} {v:.4f}" for k, v in res.items()) +
                       (' (best)' if improved else ''))
            log(iter=iter_num, eval=res)
            if improved:
                save_checkpoint(best_path, rngs)
            save_checkpoint(last_path, rngs)
    if iter_num >= max_iters:
        break
    # one optimisation step
    t0 = time.time()
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group['lr'] = lr
    loss_sum = torch.zeros((), device=device)
    n_tok = 0
    for micro in range(gradient_accumulation_steps):
        x, y, lengths = next_train_batch()
        sync = ddp and micro == gradient_accumulation_steps - 1
        with (model.no_sync() if ddp and not sync else nullcontext()):
            with ctx:
                _, loss = model(x, y, lengths=lengths)
                loss = loss / gradient_accumulation_steps
            scaler.scale(loss).backward()
        loss_sum += loss.detach()
        n_tok += x.numel()
    if grad_clip > 0.0:
        scaler.unscale_(optimizer)
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    else:
        gnorm = torch.zeros((), device=device)
    flags = torch.stack([loss_sum, gnorm.float().to(loss_sum.device), torch.tensor(float(stop_requested), device=device)])
    if ddp:  # every process sees the same loss, norm and stop request
        all_reduce(flags)
        flags[:2] /= world
    lossf, gnormf, stop_any = flags.tolist()
    if not (math.isfinite(lossf) and (math.isfinite(gnormf) or scaler.is_enabled())):
        pbar.close()
        die(f"non-finite {'loss' if not math.isfinite(lossf) else 'gradient norm'} at iter {iter_num} "
            f"(loss {lossf}{f', grad norm {gnormf}' if grad_clip > 0 else ''}, lr {lr:.3g}): stopping; no "
            f"checkpoint was written from this state (the last good ones are in {out_dir}). "
            f"Try a lower learning_rate or grad_clip.")
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if device_type == 'cuda':
        torch.cuda.synchronize()
    dt = time.time() - t0
    train_time += dt
    train_tokens += n_tok * world
    rate = n_tok * world / max(dt, 1e-9)
    tok_rate = rate if tok_rate is None else 0.9 * tok_rate + 0.1 * rate
    log(iter=iter_num, loss=lossf, lr=lr, dt=dt)
    last_loss = lossf
    iter_num += 1
    pbar.update(1)
    pbar.set_postfix(loss=f"{lossf:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_rate:,.0f}", refresh=False)
    if stop_any and not stop_requested:
        stop_requested = True
    if stop_requested:
        rngs = gather_rng()
        if master:
            save_checkpoint(last_path, rngs, evaluated=False)
            pbar.close()
            print(f"stopped at iter {iter_num}: saved {last_path}; continue with "
                  f"`python train.py ... --init_from=resume --out_dir={out_dir}`")
        if ddp:
            destroy_process_group()
        sys.exit(0)
pbar.close()

# -----------------------------------------------------------------------------
# the end: the best checkpoint, evaluated once on test; metrics.json
if master:
    best = torch.load(best_path, map_location='cpu', weights_only=True)
    raw_model.load_state_dict(best['model'])
    has_test = 'test' in splits if task != 'lm' else os.path.exists(split_path('test'))
    test = evaluate('test', full=True) if has_test else None
    if not has_test:
        print("no test split: test metric skipped")
    probe = None
    if raw_model.config.mixer == 'mipt':
        if task == 'lm':
            x, _, lengths = lm_batch('val', torch.Generator().manual_seed(seed + 1), eval_bs)
        else:
            x, _, lengths = splits['val'].batch(list(range(min(eval_bs, splits['val'].n))))
        raw_model.eval()
        with torch.no_grad(), ctx:
            st = raw_model.probe(x, lengths=lengths)
        probe = {'p_mean': [float(v) for v in st['p_mean']], 'cache_fill': [float(v) for v in st['cache_fill']]}
    if device_type == 'cuda':
        peak = torch.cuda.max_memory_allocated(device)
        device_name = torch.cuda.get_device_name(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        device_name = f"cpu: {platform.processor() or platform.machine()} x{os.cpu_count()} " \
                      f"({torch.get_num_threads()} threads)"
    try:
        commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    metric_name = 'acc' if higher_is_better else 'loss'
    metrics = {
        'task': task, 'dataset': meta['name'], 'mixer': raw_model.config.mixer,
        'train_config': config, 'model_config': dataclasses.asdict(raw_model.config),
        'params': params_total, 'params_non_embedding': params_non_emb,
        'best_val': {metric_name: best_val, 'iter': best_iter},
        'test': test, 'iters': iter_num, 'final_train_loss': last_loss,
        'tokens_per_sec': train_tokens / train_time if train_time else None,
        'peak_memory_bytes': peak, 'wall_time_s': time.time() - t_start,
        'device': device_name, 'world_size': world, 'git_commit': commit, 'probe': probe,
        'checkpoint': best_path,
    }
    with open(os.path.join(out_dir, 'metrics.json'), 'w') as f:
        json.dump(metrics, f, indent=2)
    if task == 'lm':
        print(f"best val loss {best_val:.4f} (ppl {math.exp(min(best_val, 50)):.2f}) at iter {best_iter}")
        if test:
            print(f"test loss {test['loss']:.4f} (ppl {test['ppl']:.2f})")
    else:
        print(f"best val acc {best_val:.4f} at iter {best_iter}")
        if test:
            print(f"test acc {test['acc']:.4f}")
    if probe:
        print("mean p per layer: " + ' '.join(f"{v:.3f}" for v in probe['p_mean']) +
              " | cache fill: " + ' '.join(f"{v:.1f}" for v in probe['cache_fill']))
    print(f"{metrics['tokens_per_sec'] or 0:,.0f} tokens/s | peak memory {peak / 2**20:.0f} MiB | "
          f"{metrics['wall_time_s']:.0f} s")
    print(f"checkpoint: {best_path}")
    print(f"metrics: {os.path.join(out_dir, 'metrics.json')}")
if ddp:
    destroy_process_group()
