"""
Train a MIPT-SSM model (or its Transformer twin, --mixer=attention). After nanoGPT's train.py.

    python train.py                                   # small MIPT char-LM on shakespeare_char (CPU: minutes)
    python train.py config/train_shakespeare_char.py  # a config file, then --key=value overrides
    python train.py config/needle.py --mixer=attention
    python train.py --init_from=resume --out_dir=out  # continue exactly from out/ckpt_last.pt
    torchrun --standalone --nproc_per_node=4 train.py config/lm_wikitext103.py --gradient_accumulation_steps=4   # DDP
    python train.py --help                            # every key and its default

Tasks, on data/<dataset> made by its prepare.py and checked against its meta.json first: 'lm' (random
windows of train.bin; loss/ppl), 'classify' (one document per row, right padded, read out at its last token;
accuracy; e.g. data/needle), 'seq' (fixed-length rows with a target per position, -1 = none, e.g. data/mqar;
accuracy over the targets). Model selection uses val; the best checkpoint (out_dir/ckpt.pt) is evaluated on
test once at the end, and everything lands in out_dir/metrics.json. out_dir/ckpt_last.pt (written at every
eval and on Ctrl-C/SIGTERM) resumes a run exactly; out_dir/log.jsonl holds every iteration and evaluation.
One run at a time per out_dir (out_dir/.lock names the holder).

Settings: the defaults below, then config files (Python, executed as they are read: run only files you
trust), then --key=value flags, which win over everything a file sets (a --max_iters flag over a file's
max_epochs too). Resume takes the model from the checkpoint (the model's fields, block_size included, for
the batches as well; the flags that differ are named and ignored) and the training settings from this run;
metrics.json lists every resume and what it changed. The data files are opened once: a prepare that
rewrites the dataset during a run changes nothing the run reads.

Exit status: 0 done, or stopped by Ctrl-C/SIGTERM with ckpt_last.pt saved; 2 a configuration error (a bad
key or value, a model config MIPTConfig rejects, task vs data, an out_dir holding another run); 1 anything
else (data missing or corrupt, out_dir locked or not writable, a bad checkpoint, a non-finite loss, an
interrupted test evaluation). Errors are one line, `error: ...` (--debug=True: the traceback). On a CPU,
--dtype is float32 whatever it is set to (autocast runs on GPUs only): the run says so and records float32.
"""
import os
import sys
import json
import math
import time
import random
import signal
import dataclasses
from contextlib import nullcontext

import numpy as np
import torch
from tqdm import tqdm

import checkpoint
import loader
import runs
from checkpoint import die
from configurator import configure
from mipt import MIPTConfig

# -----------------------------------------------------------------------------
# default config: a small MIPT char-LM on shakespeare_char, a few minutes on a 2-core CPU
# I/O
out_dir = 'out'
eval_interval = 200          # evaluate on val (and write ckpt_last.pt) every this many iterations
eval_iters = 20              # lm: val batches per evaluation, or the whole val split if it fits in fewer
                             # (classify/seq: always the whole val split)
eval_batch_size = 0          # rows per eval batch; 0 = about 65k tokens (fewer with a big vocabulary), >= batch_size
init_from = 'scratch'        # 'scratch' | 'resume' (from out_dir/ckpt_last.pt)
overwrite = False            # scratch into an out_dir that holds a checkpoint: replace that run
debug = False                # re-raise errors with their traceback instead of a one-line message
# data
task = 'lm'                  # 'lm' | 'classify' | 'seq'
dataset = 'shakespeare_char'
data_dir = ''                # '' = data/<dataset> next to this file
batch_size = 12              # micro-batch size per process
block_size = 64              # lm: window length; classify: truncation length; seq: the data's seq_len
cache_explore = 16           # R, a MIPTConfig field: at most block_size // 4 (R >= block_size trains densely)
gradient_accumulation_steps = 1  # total over all DDP processes
max_epochs = 0               # classify/seq: > 0 sets max_iters to max_epochs passes over train
stop_at = 0.0                # classify/seq: end training (then test) once val accuracy reaches this; 0 = off
max_minutes = 0.0            # > 0: training ends (eval, best checkpoint, test) after this many minutes of this process
vocab_multiple = 1           # lm/seq: pad the vocabulary up to a multiple of this (64: 100277 -> 100288)
# model: every MIPTConfig field is a key, with MIPTConfig's default (vocab_size and n_classes come from
# the data; block_size and cache_explore are set above); mixer='attention' is the Transformer twin
peer = ''                    # '' | 'gla' | 'gated_deltanet' | 'mamba2' | 'hgrn': an fla layer as every block's mixer
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
origins = {}  # key -> the config file or flag that set it
config = configure(globals(), doc=__doc__, origins=origins)
# -----------------------------------------------------------------------------
checkpoint.DEBUG = debug
ROOT = os.path.dirname(os.path.abspath(__file__))
_bad = runs.check_settings(config, origins)
if _bad:
    die('; '.join(_bad), 2)
