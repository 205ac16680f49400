"""
End-to-end tests of train.py / sample.py / configurator.py / checkpoint.py on CPU, through subprocesses, with
tiny models on tiny datasets written here in the on-disk format of data/<name>/ (data.common.write_files:
meta.json with counts and file hashes + .bin [+ .idx.npy, .labels.npy | .targets.bin]) or made by
data/needle/prepare.py. Bad command lines are checked table-driven, several processes at a time.
"""
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ['--device=cpu', '--compile=False', '--n_layer=1', '--n_embd=32', '--n_head=2', '--batch_size=4',
        '--block_size=32', '--eval_iters=2', '--cache_size=4', '--cache_chunk=16', '--warmup_iters=2']
# the resume tests share these: lr_decay_iters fixes the schedule whatever max_iters is
LM = TINY + ['--task=lm', '--dropout=0.1', '--eval_interval=4', '--lr_decay_iters=12', '--learning_rate=3e-3']
TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n")


def run(script, *args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def ok(r):
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    return r


def train_losses(out_dir):
    with open(Path(out_dir) / 'log.jsonl') as f:
        entries = [json.loads(line) for line in f]
    losses = {e['iter']: e['loss'] for e in entries if 'loss' in e}
    assert sorted(losses) == list(range(len(losses))), 'log.jsonl must hold every iteration once'
    return [losses[i] for i in range(len(losses))]


def write_data(d, arrays, **meta):
    """A dataset as a prepare script writes it (data.common.write_files: meta.json last, with file hashes)."""
    from data.common import write_files
    counts = {s: {'tokens': int(arrays[f'{s}.bin'].size),
                  'docs': len(arrays[f'{s}.labels.npy']) if f'{s}.labels.npy' in arrays else 1}
              for s in ('train', 'val', 'test')}
    meta = dict(dict(eot_token=None, pad_token=None, n_classes=0, label_names=[], dtype='uint16'), counts=counts,
                **meta)
    write_files(str(d), arrays, meta)
    return d


def char_ids(text):
    chars = sorted(set(TEXT))
    return np.array([chars.index(c) for c in text], dtype=np.uint16), chars


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope='session')
def lm_dir(tmp_path_factory):
    ids, chars = char_ids(TEXT * 40)
    n = len(ids)
    return write_data(tmp_path_factory.mktemp('lm_data'), {'train.bin': ids[:int(0.8 * n)],
                      'val.bin': ids[int(0.8 * n):int(0.9 * n)], 'test.bin': ids[int(0.9 * n):]},
                      name='tiny_char', format='lm', tokenizer='char', vocab_size=len(chars), chars=chars)


@pytest.fixture(scope='session')
def cls_dir(tmp_path_factory):
    """Byte-level 2-class documents of 5..60 bytes: label 1 iff the text starts with 'good'."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in [('train', 64), ('val', 24), ('test', 24)]:
        docs, labels = [], []
        for _ in range(n):
            y = int(rng.integers(2))
            body = ''.join(rng.choice(list('abcdefgh '), size=int(rng.integers(1, 56))))
            docs.append(list((('good ' if y else 'bad ') + body).encode()))
            labels.append(y)
        arrays[f'{split}.bin'] = np.array([t for doc in docs for t in doc], dtype=np.uint16)
        arrays[f'{split}.idx.npy'] = np.cumsum([0] + [len(doc) for doc in docs]).astype(np.int64)
        arrays[f'{split}.labels.npy'] = np.array(labels, dtype=np.int64)
    return write_data(tmp_path_factory.mktemp('cls_data'), arrays, name='tiny_bytes', format='classify',
                      tokenizer='bytes', vocab_size=257, pad_token=256, n_classes=2, label_names=['bad', 'good'])


@pytest.fixture(scope='session')
def seq_dir(tmp_path_factory):
    """A tiny associative recall set in the 'seq' format: 4 key-value pairs, then the keys again as queries
    whose targets are their values (-1 elsewhere); 16 tokens per row."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in [('train', 64), ('val', 16), ('test', 16)]:
        x, y = np.zeros((n, 16), np.uint16), np.full((n, 16), -1, np.int16)
        for r in range(n):
            keys, vals = rng.choice(np.arange(1, 9), 4, replace=False), rng.choice(np.arange(9, 17), 4, replace=False)
            x[r, :8:2], x[r, 1:8:2] = keys, vals
            q = rng.permutation(4)
            x[r, 8::2], y[r, 8::2] = keys[q], vals[q]
        arrays[f'{split}.bin'], arrays[f'{split}.targets.bin'] = x.reshape(-1), y.reshape(-1)
    return write_data(tmp_path_factory.mktemp('seq_data'), arrays, name='tiny_mqar', format='seq', tokenizer='ids',
                      vocab_size=17, target_dtype='int16', seq_len=16)


@pytest.fixture(scope='session')
def lm_run(lm_dir, tmp_path_factory):
    """12 uninterrupted iterations: the reference for the resume tests, and a checkpoint to sample from."""
    out = tmp_path_factory.mktemp('lm_run')
    r = ok(run('train.py', *LM, f'--data_dir={lm_dir}', f'--out_dir={out}', '--max_iters=12'))
    return out, r


