"""
The run management of train.py, as functions of their inputs: the settings' checks, out_dir (its lock, a new
run or a resumed one), the state an exact resume needs (every RNG), the learning-rate schedule, log.jsonl,
metrics.json; and what the scripts report about a model (usage_warning, num_params, probe). Every failure is one
line (checkpoint.die): exit 2 for a configuration error, 1 otherwise.
"""
import dataclasses
import json
import math
import os
import platform
import random
import resource
import socket
import subprocess
import time
import fcntl

import numpy as np
import torch

import checkpoint
from checkpoint import die
from mipt import MIPTConfig

DTYPES = ('float32', 'bfloat16', 'float16')


def check_settings(c, origins=None):
    """Every bad value of the settings dict c at once: a list of one-line messages (empty when all is well).
    origins: {key: where it was set} (configurator): a flag is refused where a config file's value is not."""
    flag = lambda k: (origins or {}).get(k, '').startswith('--')
    bad = [f"{k} must be >= {lo}, got {c[k]}" for k, lo in dict(
        max_iters=0, batch_size=1, eval_batch_size=0, eval_interval=1, eval_iters=1, vocab_multiple=1,
        warmup_iters=0, lr_decay_iters=0, max_epochs=0, gradient_accumulation_steps=1).items() if c[k] < lo]
    bad += [f"{k} must be {want}, got {c[k]}" for k, ok, want in [
        ('learning_rate', c['learning_rate'] > 0, '> 0'), ('min_lr', c['min_lr'] >= 0, '>= 0'),
        ('stop_at', 0 <= c['stop_at'] <= 1, 'in [0, 1]'), ('max_minutes', c['max_minutes'] >= 0, '>= 0'),
        ('stop_at', c['stop_at'] == 0 or c['task'] != 'lm', "0 for task 'lm' (it stops on accuracy)"),
        ('beta1', 0 <= c['beta1'] < 1, 'in [0, 1)'), ('beta2', 0 <= c['beta2'] < 1, 'in [0, 1)'),
        ('weight_decay', c['weight_decay'] >= 0, '>= 0'), ('grad_clip', c['grad_clip'] >= 0, '>= 0')]
        if not (ok and math.isfinite(c[k]))]
    bad += [f"{k} must be one of {', '.join(map(repr, choices))}, got {c[k]!r}" for k, choices in [
        ('task', ('lm', 'classify', 'seq')), ('init_from', ('scratch', 'resume')), ('dtype', DTYPES)]
        if c[k] not in choices]
    bad += [msg for ok, msg in [
        (0 <= c['seed'] < 2**32, f"seed must be in [0, 2**32), got {c['seed']}"),
        (c['out_dir'] != '', "out_dir must name a folder, got ''"),
        (not c['decay_lr'] or c['min_lr'] <= c['learning_rate'],
         f"min_lr={c['min_lr']} exceeds learning_rate={c['learning_rate']}: the schedule decays from learning_rate "
         f"down to min_lr (--decay_lr=False keeps learning_rate)"),
        (c['task'] != 'lm' or not (c['max_epochs'] and flag('max_epochs')),
         "max_epochs counts passes over the examples of task 'classify' or 'seq': task 'lm' runs max_iters"),
        (not (c['max_epochs'] and flag('max_epochs') and flag('max_iters')),
         "--max_iters and --max_epochs both set the length of the run: give one"),
        (c['task'] == 'seq' or c['block_size'] >= 2, f"block_size must be >= 2 (a window of one token has no "
         f"context to learn from), got {c['block_size']}"),
        (c['task'] == 'classify' or c['readout'] == 'last',
         f"readout={c['readout']!r} is a classifier's read-out: it needs task 'classify', not {c['task']!r}"),
        (c['mixer'] != 'attention' or c['cache_size'] == 0 or not flag('cache_size'),
         f"cache_size={c['cache_size']}: the attention mixer (the twin) has no sparse cache: drop --cache_size"),
    ] if not ok]
    return bad