_notes = runs.settle(config, origins)
max_epochs, cache_size = config['max_epochs'], config['cache_size']

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
for _n in _notes if master else ():
    print(_n)
device_type = 'cuda' if 'cuda' in device else 'cpu'
if device_type == 'cuda' and not torch.cuda.is_available():
    die("device='cuda' but CUDA is not available: pass --device=cpu", 2)
if device_type == 'cpu' and dtype != 'float32':
    if master:
        print(f"note: dtype={dtype} does not apply on a CPU: running (and recording) float32")
    dtype = config['dtype'] = 'float32'
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
ctx = nullcontext() if dtype == 'float32' else torch.amp.autocast(device_type=device_type, dtype=ptdtype)
torch.manual_seed(seed)  # same init everywhere (DDP also broadcasts rank 0's weights)
random.seed(seed)
np.random.seed(seed)
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
t_start = time.time()

# -----------------------------------------------------------------------------
# data: checked against its meta.json before anything is written
default_dir = not data_dir
data_dir = data_dir or os.path.join(ROOT, 'data', dataset)
if master:
    loader.ensure_prepared(data_dir, dataset, ROOT, default_dir)
if ddp:
    torch.distributed.barrier()
meta = loader.open_dataset(data_dir, task, verify_hashes=master)  # sizes everywhere, sha256 once
if task == 'seq':
    config['block_size'] = meta['seq_len']

# -----------------------------------------------------------------------------
# the model's settings: this run's, or on resume the checkpoint's (how it computes stays this run's), for the
# model and for everything that reads them (the data's block_size, train_config)
P = runs.paths(out_dir)
ck = runs.load_resume(out_dir) if init_from == 'resume' else None
resumes = []  # every resume: its iteration and the settings that changed there (metrics.json)
if ck is not None:
    runs.check_resume(ck, P['last'], task, meta, data_dir)
    ignored, resumes = runs.take_model_settings(ck, config, origins)
    if ignored and master:
        print("resume: the model comes from the checkpoint: ignoring " +
              ', '.join(f"{k}={now!r} (it has {was!r})" for k, (now, was) in ignored.items()))
    if resumes[-1]['changed'] and master:
        print(f"resume at iter {ck['iter_num']} with other settings (recorded in metrics.json): " +
              ', '.join(f"{k} {a!r} -> {b!r}" for k, (a, b) in resumes[-1]['changed'].items()))