@pytest.fixture(scope='session')
def attn_run(lm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp('attn_run')
    ok(run('train.py', *TINY, f'--data_dir={lm_dir}', f'--out_dir={out}', '--max_iters=2', '--mixer=attention',
           '--cache_size=0', '--eval_interval=2'))
    return out


# ----------------------------------------------------------------------------- configurator
def test_help():
    r = ok(run('train.py', 'config/needle.py', '--help'))
    assert '--learning_rate' in r.stdout and '0.003' in r.stdout  # the config file's value is shown
    assert "--task" in r.stdout and "'classify'" in r.stdout and '--needle_len' not in r.stdout
    r = ok(run('sample.py', '--help'))
    assert '--max_new_tokens' in r.stdout


def test_bad_flag_stops_train():
    r = run('train.py', '--lerning_rate=1')
    assert r.returncode == 2 and r.stderr == ("error: unknown key 'lerning_rate' (from '--lerning_rate=1'): did you "
                                              "mean 'learning_rate'? (--help lists every key)\n"), r.stderr


DEFAULTS = dict(batch_size=12, learning_rate=1e-3, compile=False, dataset='x', top_k=None, span=(0.0, 0.1))


@pytest.mark.parametrize('args, msg', [
    (['--batch_size=abc'], 'batch_size expects an int'),
    (['--compile=maybe'], 'compile expects True or False'),
    (['--learning_rate=(1, 2)'], 'learning_rate expects a float'),
    (['--dataset=3'], None),  # a string key keeps '3' as a string
    (['--batch_size'], 'error: --batch_size needs a value: write --batch_size=<value>'),
    (['--batch_size', '8'], 'write --batch_size=8 (flags are --key=value'),
    (['no_such_file.py'], 'cannot read config file'),
    (['{syntax}'], 'line 2: syntax error'),
    (['{raises}'], 'line 3: ZeroDivisionError: division by zero'),
])
def test_configurator_errors(args, msg, capsys, tmp_path):
    sys.path.insert(0, str(ROOT))
    from configurator import configure
    (tmp_path / 'syntax.py').write_text('batch_size = 8\nlearning_rate = (\n')
    (tmp_path / 'raises.py').write_text('batch_size = 8\n\nlearning_rate = 1 / 0\n')
    args = [a.format(syntax=tmp_path / 'syntax.py', raises=tmp_path / 'raises.py') for a in args]
    g = dict(DEFAULTS)
    if msg is None:
        assert configure(g, argv=args)['dataset'] == '3'
        return
    with pytest.raises(SystemExit) as e:
        configure(g, argv=args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and msg in err and 'Traceback' not in err, err


def test_configurator_values(tmp_path):
    sys.path.insert(0, str(ROOT))
    from configurator import configure
    cfg = tmp_path / 'c.py'
    cfg.write_text('import math\nbatch_size = 64\nlearning_rate = 3e-4\n')
    g = dict(DEFAULTS)
    out = configure(g, argv=[str(cfg), '--compile=true', '--learning_rate=1', '--top_k=5', '--span=(0.5, 1)',
                             '--batch_size=1e3'])
    assert out == dict(batch_size=1000, learning_rate=1.0, compile=True, dataset='x', top_k=5, span=(0.5, 1))
    assert isinstance(out['learning_rate'], float) and g['batch_size'] == 1000
    # flags win over config files wherever they stand; among files the later one wins
    cfg2 = tmp_path / 'd.py'
    cfg2.write_text('batch_size = 32\n')
    out = configure(dict(DEFAULTS), argv=['--batch_size=8', str(cfg), str(cfg2)])
    assert out['batch_size'] == 8 and out['learning_rate'] == 3e-4
    assert configure(dict(DEFAULTS), argv=[str(cfg2), str(cfg)])['batch_size'] == 64


def test_bad_key_in_config_file(tmp_path):
    cfg = tmp_path / 'bad.py'
    cfg.write_text('import math\nbatch_size = 8\nlerning_rate = 1e-3\n')
    r = run('train.py', cfg)
    assert r.returncode == 2 and "unknown key 'lerning_rate'" in r.stderr, r.stderr


def test_missing_dataset(tmp_path):
    r = run('train.py', '--device=cpu', '--dataset=no_such_dataset', f'--out_dir={tmp_path}')
    assert r.returncode == 1 and 'python data/no_such_dataset/prepare.py' in r.stderr, r.stderr
    assert '--src' not in r.stderr and 'Traceback' not in r.stderr
    r = run('train.py', '--device=cpu', '--task=classify', f'--data_dir={tmp_path}', f'--out_dir={tmp_path}')
    assert r.returncode == 1 and 'meta.json: missing' in r.stderr, r.stderr
    assert not os.listdir(tmp_path)  # nothing written


# ----------------------------------------------------------------------------- checkpoint.py
def _die(fn, capsys, code=1):
    with pytest.raises(SystemExit) as e:
        fn()
    err = capsys.readouterr().err
    assert e.value.code == code and err.startswith('error: ') and err.count('\n') == 1, err
    return err


def test_checkpoint_load_errors(tmp_path, capsys):
    import argparse
    import checkpoint
    p = tmp_path / 'ck.pt'
    assert 'no checkpoint at' in _die(lambda: checkpoint.load(str(p)), capsys)
    p.write_bytes(b'')
    assert 'is empty (0 bytes): an interrupted write?' in _die(lambda: checkpoint.load(str(p)), capsys)
    checkpoint.save(str(p), {'format': checkpoint.CKPT_FORMAT, 'x': torch.ones(2)})
    assert checkpoint.load(str(p))['x'].tolist() == [1.0, 1.0] and not os.path.exists(f'{p}.tmp')
    good = p.read_bytes()
    for content, msg in [(b'\x80\x02garbage' * 50, 'is not a trusted mipt checkpoint ('),
                         (good[:len(good) // 2], 'is not a trusted mipt checkpoint (RuntimeError'),
                         ({'x': argparse.Namespace()}, 'Unsupported global: GLOBAL argparse.Namespace'),
                         (torch.randn(3), 'found a Tensor'),
                         ({'format': 'something-else'}, "found format 'something-else'")]:
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            torch.save(content, p)
        err = _die(lambda: checkpoint.load(str(p)), capsys)
        assert msg in err and str(p) in err, err
        assert 'weights_only' not in err and 'Re-running' not in err, err


def test_checkpoint_save_errors(tmp_path, monkeypatch, capsys):
    import checkpoint
    p = str(tmp_path / 'ck.pt')
    checkpoint.save(p, {'format': checkpoint.CKPT_FORMAT, 'v': 1})
    for exc, msg in [(RuntimeError('[enforce fail at inline_container.cc:664] . unexpected pos 96 vs 20'), 'disk full'),
                     (RuntimeError('PytorchStreamWriter failed writing file data/0: file write failed'), 'disk full'),
                     (OSError(errno.ENOSPC, 'No space left on device'), 'disk full'),
                     (OSError(errno.EACCES, 'Permission denied'), 'EACCES: Permission denied')]:
        def failing_save(obj, path, exc=exc):
            Path(path).write_bytes(b'partial')
            raise exc
        monkeypatch.setattr(torch, 'save', failing_save)
        err = _die(lambda: checkpoint.save(p, {'v': 2}), capsys)
        assert msg in err and p in err, err
        assert not os.path.exists(p + '.tmp')  # the partial write is gone; the old checkpoint is intact
        monkeypatch.undo()
        assert checkpoint.load(p)['v'] == 1


def test_checkpoint_build_model_and_debug(capsys, monkeypatch):
    import checkpoint
    args = dict(vocab_size=11, block_size=8, n_layer=1, n_embd=16, n_head=2, cache_size=2)
    m = checkpoint.build_model({'model_args': args})
    assert m.config.n_embd == 16
    assert 'its weights do not fit' in _die(lambda: checkpoint.build_model(
        {'model_args': args, 'model': {'bogus': torch.zeros(1)}}), capsys)
    assert 'model config does not fit' in _die(lambda: checkpoint.build_model(
        {'model_args': dict(args, n_head=3)}), capsys)
    monkeypatch.setattr(checkpoint, 'DEBUG', True)  # --debug=True: the original exception, traceback and all
    with pytest.raises(ValueError):
        checkpoint.build_model({'model_args': dict(args, n_head=3)})


# ----------------------------------------------------------------------------- bad command lines
def _data_copy(src, dst, edit):
    shutil.copytree(src, dst)
    edit(Path(dst))
    return dst


def _append(path, data):
    with open(path, 'ab') as f:
        f.write(data)


# every key's range, checked at once (the one-line message lists every bad value)
BAD_VALUES = [
    ('--gradient_accumulation_steps=0', 'gradient_accumulation_steps must be >= 1, got 0'),
    ('--max_iters=-1', 'max_iters must be >= 0'), ('--batch_size=0', 'batch_size must be >= 1'),
    ('--eval_batch_size=-1', 'eval_batch_size must be >= 0'), ('--eval_interval=0', 'eval_interval must be >= 1'),
    ('--eval_iters=0', 'eval_iters must be >= 1'), ('--vocab_multiple=0', 'vocab_multiple must be >= 1'),
    ('--warmup_iters=-1', 'warmup_iters must be >= 0'), ('--lr_decay_iters=-5', 'lr_decay_iters must be >= 0'),
    ('--max_epochs=-1', 'max_epochs must be >= 0'), ('--learning_rate=1e999', 'learning_rate must be > 0, got inf'),
    ('--min_lr=-1e-4', 'min_lr must be >= 0'), ('--beta1=1.0', 'beta1 must be in [0, 1)'),
    ('--beta2=-0.1', 'beta2 must be in [0, 1)'), ('--weight_decay=-1', 'weight_decay must be >= 0'),
    ('--grad_clip=-1', 'grad_clip must be >= 0'), ('--task=needle', "task must be one of 'lm', 'classify', 'seq'"),
    ('--init_from=gpt2', 'init_from must be one of'), ('--dtype=float8', 'dtype must be one of'),
    ('--stop_at=1.5', 'stop_at must be in [0, 1]'), ('--max_minutes=-1', 'max_minutes must be >= 0'),
]
# (id, extra args, exit status, message in stderr, fails before out_dir is written). Placeholders: {lm}, {cls},
# {seq}: the fixture datasets; {out}: this case's out_dir (default); {run}: a copy of lm_run's out_dir;
# {tmp}: this case's scratch folder (set up by SETUP[id]).
BAD = [
    ('values', [f for f, _ in BAD_VALUES], 2, BAD_VALUES[0][1], True),
    ('dropout', ['--dropout=1.0'], 2, 'invalid model config: dropout must lie in [0, 1)', True),
    ('stop_at_lm', ['--stop_at=0.5'], 2, "stop_at must be 0 for task 'lm' (it stops on accuracy), got 0.5", True),
    ('readout', ['--readout=max'], 2, "readout must be 'last' or 'mean'", True),
    ('scan_cuda', ['--scan_impl=cuda'], 2, "scan_impl='cuda' needs a CUDA device", True),
    ('peer_attention', ['--peer=gla', '--mixer=attention', '--cache_size=0'], 2, 'not --mixer=attention', True),
    ('peer_unknown', ['--peer=nope'], 2, 'no such peer', True),
    ('peer_cpu', ['--peer=gla'], 2, 'its kernels need a CUDA device', True),
    ('config_raises', ['{tmp}/c.py'], 2, 'c.py, line 1: NameError', True),
    ('block_too_big', ['--block_size=100000'], 2, 'lower --block_size', True),
    ('batch_exceeds', ['--task=classify', '--data_dir={cls}', '--batch_size=100'], 2,
     'exceeds the 64 training examples', True),
    ('classify_on_lm', ['--task=classify'], 2, "does not fit", True),
    ('lm_on_seq', ['--data_dir={seq}'], 2, "use --task=seq", True),
    ('data_rewritten', ['--data_dir={tmp}/data'], 1, 'val.bin: ', True),
    ('data_no_train', ['--data_dir={tmp}/data'], 1, 'train.bin: missing', True),
    ('debug', ['--data_dir={tmp}/data', '--debug=True'], 1, 'Traceback', True),
    ('out_dir_file', ['--out_dir={tmp}/file'], 2, 'is a file, not a directory', False),
    ('out_dir_unwritable', ['--out_dir={tmp}/file/sub'], 1, 'cannot write to out_dir', False),
    ('scratch_into_run', ['--out_dir={run}'], 2, 'pass a new --out_dir, or --overwrite=True', False),
    ('resume_other_data', ['--out_dir={run}', '--init_from=resume', '--data_dir={cls}'], 2, 'holds other data', False),
    ('resume_other_task', ['--out_dir={run}', '--init_from=resume', '--data_dir={cls}', '--task=classify'], 2,
     'was trained with --task=lm', False),
    ('resume_missing', ['--init_from=resume'], 1, 'no checkpoint at', True),
    ('resume_empty', ['--out_dir={run}', '--init_from=resume'], 1, 'ckpt_last.pt is empty (0 bytes)', False),
    ('resume_garbage', ['--out_dir={run}', '--init_from=resume'], 1, 'ckpt_last.pt is not a trusted mipt checkpoint',
     False),
]
SETUP = {
    'config_raises': lambda tmp, f: (tmp / 'c.py').write_text('batch_size = undefined_name\n'),
    'data_rewritten': lambda tmp, f: _data_copy(f['lm'], tmp / 'data', lambda d: _append(d / 'val.bin', b'\0\0')),
    'data_no_train': lambda tmp, f: _data_copy(f['lm'], tmp / 'data', lambda d: os.remove(d / 'train.bin')),
    'debug': lambda tmp, f: _data_copy(f['lm'], tmp / 'data', lambda d: os.remove(d / 'train.bin')),
    'out_dir_file': lambda tmp, f: (tmp / 'file').write_text('x'),
    'out_dir_unwritable': lambda tmp, f: (tmp / 'file').write_text('x'),
    'resume_empty': lambda tmp, f: (Path(f['run']) / 'ckpt_last.pt').write_bytes(b''),
    'resume_garbage': lambda tmp, f: (Path(f['run']) / 'ckpt_last.pt').write_bytes(os.urandom(2000)),
}


@pytest.fixture(scope='session')
def bad_runs(lm_dir, cls_dir, seq_dir, lm_run, tmp_path_factory):
    """Every BAD case, run 4 at a time: {id: (CompletedProcess, out_dir)}."""
    def one(case):
        cid, args = case[0], case[1]
        tmp = tmp_path_factory.mktemp(cid)
        f = {'lm': lm_dir, 'cls': cls_dir, 'seq': seq_dir, 'out': tmp / 'out', 'tmp': tmp}
        if any('{run}' in a for a in args):
            f['run'] = shutil.copytree(lm_run[0], tmp / 'run')
        if cid in SETUP:
            SETUP[cid](tmp, f)
        args = [a.format(**f) for a in [f'--data_dir={lm_dir}', '--out_dir={out}'] + args]
        return cid, (run('train.py', *TINY, *args), f['out'])
    with ThreadPoolExecutor(4) as pool:
        return dict(pool.map(one, BAD))


@pytest.mark.parametrize('flag, msg', BAD_VALUES, ids=[f.split('=')[0][2:] for f, _ in BAD_VALUES])
def test_bad_value(bad_runs, flag, msg):
    r, out = bad_runs['values']
    assert r.returncode == 2 and msg in r.stderr and not out.exists(), r.stderr


@pytest.mark.parametrize('cid, code, msg, early', [(c[0], c[2], c[3], c[4]) for c in BAD], ids=[c[0] for c in BAD])
def test_bad_command_line(bad_runs, cid, code, msg, early):
    r, out = bad_runs[cid]
    assert r.returncode == code and msg in r.stderr, f"exit {r.returncode}\n{r.stderr[-2000:]}"
    if cid != 'debug':  # one line, no traceback (--debug=True re-raises on purpose)
        lines = r.stderr.strip().splitlines()
        assert 'Traceback' not in r.stderr and lines[-1].startswith('error: '), r.stderr
        assert sum(ln.startswith('error: ') for ln in lines) == 1, r.stderr
    if early:
        assert not out.exists(), f'{cid}: wrote into out_dir before failing'


# ----------------------------------------------------------------------------- training
def test_lm_metrics(lm_run):
    out, r = lm_run
    assert 'best val loss' in r.stdout and 'checkpoint:' in r.stdout
    m = json.loads((out / 'metrics.json').read_text())
    for key in ('train_config', 'model_config', 'params', 'params_non_embedding', 'best_val', 'test',
                'tokens_per_sec', 'peak_memory_bytes', 'wall_time_s', 'device', 'git_commit', 'probe'):
        assert key in m, key
    assert m['model_config']['mixer'] == 'mipt' and m['model_config']['n_embd'] == 32 and m['note'] is None
    assert m['train_config']['max_iters'] == 12 and m['iters'] == 12
    assert 0 < m['params_non_embedding'] < m['params']
    assert 0 < m['best_val']['loss'] < 10 and m['best_val']['iter'] in (0, 4, 8, 12)
    assert 0 < m['test']['loss'] < 10 and m['test']['ppl'] == pytest.approx(np.exp(m['test']['loss']))
    assert m['tokens_per_sec'] > 0 and m['peak_memory_bytes'] > 1e6 and m['wall_time_s'] > 0
    assert len(m['probe']['p_mean']) == 1 and 0 < m['probe']['p_mean'][0] < 1
    assert 0 <= m['probe']['cache_fill'][0] <= 4
    losses = train_losses(out)
    assert len(losses) == 12 and all(np.isfinite(losses))
    ck = torch.load(out / 'ckpt.pt', weights_only=True)  # plain data only
    assert ck['format'] == 'mipt-ckpt-1' and ck['iter_num'] == m['best_val']['iter']
    assert ck['meta']['tokenizer'] == 'char' and ck['model_args']['n_layer'] == 1 and ck['peer'] == ''
    last = torch.load(out / 'ckpt_last.pt', weights_only=True)
    assert last['iter_num'] == 12 and set(last['rng']) >= {'torch', 'numpy', 'python', 'data'}
    assert 'pid ' in (out / '.lock').read_text()
    # eval_batch_size=0: batches of ~65k tokens (2048 windows of 32), so the 24 test windows are one batch,
    # not 6 of batch_size 4; the test evaluation shows a progress bar
    assert re.search(r'test: 100%.*\| 1/1 \[', r.stderr), r.stderr[-2000:]


def test_resume_is_exact(lm_run, lm_dir, tmp_path):
    ref = train_losses(lm_run[0])
    ok(run('train.py', *LM, f'--data_dir={lm_dir}', f'--out_dir={tmp_path}', '--max_iters=6'))
    assert train_losses(tmp_path) == ref[:6]
    _append(tmp_path / 'log.jsonl', b'{"iter": 6, "loss": 1.2')  # a line cut short by a crash
    r = ok(run('train.py', *LM, f'--data_dir={lm_dir}', f'--out_dir={tmp_path}', '--max_iters=12',
               '--init_from=resume'))
    assert 'dropped 1 line(s) that do not parse' in r.stdout
    assert train_losses(tmp_path) == ref  # bit-identical, dropout and data order included
    m = json.loads((tmp_path / 'metrics.json').read_text())
    assert m['iters'] == 12 and 'test loss' in r.stdout


def test_ctrl_c_saves_and_resumes(lm_run, lm_dir, tmp_path):
    ref = train_losses(lm_run[0])
    p = subprocess.Popen([sys.executable, str(ROOT / 'train.py'), *LM, f'--data_dir={lm_dir}',
                          f'--out_dir={tmp_path}', '--max_iters=100000'], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / 'log.jsonl'
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if log.exists() and sum('"loss"' in line for line in log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    # a second run into the same out_dir is refused while the first holds its lock
    r = run('train.py', *LM, f'--data_dir={lm_dir}', f'--out_dir={tmp_path}', '--overwrite=True')
    assert r.returncode == 1 and f'is in use by another run (pid {p.pid} on ' in r.stderr, r.stderr
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr
    assert 'saved' in stdout and 'init_from=resume' in stdout
    k = torch.load(tmp_path / 'ckpt_last.pt', weights_only=True)['iter_num']
    assert k >= 3 and len(train_losses(tmp_path)) == k
    ok(run('train.py', *LM, f'--data_dir={lm_dir}', f'--out_dir={tmp_path}', '--max_iters=12', '--init_from=resume'))
    got = train_losses(tmp_path)
    assert got[:12] == ref[:len(got[:12])]
    # no evaluation is lost to the stop, also when it fell on an evaluation iteration (eval_interval=4)
    evals = [json.loads(line)['iter'] for line in log.read_text().splitlines() if '"eval"' in line]
    assert set(range(0, 13, 4)) <= set(evals)


def test_finished_run_and_overwrite(lm_run, lm_dir, tmp_path):
    out = shutil.copytree(lm_run[0], tmp_path / 'run')
    before = (out / 'metrics.json').read_bytes()
    r = ok(run('train.py', *LM, f'--data_dir={lm_dir}', f'--out_dir={out}', '--max_iters=12', '--init_from=resume'))
    assert f"run already finished at iter 12; metrics in {out / 'metrics.json'}" in r.stdout, r.stdout
    assert (out / 'metrics.json').read_bytes() == before  # kept as it was
    r = ok(run('train.py', *LM, f'--data_dir={lm_dir}', f'--out_dir={out}', '--max_iters=2', '--overwrite=True'))
    m = json.loads((out / 'metrics.json').read_text())
    assert m['iters'] == 2 and len(train_losses(out)) == 2 and m['best_val']['iter'] in (0, 2)


def test_interrupted_evaluations(tmp_path):
    """SIGINT during a val evaluation saves ckpt_last.pt (exit 0); during the test evaluation it writes
    metrics.json with test=null and a note, and exits 1."""
    ids, chars = char_ids(TEXT * 40)
    big = np.tile(ids, 40)  # ~300k tokens: thousands of one-window evaluation batches
    data = write_data(tmp_path / 'data', {'train.bin': ids, 'val.bin': big, 'test.bin': big}, name='big_char',
                      format='lm', tokenizer='char', vocab_size=len(chars), chars=chars)
    out = tmp_path / 'out'
    args = [sys.executable, str(ROOT / 'train.py'), *TINY, f'--data_dir={data}', f'--out_dir={out}', '--max_iters=0',
            '--eval_batch_size=1']
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    p = subprocess.Popen(args + ['--eval_iters=100000'], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env)
    for line in p.stdout:
        if line.startswith('task lm'):  # the header: the val evaluation comes next
            break
    else:
        pytest.fail(p.stderr.read())
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0 and 'stopped during the evaluation at iter 0' in stdout, stdout + stderr
    ck = torch.load(out / 'ckpt_last.pt', weights_only=True)
    assert ck['iter_num'] == 0 and ck['evaluated'] is False and not (out / 'ckpt.pt').exists()
    p = subprocess.Popen(args + ['--init_from=resume'], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None and '"eval"' not in (
            (out / 'log.jsonl').read_text() if (out / 'log.jsonl').exists() else ''):
        time.sleep(0.02)
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 1 and 'error: test evaluation interrupted at ' in stderr, stdout + stderr
    assert 'Traceback' not in stderr
    m = json.loads((out / 'metrics.json').read_text())
    assert m['test'] is None and m['note'].startswith('test evaluation interrupted at ') and m['best_val']['iter'] == 0
    n_batches = int(m['note'].split('/')[1].split()[0])
    assert n_batches == (len(big) - 1) // 32  # eval_batch_size=1: one window of block_size per batch


def test_nan_loss_stops_without_bad_checkpoint(lm_dir, tmp_path):
    r = run('train.py', *LM, f'--data_dir={lm_dir}', f'--out_dir={tmp_path}', '--max_iters=50',
            '--learning_rate=1e9', '--warmup_iters=0', '--grad_clip=0.0', '--eval_interval=1000')
    assert r.returncode == 1 and 'non-finite loss at iter' in r.stderr, r.stderr
    assert not (tmp_path / 'metrics.json').exists()
    assert torch.load(tmp_path / 'ckpt_last.pt', weights_only=True)['iter_num'] == 0  # the last good state
    for name in ('ckpt.pt', 'ckpt_last.pt'):
        if (tmp_path / name).exists():
            ck = torch.load(tmp_path / name, weights_only=True)
            assert all(torch.isfinite(v).all() for v in ck['model'].values() if v.is_floating_point())


def test_classify(cls_dir, tmp_path):
    r = ok(run('train.py', *TINY, '--task=classify', f'--data_dir={cls_dir}', f'--out_dir={tmp_path}',
               '--max_epochs=1', '--eval_interval=8', '--block_size=24', '--dtype=bfloat16'))
    assert 'best val acc' in r.stdout and 'test acc' in r.stdout
    assert 'dtype=bfloat16 does not apply on a CPU' in r.stdout and 'are longer than block_size=24' in r.stdout
    m = json.loads((tmp_path / 'metrics.json').read_text())
    assert m['iters'] == 64 // 4 and 0 <= m['best_val']['acc'] <= 1 and 0 <= m['test']['acc'] <= 1
    assert m['model_config']['n_classes'] == 2 and m['train_config']['dtype'] == 'float32'
    r = ok(run('sample.py', f'--out_dir={tmp_path}', '--device=cpu', '--start=good abc abc', '--show_p=True'))
    assert 'good' in r.stdout and 'bad' in r.stdout and '\x1b[48;2;' in r.stdout
    probs = [float(line.split()[-1]) for line in r.stdout.splitlines() if line.strip().startswith(('good', 'bad'))]
    assert len(probs) == 2 and sum(probs) == pytest.approx(1.0, abs=1e-3)


def test_seq(seq_dir, tmp_path):
    r = ok(run('train.py', *TINY, '--task=seq', f'--data_dir={seq_dir}', f'--out_dir={tmp_path}',
               '--max_epochs=1', '--eval_interval=8', '--batch_size=8', '--eval_batch_size=5'))
    assert 'best val acc' in r.stdout and 'test acc' in r.stdout
    # exploration over at least every position makes training dense: train.py says so
    assert 'warning: cache_explore=64 >= block_size=16: in training every query also attends' in r.stdout
    m = json.loads((tmp_path / 'metrics.json').read_text())
    assert m['task'] == 'seq' and m['iters'] == 64 // 8 and m['best_val']['iter'] in (0, 8)
    assert m['model_config']['n_classes'] == 0 and m['model_config']['block_size'] == 16  # the data's seq_len
    assert 0 <= m['best_val']['acc'] <= 1 and 0 <= m['test']['acc'] <= 1 and m['test']['loss'] > 0
    # accuracy is over the 4 query positions of each row only: a multiple of 1/64 on the 16 test rows
    assert (m['test']['acc'] * 64) == pytest.approx(round(m['test']['acc'] * 64))


def test_seq_stop_at_and_time_limit(seq_dir, tmp_path):
    """stop_at=0.0001 ends training at the first evaluation that reaches it; max_minutes ends it at the next
    iteration once the time is up. Either way the best checkpoint is tested and the reason recorded."""
    common = ['--task=seq', f'--data_dir={seq_dir}', '--max_epochs=4', '--eval_interval=2', '--batch_size=8',
              '--cache_explore=4']
    r = ok(run('train.py', *TINY, *common, f'--out_dir={tmp_path / "a"}', '--stop_at=0.0001', '--learning_rate=0.05'))
    assert 'warning: cache_explore' not in r.stdout
    m = json.loads((tmp_path / 'a' / 'metrics.json').read_text())
    assert m['stopped_at_target'] and m['iters'] < 4 * 64 // 8 and m['best_val']['acc'] >= 0.0001 and m['test']
    r = ok(run('train.py', *TINY, *common, f'--out_dir={tmp_path / "a"}', '--stop_at=0.0001', '--init_from=resume'))
    assert 'run already finished' in r.stdout                     # a run that reached stop_at is finished
    assert json.loads((tmp_path / 'a' / 'metrics.json').read_text()) == m
    r = ok(run('train.py', *TINY, *common, f'--out_dir={tmp_path / "b"}', '--max_minutes=0.00001'))
    m = json.loads((tmp_path / 'b' / 'metrics.json').read_text())
    assert m['stopped_at_time_limit'] and m['iters'] == 0 and m['test'] and 'max_minutes=1e-05 reached' in r.stdout + r.stderr


@pytest.fixture(scope='session')
def needle_run(tmp_path_factory):
    """The needle as a dataset (data/needle/prepare.py) trained through config/needle.py, shrunk by flags (which
    win over the config file wherever they stand)."""
    data = tmp_path_factory.mktemp('needle_data') / 'needle48'
    ok(run('data/needle/prepare.py', '--out_dir', data, '--n_train', 64, '--n_val', 32, '--n_test', 32,
           '--seq_len', 48))
    out = tmp_path_factory.mktemp('needle')
    r = ok(run('train.py', *TINY, f'--data_dir={data}', f'--out_dir={out}', '--max_epochs=0', '--max_iters=4',
               '--eval_interval=2', '--batch_size=16', '--block_size=48', 'config/needle.py'))
    return out, r


def test_needle(needle_run):
    tmp_path, r = needle_run
    m = json.loads((tmp_path / 'metrics.json').read_text())
    assert m['task'] == 'classify' and m['dataset'] == 'needle48' and m['iters'] == 4
    assert m['model_config']['n_classes'] == 4 and m['model_config']['block_size'] == 48
    assert m['model_config']['n_embd'] == 32 and m['train_config']['learning_rate'] == 3e-3  # flag; config file
    assert 0 <= m['test']['acc'] <= 1 and 'test acc' in r.stdout


# ----------------------------------------------------------------------------- sampling
def test_sample_streams(lm_run):
    r = ok(run('sample.py', f'--out_dir={lm_run[0]}', '--device=cpu', '--start=All:', '--max_new_tokens=40',
               '--num_samples=2'))
    assert r.stdout.startswith('All:') and r.stdout.count('tokens/s') == 2 and 'bytes' in r.stdout
    assert '\x1b[' not in r.stdout


def test_sample_show_p(lm_run, tmp_path):
    page = tmp_path / 'p.html'
    r = ok(run('sample.py', f'--out_dir={lm_run[0]}', '--device=cpu', '--max_new_tokens=20', '--show_p=True',
               '--start=First', f'--p_html={page}'))
    assert '\x1b[48;2;' in r.stdout and '\x1b[0m' in r.stdout and 'particle' in r.stdout
    html = page.read_text()
    spans = html.count('<span style="background:rgb(')
    assert spans == len('First') + 20  # char-level: one span per prompt and generated token
    cached = int(html.split('at the end (')[1].split(' tokens)')[0])
    assert 1 <= cached <= 4 and html.count('text-decoration:underline') >= 1  # TINY: cache_size 4


def test_phase_sweep(needle_run, tmp_path):
    r = ok(run('results/phase.py', f'--out_dir={needle_run[0]}', '--device=cpu', '--Ns=16,40', '--n_seq=3',
               f'--out={tmp_path / "phase.json"}'))
    res = json.loads((tmp_path / 'phase.json').read_text())
    assert set(res['by_N']) == {'16', '40'} and 'N=    40' in r.stdout
    for v in res['by_N'].values():
        assert len(v['p_mean']) == res['n_layer'] and all(0 < p < 1 for p in v['p_mean'])
        assert all(0 <= f <= 1 for f in v['particle_fraction'] + v['particle_fraction_by_quarter'])
    r = run('results/phase.py', '--out_dir=/nonexistent', '--device=cpu')
    assert r.returncode != 0


def test_sample_show_p_without_cache(lm_dir, tmp_path):
    ok(run('train.py', *TINY, f'--data_dir={lm_dir}', f'--out_dir={tmp_path}', '--max_iters=2', '--cache_size=0',
           '--eval_interval=2'))
    r = ok(run('sample.py', f'--out_dir={tmp_path}', '--device=cpu', '--max_new_tokens=5', '--show_p=True'))
    assert '\x1b[48;2;' in r.stdout


def test_long_prompt(lm_run, attn_run, tmp_path):
    prompt = tmp_path / 'prompt.txt'
    prompt.write_text(TEXT[:150])  # block_size is 32
    r = ok(run('sample.py', f'--out_dir={lm_run[0]}', '--device=cpu', f'--start=FILE:{prompt}',
               '--max_new_tokens=10'))
    assert r.stdout.startswith(TEXT[:150])
    r = ok(run('sample.py', f'--out_dir={attn_run}', '--device=cpu', f'--start=FILE:{prompt}', '--max_new_tokens=40'))
    assert 'keeping the last block_size=32' in r.stdout and 'sliding window' in r.stdout


def test_bad_checkpoints(tmp_path):
    r = run('sample.py', f'--out_dir={tmp_path}', '--device=cpu')
    assert r.returncode == 1 and 'no checkpoint at' in r.stderr, r.stderr
    (tmp_path / 'ckpt.pt').write_bytes(os.urandom(1000))
    r = run('sample.py', f'--out_dir={tmp_path}', '--device=cpu')
    assert r.returncode == 1 and 'is not a trusted mipt checkpoint' in r.stderr and 'Traceback' not in r.stderr, r.stderr
    torch.save(torch.randn(3), tmp_path / 'ckpt.pt')
    r = run('sample.py', f'--out_dir={tmp_path}', '--device=cpu')
    assert r.returncode == 1 and 'is not a mipt checkpoint' in r.stderr and 'Traceback' not in r.stderr, r.stderr
    torch.save({'format': 'something-else', 'model': {}}, tmp_path / 'ckpt.pt')
    r = run('sample.py', f'--out_dir={tmp_path}', '--device=cpu')
    assert r.returncode == 1 and "format 'something-else'" in r.stderr, r.stderr


def test_tokenizer_unavailable(lm_run, tmp_path):
    ck = torch.load(lm_run[0] / 'ckpt.pt', weights_only=True)
    ck['meta'] = dict(ck['meta'], tokenizer='no_such_tokenizer')
    torch.save(ck, tmp_path / 'ckpt.pt')
    r = run('sample.py', f'--out_dir={tmp_path}', '--device=cpu')
    assert r.returncode == 1 and 'cannot load the tokenizer' in r.stderr, r.stderr


def test_ddp_gloo_cpu(lm_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo): rank 0 writes, gradient accumulation is split across ranks."""
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        str(ROOT / 'train.py'), *LM, '--backend=gloo', f'--data_dir={lm_dir}',
                        f'--out_dir={tmp_path}', '--max_iters=4', '--gradient_accumulation_steps=2'],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    ok(r)
    m = json.loads((tmp_path / 'metrics.json').read_text())
    assert m['world_size'] == 2 and m['iters'] == 4 and len(train_losses(tmp_path)) == 4


# sample.py's bad inputs: (id, args, exit code, message); {run}: lm_run, {needle}: needle_run, {tmp}: scratch
SAMPLE_BAD = [
    ('prompt_missing', ['--start=FILE:{tmp}/nope.txt'], 2, "cannot read the prompt file"),
    ('prompt_binary', ['--start=FILE:{tmp}/bin.dat'], 2, 'is not UTF-8 text'),
    ('top_k', ['--top_k=-3'], 2, 'top_k must be >= 0'),
    ('device', ['--device=tpu'], 2, "device must be 'cpu', 'cuda' or 'cuda:N'"),
    ('max_new_tokens', ['--max_new_tokens=-5'], 2, 'max_new_tokens must be >= 0'),
    ('temperature', ['--temperature=-1'], 2, 'temperature must be >= 0'),
    ('p_layer', ['--p_layer=5', '--show_p=True'], 2, 'p_layer=5 but the model has 1 layers'),
    ('p_html', ['--show_p=True', '--p_html={tmp}/no/such/dir/p.html'], 2, 'cannot write --p_html'),
    ('needle_ids', ['--out_dir={needle}', "--start=10 999"], 2, 'outside [0, 300)'),
    ('needle_words', ['--out_dir={needle}', "--start=hello"], 2, 'is not an integer'),
    ('empty_prompt', ['--start='], 2, 'empty prompt'),
]


@pytest.fixture(scope='session')
def sample_bad(lm_run, needle_run, tmp_path_factory):
    def one(case):
        cid, args = case[0], case[1]
        tmp = tmp_path_factory.mktemp('s_' + cid)
        (tmp / 'bin.dat').write_bytes(b'\xff\xfe\x00\x81' * 50)
        f = {'run': lm_run[0], 'needle': needle_run[0], 'tmp': tmp}
        args = [a.format(**f) for a in ['--out_dir={run}', '--device=cpu', '--max_new_tokens=3'] + args]
        return cid, run('sample.py', *args)
    with ThreadPoolExecutor(4) as pool:
        return dict(pool.map(one, SAMPLE_BAD))


@pytest.mark.parametrize('cid, code, msg', [(c[0], c[2], c[3]) for c in SAMPLE_BAD], ids=[c[0] for c in SAMPLE_BAD])
def test_sample_bad_inputs(sample_bad, cid, code, msg):
    r = sample_bad[cid]
    assert r.returncode == code and msg in r.stderr, f"exit {r.returncode}\n{r.stderr[-2000:]}"
    lines = r.stderr.strip().splitlines()
    assert 'Traceback' not in r.stderr and lines[-1].startswith('error: ') and r.stdout.count('tokens/s') == 0


def test_sample_greedy_and_classifier(lm_run, needle_run):
    a = ok(run('sample.py', f'--out_dir={lm_run[0]}', '--device=cpu', '--start=All:', '--max_new_tokens=20',
               '--temperature=0', '--seed=1'))
    b = ok(run('sample.py', f'--out_dir={lm_run[0]}', '--device=cpu', '--start=All:', '--max_new_tokens=20',
               '--temperature=0', '--seed=2'))
    assert a.stdout.split('---')[0] == b.stdout.split('---')[0]   # greedy: the seed does not matter
    r = ok(run('sample.py', f'--out_dir={needle_run[0]}', '--device=cpu', '--start=' + ' '.join(['250'] * 40 + ['11'])))
    assert 'class0' in r.stdout and 'tokens classified' in r.stdout