def settle(c, origins=None):
    """The settings that follow from others, in place: a --max_iters flag wins over a config file's max_epochs
    (and max_epochs does not apply to task lm); the twin records cache_size 0. -> notes to print."""
    notes, origins = [], origins or {}
    if c['max_epochs'] and (c['task'] == 'lm' or origins.get('max_iters', '').startswith('--')):
        notes.append(f"note: max_epochs={c['max_epochs']} of {origins.get('max_epochs', 'the defaults')} does not "
                     f"apply: " + ("task 'lm' runs max_iters" if c['task'] == 'lm' else
                                   f"{origins['max_iters']} wins over it"))
        c['max_epochs'] = 0
    if c['mixer'] == 'attention':
        c['cache_size'] = 0
    return notes


def check_device(model_config, peer, device):
    """A forced kernel or a peer that this device cannot run: one line, exit 2 (1: fla not installed)."""
    cfg, on_cuda = model_config, 'cuda' in str(device)
    if cfg.scan_impl == 'cuda' and not on_cuda:
        die(f"scan_impl='cuda' needs a CUDA device, and this run is on {device}: use --scan_impl=auto or torch", 2)
    if cfg.cache_impl == 'triton' and cfg.mixer == 'mipt' and cfg.cache_size != 0:
        import kernels
        try:
            kernels.fused_cache(cfg.cache_impl, torch.device(device))
        except RuntimeError as e:
            die(f"{e}: use --cache_impl=auto or torch", 2)
    if peer:  # peers.py: flash-linear-attention layers (Triton, CUDA only) as every block's mixer
        import peers
        if peer not in peers.PEERS or cfg.mixer != 'mipt' or not on_cuda:
            die(f"--peer={peer}: " + (f"no such peer (one of {', '.join(peers.PEERS)})" if peer not in peers.PEERS else
                f"it replaces the MIPT mixer of every block, not --mixer={cfg.mixer}" if cfg.mixer != 'mipt' else
                "its kernels need a CUDA device"), 2)
        if not peers.available():
            die(f"--peer={peer} needs flash-linear-attention, which does not import here: {peers.INSTALL}")


def lr_at(it, learning_rate, min_lr, warmup_iters, decay_iters, decay=True):
    """Linear warmup over warmup_iters, then cosine decay to min_lr at decay_iters (constant without decay)."""
    if not decay:
        return learning_rate
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def optimizer(model, weight_decay, learning_rate, betas, device_type):
    """AdamW; tensors of 2 or more dimensions (weights, embeddings, null slots) decay, the rest do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
              {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=(device_type == 'cuda'))


# -----------------------------------------------------------------------------
# what the scripts tell about a model and its settings


def usage_warning(config):
    """A valid MIPTConfig that defeats its purpose, as one line, or None."""
    if config.mixer == 'mipt' and config.cache_size != 0 and config.cache_signal != 'dense' and (
            config.R is None or config.R >= config.block_size):
        how = '(all)' if config.R is None else f'>= block_size={config.block_size}'
        return (f"cache_explore={config.cache_explore} {how}: in training every query also attends to every earlier "
                f"position, so the exact cache that eval and decoding read is never trained alone; cache_explore "
                f"<= block_size // 4 keeps the selection signal (RESULTS.md, Recall)")
    return None


def num_params(model, non_embedding=True):
    """A MIPT's parameters; non_embedding leaves out the token (and position) embeddings, as the paper counts."""
    n = sum(p.numel() for p in model.parameters())
    if non_embedding:
        n -= model.wte.weight.numel() + (model.wpe.weight.numel() if model.wpe is not None else 0)
    return n


@torch.no_grad()
def probe(model, idx, lengths=None):
    """A MIPT's scores on idx (B, T), per layer: s (B, T), their mean, and the mean number of cached tokens at each
    row's last real position, min(K, #eligible so far) by the cache's rule."""
    was = model.training
    model.eval()
    _, scores, _ = model._body(idx)
    model.train(was)
    if scores[0] is None:
        return {'p_mean': [], 'cache_fill': [], 's': []}
    real = torch.arange(idx.shape[1], device=idx.device)[None] < model._lengths(idx, lengths)[:, None]  # (B, T)
    K, fill = model.config.K, [((s > model.config.cache_tau) & real).sum(1).float() for s in scores]  # (B,) each
    return {'p_mean': [(s * real).sum().item() / real.sum().item() for s in scores],
            'cache_fill': [(n if K is None else n.clamp(max=K)).mean().item() for n in fill], 's': scores}