block_size, peer = config['block_size'], config['peer']
data = loader.load_task(data_dir, meta, task, block_size, device)
if task != 'lm':
    micro_per_epoch = data.check_batch(batch_size, world, data_dir)
    if max_epochs > 0:
        max_iters = max(1, max_epochs * micro_per_epoch // gradient_accumulation_steps)
    n_cut = data.n_cut(block_size)
    if n_cut and master:
        print(f"note: {n_cut} of {data.n_train} training documents are longer than block_size={block_size} and cut")
if decay_lr and warmup_iters > max_iters > 0 and master:
    print(f"warning: warmup_iters={warmup_iters} > max_iters={max_iters}: the run ends during the warmup, below "
          f"learning_rate={learning_rate}")
model_args = {f.name: config[f.name] for f in dataclasses.fields(MIPTConfig) if f.name in config}
V = meta['vocab_size']
model_args.update(vocab_size=V if task == 'classify' else -(-V // config['vocab_multiple']) * config['vocab_multiple'],
                  n_classes=meta['n_classes'] if task == 'classify' else 0)
if ck is not None:
    model_args = dict(ck['model_args'], **{k: model_args[k] for k in MIPTConfig.HOW})
try:
    model_config = MIPTConfig(**model_args)
except (TypeError, ValueError) as e:
    die(f"invalid model config: {e}", 2)
# evaluation batches: <= 65536 tokens and 2^28 logits, <= 1024 rows (a row shorter than 64 costs about as much)
logits_per_token = 1 if task == 'classify' else model_config.vocab_size
eval_bs = eval_batch_size or max(batch_size, min(65536, 2**28 // logits_per_token) // max(block_size, 64))
if master and not peer and (warning := runs.usage_warning(model_config)):
    print(f"warning: {warning}")
runs.check_device(model_config, peer, device)  # the kernels it forces, the peer it asks for

# -----------------------------------------------------------------------------
# the model (the checkpoint's weights on resume), out_dir and its lock, the optimizer and the state an exact
# resume needs
model = raw_model = checkpoint.build_model({'model_args': model_args, 'peer': peer, 'model': ck and ck['model']},
                                           device, P['last'], how={k: model_args[k] for k in MIPTConfig.HOW})
if master:  # out_dir: locked before anything is written into it
    lock_file = runs.lock(out_dir)
    if init_from == 'scratch':
        runs.clear_for_scratch(out_dir, overwrite)
if ck is not None and (ck['iter_num'] >= max_iters or ck.get('reached')) and runs.finished(P['metrics']):
    if master:
        print(f"run already finished at iter {ck['iter_num']}; metrics in {P['metrics']} "
              f"(to train on, resume with a larger --max_iters)")
    sys.exit(0)
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))
optimizer = runs.optimizer(model, weight_decay, learning_rate, (beta1, beta2), device_type)
if compile:
    model = torch.compile(model)
if ddp:
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)
params_total = runs.num_params(raw_model, non_embedding=False)
params_non_emb = runs.num_params(raw_model, non_embedding=True)
order = loader.TrainOrder(seed, rank, world)  # the training order: generators of its own, saved with the run
iter_num, best_val, best_iter = 0, None, None
reached = False  # stop_at: val reached it (saved in checkpoints: such a run is finished)
stats = {'train_time': 0.0, 'train_tokens': 0, 'last_loss': None}  # for metrics.json, across resumes
resumed_at = None  # the iteration whose evaluation the resumed checkpoint already holds
if ck is not None:
    iter_num, best_val, best_iter = ck['iter_num'], ck['best_val'], ck.get('best_iter')
    optimizer.load_state_dict(ck['optimizer'])
    scaler.load_state_dict(ck['scaler'])
    stats.update(ck.get('stats', {}))
    writers = runs.set_rng_state(ck, device, order, seed, iter_num)
    if writers != world and master:
        print(f"resume: {writers} process(es) wrote the checkpoint, {world} resume it: "
              f"the run continues, but not exactly as an uninterrupted one would")
    if master:
        dropped = runs.trim_log(P['log'], iter_num)  # keep what came before the checkpoint
        if dropped:
            print(f"warning: {P['log']}: dropped {dropped} line(s) that do not parse")
    resumed_at = iter_num if ck.get('evaluated', True) else None  # False: saved on Ctrl-C, between evaluations
    del ck


def save(paths, evaluated=True):
    """Write the training state to each of `paths` (rank 0; every process must call it under DDP)."""
    state = runs.rng_state(device, order, ddp, world)
    if not master:
        return
    if not all(torch.isfinite(p).all() for p in raw_model.parameters()):
        die("non-finite parameters: refusing to write a checkpoint")
    ck = {'format': checkpoint.CKPT_FORMAT, 'model': raw_model.state_dict(),
          'model_args': dataclasses.asdict(model_config), 'peer': peer, 'optimizer': optimizer.state_dict(),
          'scaler': scaler.state_dict(), 'iter_num': iter_num, 'best_val': best_val, 'best_iter': best_iter,
          'train_config': config, 'meta': meta, 'evaluated': evaluated, 'stats': dict(stats), 'reached': reached,
          'resumes': resumes, **state}
    for p in paths:
        checkpoint.save(p, ck)


# -----------------------------------------------------------------------------
# evaluation (on raw_model: no DDP collectives; every process computes the same numbers). A SIGINT/SIGTERM
# stops it between batches (Interrupted).
class Interrupted(Exception):
    pass


@torch.no_grad()
def evaluate(split, full=False):
    """lm: {'loss', 'ppl'} per token; classify: {'acc', 'loss'} per document; seq: {'acc', 'loss'} per target."""
    n, batches = data.eval_batches(split, eval_bs, eval_iters, seed, full)
    tot_loss, correct, count = 0.0, 0, 0
    tty = sys.stderr.isatty()
    bar = tqdm(total=n, desc=split, leave=split == 'test', dynamic_ncols=True, mininterval=0.5 if tty else 30,
               disable=not master or (split != 'test' and not tty))
    raw_model.eval()
    try:
        for k, (x, y, lengths) in enumerate(batches):
            if stop_requested:
                raise Interrupted(f"{k}/{n} batches")
            with ctx:
                logits, loss = raw_model(x, y, lengths=lengths)
            w = int((y >= 0).sum())  # lm: every token; classify: every row; seq: the positions with a target
            tot_loss, count = tot_loss + (loss.item() * w if w else 0.0), count + w
            if task != 'lm':
                correct += int(((logits.argmax(-1) == y) & (y >= 0)).sum())
            bar.update()
    finally:
        bar.close()
        raw_model.train()
    if task == 'lm':
        return {'loss': tot_loss / count, 'ppl': math.exp(min(tot_loss / count, 50.0))}
    return {'acc': correct / count, 'loss': tot_loss / count}


def any_process(flag):
    t = torch.tensor(float(flag), device=device)
    if ddp:
        all_reduce(t)
    return t.item() > 0


stop_requested = False


def on_signal(signum, frame):
    global stop_requested
    if stop_requested:
        raise KeyboardInterrupt
    stop_requested = True
    if master:
        tqdm.write("\ninterrupted: finishing this step, then saving ckpt_last.pt (again to abort)")


def stop(where):
    save([P['last']], evaluated=False)
    if master:
        print(f"stopped {where}: saved {P['last']}; continue with "
              f"`python train.py ... --init_from=resume --out_dir={out_dir}`")
    if ddp:
        destroy_process_group()
    sys.exit(0)


# -----------------------------------------------------------------------------
# training loop
signal.signal(signal.SIGINT, on_signal)
signal.signal(signal.SIGTERM, on_signal)
log_file = open(P['log'], 'a' if init_from == 'resume' else 'w', buffering=1) if master else None
higher_is_better = task != 'lm'
metric_name = 'acc' if higher_is_better else 'loss'
if master:
    print(f"task {task} | dataset {meta['name']} | {model_config.mixer}{f' (peer {peer})' if peer else ''} | "
          f"{params_total / 1e6:.2f}M params ({params_non_emb / 1e6:.3f}M non-embedding) | "
          f"{max_iters} iters x {batch_size * gradient_accumulation_steps * world} seqs | {device} {dtype}", flush=True)
pbar = tqdm(total=max_iters, initial=iter_num, disable=not master, dynamic_ncols=True, desc='train',
            mininterval=0.5 if sys.stderr.isatty() else 30)  # a log file gets a line every 30 s
tok_rate, out_of_time = None, False
while True:
    if max_minutes:
        out_of_time = any_process(time.time() - t_start >= 60 * max_minutes)
    # evaluate, keep the best checkpoint, write ckpt_last.pt (skipped right after a resume: done already)
    if (iter_num % eval_interval == 0 or iter_num >= max_iters or out_of_time) and iter_num != resumed_at:
        try:
            res = evaluate('val')
        except Interrupted:
            res = None
        if any_process(res is None):
            pbar.close()
            stop(f"during the evaluation at iter {iter_num}")
        if not math.isfinite(res['loss']):
            die(f"non-finite val loss {res['loss']} at iter {iter_num}: stopping, no checkpoint written")
        val = res[metric_name]
        reached = any_process(bool(stop_at) and higher_is_better and val >= stop_at)  # every process stops alike
        improved = best_val is None or (val > best_val if higher_is_better else val < best_val)
        if improved:
            best_val, best_iter = val, iter_num
        if master:
            tqdm.write(f"iter {iter_num}: val " + ' '.join(f"{k} {v:.4f}" for k, v in res.items()) +
                       (' (best)' if improved else ''))
            log_file.write(json.dumps({'iter': iter_num, 'eval': res}) + '\n')
        save([P['best'], P['last']] if improved else [P['last']])
    if iter_num >= max_iters or reached or out_of_time:
        if reached and master:
            tqdm.write(f"val {metric_name} {val:.4f} >= stop_at {stop_at}: training ends at iter {iter_num}")
        if out_of_time and master:
            tqdm.write(f"max_minutes={max_minutes} reached: training ends at iter {iter_num} of {max_iters}")
        break
    # one optimisation step
    t0, loss_sum, n_tok = time.time(), torch.zeros((), device=device), 0
    lr = runs.lr_at(iter_num, learning_rate, min_lr, warmup_iters, lr_decay_iters or max_iters, decay_lr)
    for group in optimizer.param_groups:
        group['lr'] = lr
    before = None if ddp else runs.rng_state(device, order)  # to stop as between steps if a signal breaks this one
    try:
        for micro in range(gradient_accumulation_steps):
            x, y, lengths = data.train_batch(order, batch_size)
            with model.no_sync() if ddp and micro < gradient_accumulation_steps - 1 else nullcontext():  # sync last
                with ctx:
                    _, loss = model(x, y, lengths=lengths)
                    loss = loss / gradient_accumulation_steps
                scaler.scale(loss).backward()
            loss_sum, n_tok = loss_sum + loss.detach(), n_tok + x.numel()
    except Exception as e:  # e.g. torch.compile's compiler, killed by the same Ctrl-C / SIGTERM
        if not stop_requested or before is None:
            raise
        optimizer.zero_grad(set_to_none=True)
        runs.set_rng_state(before, device, order, seed, iter_num)
        pbar.close()
        stop(f"at iter {iter_num} (the signal broke that step: {type(e).__name__})")
    if grad_clip > 0.0:
        scaler.unscale_(optimizer)
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    else:
        gnorm = torch.zeros((), device=device)
    flags = torch.stack([loss_sum, gnorm.float().to(device), torch.tensor(float(stop_requested), device=device)])
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
    dt, n_tok = time.time() - t0, n_tok * world
    stats.update(train_time=stats['train_time'] + dt, train_tokens=stats['train_tokens'] + n_tok, last_loss=lossf)
    tok_rate = n_tok / max(dt, 1e-9) if tok_rate is None else 0.9 * tok_rate + 0.1 * n_tok / max(dt, 1e-9)
    if master:
        log_file.write(json.dumps({'iter': iter_num, 'loss': lossf, 'lr': lr, 'dt': dt}) + '\n')
    iter_num += 1
    pbar.update(1)
    pbar.set_postfix(loss=f"{lossf:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_rate:,.0f}", refresh=False)
    if stop_any:
        pbar.close()
        stop(f"at iter {iter_num}")
pbar.close()
if ddp:  # no collective follows: every process leaves together, then rank 0 alone tests and writes metrics
    torch.distributed.barrier()
    destroy_process_group()

# -----------------------------------------------------------------------------
# the end: the best checkpoint, evaluated once on test; metrics.json
if master:
    raw_model.load_state_dict(checkpoint.load(P['best'])['model'])
    test, note = None, None
    try:
        test = evaluate('test', full=True)
    except Interrupted as e:
        note = f"test evaluation interrupted at {e}"
    probe = None
    if raw_model.config.mixer == 'mipt' and not peer:
        x, _, lengths = data.probe_batch(batch_size, seed)
        raw_model.eval()
        with torch.no_grad(), ctx:
            st = runs.probe(raw_model, x, lengths=lengths)
        probe = {'p_mean': [float(v) for v in st['p_mean']], 'cache_fill': [float(v) for v in st['cache_fill']]}
    peak, device_name = runs.device_memory(device)
    metrics = {'task': task, 'dataset': meta['name'], 'mixer': raw_model.config.mixer, 'peer': peer or None,
               'train_config': config, 'model_config': dataclasses.asdict(raw_model.config),
               'params': params_total, 'params_non_embedding': params_non_emb,
               'best_val': {metric_name: best_val, 'iter': best_iter}, 'test': test, 'note': note, 'iters': iter_num,
               'stopped_at_target': reached, 'stopped_at_time_limit': out_of_time and not reached and iter_num < max_iters,
               'final_train_loss': stats['last_loss'], 'peak_memory_bytes': peak, 'wall_time_s': time.time() - t_start,
               'tokens_per_sec': stats['train_tokens'] / stats['train_time'] if stats['train_time'] else None,
               'device': device_name, 'world_size': world, 'git_commit': runs.git_commit(ROOT), 'probe': probe,
               'checkpoint': P['best'], 'resumes': resumes}
    runs.write_json(P['metrics'], metrics)
    ppl = (lambda v: f" (ppl {math.exp(min(v, 50.0)):.2f})") if task == 'lm' else (lambda v: '')
    print(f"best val {metric_name} {best_val:.4f}{ppl(best_val)} at iter {best_iter}")
    if test:
        print(f"test {metric_name} {test[metric_name]:.4f}{ppl(test['loss'])}")
    if probe:
        print("mean p per layer: " + ' '.join(f"{v:.3f}" for v in probe['p_mean']) +
              " | cache fill: " + ' '.join(f"{v:.1f}" for v in probe['cache_fill']))
    print(f"{metrics['tokens_per_sec'] or 0:,.0f} tokens/s | peak memory {peak / 2**20:.0f} MiB | "
          f"{metrics['wall_time_s']:.0f} s")
    print(f"checkpoint: {P['best']}")
    print(f"metrics: {P['metrics']}")
    if note:
        die(f"{note}: {P['metrics']} has test=null; `--init_from=resume --out_dir={out_dir}` evaluates test again")