# -----------------------------------------------------------------------------
# out_dir: ckpt.pt (the best), ckpt_last.pt (the latest, resumes exactly), log.jsonl, metrics.json, .lock

def paths(out_dir):
    return {k: os.path.join(out_dir, f) for k, f in (('best', 'ckpt.pt'), ('last', 'ckpt_last.pt'),
                                                      ('metrics', 'metrics.json'), ('log', 'log.jsonl'))}


def lock(out_dir):
    """Create out_dir and lock it (fcntl, until this process exits) before anything is written into it; the
    lock file names the holder. -> the open lock file (keep it)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        die(f"out_dir {out_dir} is a file, not a directory: pick another --out_dir", 2)
    try:
        os.makedirs(out_dir, exist_ok=True)
        f = open(os.path.join(out_dir, '.lock'), 'a+')
    except OSError as e:
        die(f"cannot write to out_dir {out_dir}: {e.strerror or e}")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        die(f"{out_dir} is in use by another run ({f.read().strip() or 'holder unknown'}): wait for it "
            f"to end, stop it, or pick another --out_dir")
    f.truncate(0)  # append mode: the write lands at 0
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f


def clear_for_scratch(out_dir, overwrite):
    """A new run into out_dir: refuse one that holds a checkpoint (unless overwrite), then remove the old
    checkpoints and metrics."""
    p = paths(out_dir)
    if (os.path.exists(p['best']) or os.path.exists(p['last'])) and not overwrite:
        die(f"{out_dir} holds a checkpoint of an earlier run: pass a new --out_dir, or --overwrite=True to "
            f"replace that run (--init_from=resume continues it)", 2)
    for k in ('best', 'last', 'metrics'):
        if os.path.exists(p[k]):
            os.remove(p[k])


def load_resume(out_dir):
    """out_dir/ckpt_last.pt, the checkpoint a run resumes from; when it is missing, one line that says what
    out_dir holds and what to do."""
    p = paths(out_dir)
    if not os.path.lexists(p['last']):
        held = sorted(f for f in os.listdir(out_dir) if not f.startswith('.')) if os.path.isdir(out_dir) else None
        what = f"{out_dir} does not exist" if held is None else f"{out_dir} holds {', '.join(held) or 'nothing'}"
        if os.path.exists(p['best']):
            die(f"no {p['last']} to resume from ({what}): ckpt.pt is the run's best checkpoint; copy it to "
                f"ckpt_last.pt to continue from its iteration, or start over with --init_from=scratch --overwrite=True")
        die(f"no {p['last']} to resume from ({what}): train a model first (python train.py --out_dir={out_dir})")
    return checkpoint.load(p['last'])


def check_resume(ck, path, task, meta, data_dir):
    """A resume on another task or other data is refused (exit 2)."""
    was = ck.get('meta') or {}
    if ck['train_config'].get('task') != task:
        die(f"cannot resume {path}: it was trained with --task={ck['train_config'].get('task')}, not {task}", 2)
    differ = [k for k in ('name', 'format', 'tokenizer', 'vocab_size', 'n_classes', 'seq_len', 'counts', 'files')
              if k in was and k in meta and was[k] != meta[k]]
    if differ:
        die(f"cannot resume {path}: it was trained on dataset {was.get('name')!r}, and "
            f"{data_dir} holds other data ({', '.join(differ)} differ): point --dataset/--data_dir at the run's "
            f"data, or use another --out_dir", 2)


MODEL_SETTINGS = ('peer', 'vocab_multiple')  # settings that shape the model beside MIPTConfig's fields
FRESH = ('init_from', 'overwrite', 'debug', 'out_dir')  # settings of a run's start, not of its training


def take_model_settings(ck, c, origins=None):
    """Resume: the model is the checkpoint's, so the settings dict c takes its MIPTConfig fields (but for the
    HOW fields: how this run computes), its peer and vocab_multiple, in place. -> (ignored: {key: (this run's
    value, the checkpoint's)} for those this run's flags or config files set otherwise; resumes: the
    checkpoint's list of resumes, plus this one: {'iter', 'changed': {key: [before, now]}} for every training
    setting this run changes)."""
    was = dict(ck.get('train_config') or {})
    fields = {f.name: f.default for f in dataclasses.fields(MIPTConfig)}  # a field newer than ck: its default
    model = {k: ck['model_args'].get(k, d) for k, d in fields.items() if k in c and k not in MIPTConfig.HOW}
    model.update({k: was[k] for k in MODEL_SETTINGS if k in was}, peer=ck.get('peer', ''))
    ignored = {k: (c[k], v) for k, v in model.items() if c.get(k) != v and k in (origins or {})}
    c.update(model)
    changed = {k: [was[k], v] for k, v in c.items() if k in was and k not in FRESH and was[k] != v}
    return ignored, list(ck.get('resumes', [])) + [{'iter': ck['iter_num'], 'changed': changed}]


def finished(metrics_path):
    """Whether metrics.json holds a finished run's results (an interrupted test evaluation is not finished)."""
    try:
        with open(metrics_path) as f:
            return 'interrupted' not in (json.load(f).get('note') or '')
    except (OSError, ValueError, AttributeError):
        return False


# -----------------------------------------------------------------------------
# the state an exact resume needs

def rng_state(device, order, ddp=False, world=1):
    """Every RNG of this process (torch, CUDA, numpy, random, the training order's generators) and the epoch
    sampler; under DDP every process's RNGs, gathered to each (a collective)."""
    npst = np.random.get_state()
    st = {'torch': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state(device) if 'cuda' in str(device) else None,
          'numpy': [npst[0], torch.from_numpy(npst[1].astype(np.int64)), int(npst[2]), int(npst[3]), float(npst[4])],
          'python': random.getstate(), 'data': order.data_gen.get_state(), 'perm': order.perm_gen.get_state()}
    if ddp:
        out = [None] * world
        torch.distributed.all_gather_object(out, st)
        st = out
    return {'rng': st, 'sampler': dict(order.sampler)}


def set_rng_state(ck, device, order, seed, iter_num):
    """Restore rng_state() from ck for this process. -> the number of processes that wrote ck: when it is not
    order.world, the run continues, but not exactly as an uninterrupted one would (each rank's data its own)."""
    rngs = ck['rng'] if isinstance(ck['rng'], list) else [ck['rng']]
    st = rngs[order.rank % len(rngs)]
    torch.set_rng_state(st['torch'])
    if st['cuda'] is not None and 'cuda' in str(device):
        torch.cuda.set_rng_state(st['cuda'], device)
    n = st['numpy']
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    random.setstate(st['python'])
    order.data_gen.set_state(st['data'])
    order.perm_gen.set_state(st['perm'])
    order.sampler.update(ck['sampler'])
    if len(rngs) != order.world:
        order.data_gen.manual_seed(seed + order.rank + 7919 * iter_num)
    return len(rngs)


def trim_log(log_path, iter_num):
    """Cut log.jsonl back to what came before the checkpoint at iter_num (its evaluation included). -> the
    number of lines dropped because they do not parse (a line cut short by a crash, or not ours)."""
    if not os.path.exists(log_path):
        return 0
    kept, bad = [], 0
    with open(log_path) as f:
        for line in filter(str.strip, f):
            try:
                e = json.loads(line)
                if e['iter'] < iter_num or ('eval' in e and e['iter'] == iter_num):
                    kept.append(json.dumps(e) + '\n')
            except (ValueError, TypeError, KeyError):
                bad += 1
    with open(log_path, 'w') as f:
        f.writelines(kept)
    return bad


# -----------------------------------------------------------------------------
# metrics.json

def write_json(path, obj):
    with open(path + '.tmp', 'w') as f:
        json.dump(obj, f, indent=2)
    os.replace(path + '.tmp', path)


def git_commit(root):
    """$MIPT_COMMIT (the commit of a copied tree whose git metadata is stale), else git's HEAD, else None."""
    try:
        return os.environ.get('MIPT_COMMIT') or subprocess.run(
            ['git', 'rev-parse', 'HEAD'], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def device_memory(device):
    """(peak memory in bytes, the device's name): CUDA's peak allocation, or the process's peak RSS."""
    if 'cuda' in str(device):
        return torch.cuda.max_memory_allocated(device), torch.cuda.get_device_name(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return peak, f"cpu: {platform.processor() or platform.machine()} x{os.cpu_count()} ({torch.get_num_threads()} threads)"
