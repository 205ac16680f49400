"""
In-process tests of train.py and its modules (configurator.py, checkpoint.py, loader.py, runs.py) on the CPU,
with tiny models on tiny datasets written here in the on-disk format of data/<name>/ (data.common.write_files:
meta.json with counts and file hashes + .bin [+ .idx.npy, .labels.npy | .targets.bin]). train.py runs inside
the test process (`script`: its code executed with sys.argv set), so every bad input's one line and exit
status is checked table-driven without starting a Python per case; signals are sent from inside the run, at
a fixed point, never after a sleep.
"""
import contextlib
import errno
import io
import json
import os
import shutil
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import checkpoint  # noqa: E402
import loader  # noqa: E402
import runs  # noqa: E402
from configurator import configure  # noqa: E402

TINY = ['--device=cpu', '--compile=False', '--n_layer=1', '--n_embd=32', '--n_head=2', '--batch_size=4',
        '--block_size=32', '--eval_iters=2', '--cache_size=4', '--cache_chunk=16', '--warmup_iters=2',
        '--cache_explore=8']
# the resume tests share these: lr_decay_iters fixes the schedule whatever max_iters is
LM = TINY + ['--task=lm', '--dropout=0.1', '--eval_interval=4', '--lr_decay_iters=12', '--learning_rate=3e-3']
TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n")
_CODE = {}


def script(name, *argv):
    """Run the script ROOT/name in this process with sys.argv = [name, *argv]. -> namespace(code: its exit
    status, or the exception it raised; out, err: what it printed; g: its globals)."""
    path = ROOT / name
    if name not in _CODE:
        _CODE[name] = compile(path.read_text(), str(path), 'exec')
    g = {'__name__': '__main__', '__file__': str(path), '__builtins__': __builtins__}
    saved = sys.argv, {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    sys.argv = [str(path), *map(str, argv)]
    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            exec(_CODE[name], g)
    except SystemExit as e:
        code = e.code or 0
    except Exception as e:  # noqa: BLE001 - --debug=True re-raises on purpose
        code = e
    finally:
        sys.argv = saved[0]
        for s, h in saved[1].items():
            signal.signal(s, h)
        for f in ('lock_file', 'log_file'):  # the out_dir's lock is released as a process exit would
            if g.get(f) is not None:
                g[f].close()
        checkpoint.DEBUG = False
    return SimpleNamespace(code=code, out=out.getvalue(), err=err.getvalue(), g=g)


def train(*argv):
    return script('train.py', *argv)


def ok(r):
    assert r.code == 0, f"exit {r.code}\nstdout:\n{r.out[-3000:]}\nstderr:\n{r.err[-3000:]}"
    return r


def one_line(r, code, msg):
    """r stopped with exit status `code` and a single line `error: ...` holding msg, no traceback."""
    lines = r.err.strip().splitlines()
    assert r.code == code and msg in r.err, f"exit {r.code}\n{r.err[-2000:]}"
    assert 'Traceback' not in r.err and lines[-1].startswith('error: '), r.err
    assert sum(ln.startswith('error: ') for ln in lines) == 1, r.err
    return lines[-1]


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


def lm_arrays(reps=40):
    ids, _ = char_ids(TEXT * reps)
    n = len(ids)
    return {'train.bin': ids[:int(0.8 * n)], 'val.bin': ids[int(0.8 * n):int(0.9 * n)], 'test.bin': ids[int(0.9 * n):]}


def make_lm(d, reps=40):
    return write_data(d, lm_arrays(reps), name='tiny_char', format='lm', tokenizer='char',
                      vocab_size=len(char_ids(TEXT)[1]), chars=char_ids(TEXT)[1])


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope='session')
def lm_dir(tmp_path_factory):
    return make_lm(tmp_path_factory.mktemp('lm_data'))


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
    """12 uninterrupted iterations: the reference for the resume tests, and a run to resume or refuse."""
    out = tmp_path_factory.mktemp('lm_run')
    r = ok(train(*LM, f'--data_dir={lm_dir}', f'--out_dir={out}', '--max_iters=12'))
    return out, r


# ----------------------------------------------------------------------------- configurator.py
DEFAULTS = dict(batch_size=12, learning_rate=1e-3, compile=False, dataset='x', top_k=None, span=(0.0, 0.1))


@pytest.mark.parametrize('args, msg', [
    (['--batch_size=abc'], "error: --batch_size=abc: batch_size expects an int, got 'abc' (str)"),
    (['--compile=maybe'], 'compile expects True or False'),
    (['--learning_rate=(1, 2)'], 'learning_rate expects a float'),
    (['--batch_size'], 'error: --batch_size needs a value: write --batch_size=<value>'),
    (['--batch_size', '8'], 'error: --batch_size needs a value: write --batch_size=8 (flags are --key=value'),
    (['--lerning_rate=1'], "error: unknown key 'lerning_rate' (from '--lerning_rate=1'): did you mean "
                           "'learning_rate'? (--help lists every key)"),
    (['--zzz=1'], "error: unknown key 'zzz' (from '--zzz=1') (--help lists every key)"),
    (['{unknown}'], "error: unknown key 'lerning_rate' in config file {unknown}: did you mean 'learning_rate'?"),
    (['no_such_file.py'], "error: cannot read config file 'no_such_file.py'"),
    (['{syntax}'], 'line 2: syntax error'),
    (['{raises}'], 'line 3: ZeroDivisionError: division by zero'),
])
def test_configurator_errors(args, msg, capsys, tmp_path):
    files = {'syntax': 'batch_size = 8\nlearning_rate = (\n', 'raises': 'batch_size = 8\n\nlearning_rate = 1 / 0\n',
             'unknown': 'import math\nbatch_size = 8\nlerning_rate = 1e-3\n'}
    for k, text in files.items():
        (tmp_path / f'{k}.py').write_text(text)
    f = {k: tmp_path / f'{k}.py' for k in files}
    with pytest.raises(SystemExit) as e:
        configure(dict(DEFAULTS), argv=[a.format(**f) for a in args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and msg.format(**f) in err and err.count('\n') == 1 and err.startswith('error: '), err


def test_configurator_values(tmp_path):
    cfg = tmp_path / 'c.py'
    cfg.write_text('import math\nbatch_size = 64\nlearning_rate = 3e-4\n')
    g, origins = dict(DEFAULTS), {}
    out = configure(g, argv=[str(cfg), '--compile=true', '--learning_rate=1', '--top_k=5', '--span=(0.5, 1)',
                             '--batch_size=1e3', '--dataset=3'], origins=origins)
    assert out == dict(batch_size=1000, learning_rate=1.0, compile=True, dataset='3', top_k=5, span=(0.5, 1))
    assert isinstance(out['learning_rate'], float) and g['batch_size'] == 1000
    assert origins == {'batch_size': '--batch_size=1e3', 'learning_rate': '--learning_rate=1', 'compile': '--compile=true',
                       'top_k': '--top_k=5', 'span': '--span=(0.5, 1)', 'dataset': '--dataset=3'}
    # flags win over config files wherever they stand; among files, and among flags, the later one wins
    cfg2 = tmp_path / 'd.py'
    cfg2.write_text('batch_size = 32\n')
    origins = {}
    out = configure(dict(DEFAULTS), argv=['--batch_size=8', str(cfg), str(cfg2)], origins=origins)
    assert out['batch_size'] == 8 and out['learning_rate'] == 3e-4 and origins['learning_rate'] == str(cfg)
    assert configure(dict(DEFAULTS), argv=[str(cfg2), str(cfg)])['batch_size'] == 64
    assert configure(dict(DEFAULTS), argv=['--top_k=1', '--top_k=2', '--top_k=1'])['top_k'] == 1


def test_help(capsys):
    r = train('config/needle.py', '--help')
    assert r.code == 0 and '--learning_rate' in r.out and '0.003' in r.out  # the config file's value is shown
    assert "--task" in r.out and "'classify'" in r.out and 'executed as it is read' in r.out


# ----------------------------------------------------------------------------- checkpoint.py
def _die(fn, capsys, code=1):
    with pytest.raises(SystemExit) as e:
        fn()
    err = capsys.readouterr().err
    assert e.value.code == code and err.startswith('error: ') and err.count('\n') == 1, err
    return err


def test_checkpoint_load_errors(tmp_path, capsys):
    import argparse
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


ARGS = dict(vocab_size=11, block_size=8, n_layer=1, n_embd=16, n_head=2, cache_size=2)


@pytest.mark.parametrize('ck, msg', [
    ({'model_args': dict(ARGS, n_head=3)}, 'f.pt: its model config does not fit this mipt.py: n_embd (16) must be'),
    ({'model_args': ARGS, 'model': {'bogus': torch.zeros(1)}},
     'f.pt: its weights do not fit its model config ({first}: missing, the config needs (11, 16); and '),
    ({'model_args': dict(ARGS, n_embd=32)},
     'f.pt: its weights do not fit its model config ({first}: the checkpoint holds (11, 16), the config needs (11, 32)'),
    ({'model_args': dict(ARGS, vocab_size=12)}, ': the checkpoint holds (11, 16), the config needs (12, 16)'),
    ({'model_args': ARGS, 'model': [1, 2]}, "f.pt: its weights ('model') are a list, not a state dict"),
    ({'model': {}}, 'f.pt: it has no model config (model_args)'),
])
def test_checkpoint_build_model_errors(ck, msg, capsys):
    """A checkpoint whose weights do not fit its config: one line naming the file, the key and the sizes."""
    weights = checkpoint.build_model({'model_args': ARGS}).state_dict()
    ck = dict({'model': weights}, **ck)
    assert msg.format(first=next(iter(weights))) in _die(lambda: checkpoint.build_model(ck, 'cpu', 'f.pt'), capsys)


def test_checkpoint_build_model_how_and_debug(monkeypatch):
    ck = {'model_args': dict(ARGS, cache_impl='triton', scan_impl='torch', recompute=True)}
    m = checkpoint.build_model(ck)  # how, not what: never the checkpoint's
    assert (m.config.cache_impl, m.config.scan_impl, m.config.recompute, m.config.n_embd) == ('auto', 'auto', False, 16)
    m = checkpoint.build_model(ck, how={'cache_impl': 'torch', 'recompute': True})
    assert (m.config.cache_impl, m.config.scan_impl, m.config.recompute) == ('torch', 'auto', True)
    monkeypatch.setattr(checkpoint, 'DEBUG', True)  # --debug=True: the original exception, traceback and all
    with pytest.raises(ValueError):
        checkpoint.build_model({'model_args': dict(ARGS, n_head=3)})


# ----------------------------------------------------------------------------- runs.py, loader.py
def test_lock_names_the_holder(tmp_path, capsys):
    held = runs.lock(str(tmp_path / 'out'))
    try:
        err = _die(lambda: runs.lock(str(tmp_path / 'out')), capsys)
        assert f'is in use by another run (pid {os.getpid()} on ' in err
    finally:
        held.close()
    runs.lock(str(tmp_path / 'out')).close()  # released with its file


def test_trim_log(tmp_path):
    log = tmp_path / 'log.jsonl'
    log.write_text(''.join(json.dumps(e) + '\n' for e in [{'iter': 0, 'eval': {}}, {'iter': 0, 'loss': 1}, {'iter': 1, 'loss': 1},
                                                           {'iter': 2, 'eval': {}}, {'iter': 2, 'loss': 1}])
                   + '\n{"iter": 3, "loss": 1.2')
    assert runs.trim_log(str(log), 2) == 1
    assert [json.loads(x) for x in log.read_text().splitlines()] == [
        {'iter': 0, 'eval': {}}, {'iter': 0, 'loss': 1}, {'iter': 1, 'loss': 1}, {'iter': 2, 'eval': {}}]
    assert runs.trim_log(str(tmp_path / 'none.jsonl'), 5) == 0


def test_lr_schedule():
    lr = lambda it: runs.lr_at(it, 1.0, 0.1, 2, 10)
    assert [lr(0), lr(1)] == [1 / 3, 2 / 3] and lr(2) == 1.0 and lr(10) == lr(50) == 0.1
    assert 0.1 < lr(6) < 1.0 and runs.lr_at(7, 1.0, 0.1, 2, 10, decay=False) == 1.0


def test_rng_state_round_trip():
    order = loader.TrainOrder(5)
    st = runs.rng_state('cpu', order)
    a = (torch.rand(3), np.random.rand(), torch.randint(100, (3,), generator=order.data_gen))
    order2 = loader.TrainOrder(99)
    assert runs.set_rng_state(st, 'cpu', order2, 5, 0) == 1
    b = (torch.rand(3), np.random.rand(), torch.randint(100, (3,), generator=order2.data_gen))
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and torch.equal(a[2], b[2])


def test_lm_windows(lm_dir):
    meta = json.loads((lm_dir / 'meta.json').read_text())
    data = loader.LM(str(lm_dir), meta, 8, 'cpu')
    raw = np.fromfile(lm_dir / 'val.bin', dtype=np.uint16).astype(np.int64)
    x, y, lengths = data.windows(data.splits['val'].map(), [0, 5], 8)
    assert lengths is None and x.tolist() == [raw[0:8].tolist(), raw[5:13].tolist()]
    assert y.tolist() == [raw[1:9].tolist(), raw[6:14].tolist()]
    n, batches = data.eval_batches('test', 1000, 2, 0)  # the whole split fits: non-overlapping windows
    assert n == 1 and next(batches)[0].shape == ((meta['counts']['test']['tokens'] - 1) // 8, 8)


# ----------------------------------------------------------------------------- bad command lines
def _copy(src, dst, edit):
    shutil.copytree(src, dst)
    edit(Path(dst))


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


def test_bad_values(lm_dir, tmp_path, capsys):
    r = train(*TINY, f'--data_dir={lm_dir}', f'--out_dir={tmp_path / "out"}', *[f for f, _ in BAD_VALUES])
    line = one_line(r, 2, BAD_VALUES[0][1])
    assert all(msg in line for _, msg in BAD_VALUES) and not (tmp_path / 'out').exists()


# (id, extra args, exit status, message, fails before out_dir is written). Placeholders: {lm}, {cls}, {seq}: the
# fixture datasets; {out}: this case's out_dir (default); {run}: a copy of lm_run's out_dir; {tmp}: this case's
# scratch folder (set up by SETUP[id]).
BAD = [
    ('dropout', ['--dropout=1.0'], 2, 'invalid model config: dropout must lie in [0, 1)', True),
    ('stop_at_lm', ['--stop_at=0.5'], 2, "stop_at must be 0 for task 'lm' (it stops on accuracy), got 0.5", True),
    ('readout', ['--readout=max', '--task=classify', '--data_dir={cls}'], 2, "readout must be 'last' or 'mean'", True),
    ('readout_lm', ['--readout=mean'], 2, "readout='mean' is a classifier's read-out: it needs task 'classify', "
     "not 'lm'", True),
    ('seed', ['--seed=-1'], 2, 'seed must be in [0, 2**32), got -1', True),
    ('block_size_1', ['--block_size=1'], 2, 'block_size must be >= 2 (a window of one token has no context to learn '
     'from), got 1', True),
    ('out_dir_empty', ['--out_dir='], 2, "out_dir must name a folder, got ''", True),
    ('min_lr', ['--min_lr=0.1', '--learning_rate=0.01'], 2, 'min_lr=0.1 exceeds learning_rate=0.01: the schedule '
     'decays', True),
    ('epochs_on_lm', ['--max_epochs=2'], 2, "max_epochs counts passes over the examples of task 'classify' or "
     "'seq': task 'lm' runs max_iters", True),
    ('epochs_and_iters', ['--task=classify', '--data_dir={cls}', '--max_epochs=2', '--max_iters=5'], 2,
     '--max_iters and --max_epochs both set the length of the run: give one', True),
    ('twin_cache', ['--mixer=attention', '--cache_size=16'], 2, 'cache_size=16: the attention mixer (the twin) has '
     'no sparse cache: drop --cache_size', True),
    ('scan_cuda', ['--scan_impl=cuda'], 2, "scan_impl='cuda' needs a CUDA device", True),
    ('cache_triton', ['--cache_impl=triton'], 2, "cache_impl='triton' needs Triton and a CUDA device (or "
     "TRITON_INTERPRET=1 on the CPU); got cpu: use --cache_impl=auto or torch", True),
    ('peer_attention', ['--peer=gla', '--mixer=attention', '--cache_size=0'], 2, 'not --mixer=attention', True),
    ('peer_unknown', ['--peer=nope'], 2, 'no such peer', True),
    ('peer_cpu', ['--peer=gla'], 2, 'its kernels need a CUDA device', True),
    ('config_raises', ['{tmp}/c.py'], 2, 'c.py, line 1: NameError', True),
    ('block_too_big', ['--block_size=100000'], 2, 'lower --block_size', True),
    ('batch_exceeds', ['--task=classify', '--data_dir={cls}', '--batch_size=100'], 2,
     'exceeds the 64 training examples', True),
    ('classify_on_lm', ['--task=classify'], 2, "does not fit", True),
    ('lm_on_seq', ['--data_dir={seq}'], 2, "use --task=seq", True),
    ('data_missing', ['--dataset=no_such_dataset', '--data_dir='], 1, 'python data/no_such_dataset/prepare.py', True),
    ('data_no_meta', ['--data_dir={tmp}'], 1, 'meta.json: missing', True),
    ('data_rewritten', ['--data_dir={tmp}/data'], 1, 'val.bin: ', True),
    ('data_no_train', ['--data_dir={tmp}/data'], 1, 'train.bin: missing', True),
    ('out_dir_file', ['--out_dir={tmp}/file'], 2, 'is a file, not a directory', False),
    ('out_dir_unwritable', ['--out_dir={tmp}/file/sub'], 1, 'cannot write to out_dir', False),
    ('scratch_into_run', ['--out_dir={run}'], 2, 'pass a new --out_dir, or --overwrite=True', False),
    ('resume_other_data', ['--out_dir={run}', '--init_from=resume', '--data_dir={cls}'], 2, 'holds other data', False),
    ('resume_other_task', ['--out_dir={run}', '--init_from=resume', '--data_dir={cls}', '--task=classify'], 2,
     'was trained with --task=lm', False),
    ('resume_missing', ['--init_from=resume'], 1, 'ckpt_last.pt to resume from ({tmp}/out does not exist): train a '
     'model first (python train.py --out_dir={tmp}/out)', True),
    ('resume_only_best', ['--out_dir={run}', '--init_from=resume'], 1, 'ckpt_last.pt to resume from ({tmp}/run holds '
     'ckpt.pt, log.jsonl, metrics.json): ckpt.pt is the run\'s best checkpoint; copy it to ckpt_last.pt to continue '
     'from its iteration, or start over with --init_from=scratch --overwrite=True', False),
    ('resume_empty', ['--out_dir={run}', '--init_from=resume'], 1, 'ckpt_last.pt is empty (0 bytes)', False),
    ('resume_garbage', ['--out_dir={run}', '--init_from=resume'], 1, 'ckpt_last.pt is not a trusted mipt checkpoint',
     False),
]
SETUP = {
    'config_raises': lambda tmp, f: (tmp / 'c.py').write_text('batch_size = undefined_name\n'),
    'data_rewritten': lambda tmp, f: _copy(f['lm'], tmp / 'data', lambda d: _append(d / 'val.bin', b'\0\0')),
    'data_no_train': lambda tmp, f: _copy(f['lm'], tmp / 'data', lambda d: os.remove(d / 'train.bin')),
    'out_dir_file': lambda tmp, f: (tmp / 'file').write_text('x'),
    'out_dir_unwritable': lambda tmp, f: (tmp / 'file').write_text('x'),
    'resume_only_best': lambda tmp, f: (Path(f['run']) / 'ckpt_last.pt').unlink(),
    'resume_empty': lambda tmp, f: (Path(f['run']) / 'ckpt_last.pt').write_bytes(b''),
    'resume_garbage': lambda tmp, f: (Path(f['run']) / 'ckpt_last.pt').write_bytes(os.urandom(2000)),
}


@pytest.mark.parametrize('cid, args, code, msg, early', BAD, ids=[c[0] for c in BAD])
def test_bad_command_line(cid, args, code, msg, early, lm_dir, cls_dir, seq_dir, lm_run, tmp_path, capsys,
                          monkeypatch):
    import cache_kernel
    import kernels
    monkeypatch.setattr(cache_kernel, 'INTERPRET', False)  # as without TRITON_INTERPRET=1: no Triton on a CPU
    monkeypatch.setattr(kernels, '_FUSED', {})
    f = {'lm': lm_dir, 'cls': cls_dir, 'seq': seq_dir, 'out': tmp_path / 'out', 'tmp': tmp_path}
    if any('{run}' in a for a in args):
        f['run'] = shutil.copytree(lm_run[0], tmp_path / 'run')
    if cid in SETUP:
        SETUP[cid](tmp_path, f)
    r = train(*TINY, *[a.format(**f) for a in [f'--data_dir={lm_dir}', '--out_dir={out}'] + args])
    one_line(r, code, msg.format(**f))
    if early:
        assert not (tmp_path / 'out').exists(), f'{cid}: wrote into out_dir before failing'


def test_debug_shows_the_exception(lm_dir, tmp_path):
    _copy(lm_dir, tmp_path / 'data', lambda d: os.remove(d / 'train.bin'))
    r = train(*TINY, f'--data_dir={tmp_path / "data"}', f'--out_dir={tmp_path / "out"}', '--debug=True')
    from data.common import DatasetError
    assert isinstance(r.code, DatasetError) and 'train.bin: missing' in str(r.code)


# ----------------------------------------------------------------------------- training
def test_lm_metrics(lm_run):
    out, r = lm_run
    assert 'best val loss' in r.out and 'checkpoint:' in r.out
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


def test_resume_is_exact(lm_run, lm_dir, tmp_path, capsys):
    ref = train_losses(lm_run[0])
    ok(train(*LM, f'--data_dir={lm_dir}', f'--out_dir={tmp_path}', '--max_iters=6'))
    assert train_losses(tmp_path) == ref[:6]
    _append(tmp_path / 'log.jsonl', b'{"iter": 6, "loss": 1.2')  # a line cut short by a crash
    r = ok(train(*LM, f'--data_dir={lm_dir}', f'--out_dir={tmp_path}', '--max_iters=12', '--init_from=resume'))
    assert 'dropped 1 line(s) that do not parse' in r.out
    assert train_losses(tmp_path) == ref  # bit-identical, dropout and data order included
    m = json.loads((tmp_path / 'metrics.json').read_text())
    assert m['iters'] == 12 and 'test loss' in r.out


def _signal_at(monkeypatch, cls, method, k, sig=signal.SIGINT, split=None):
    """Send `sig` to this process from inside the k-th item that cls.method hands out (its k-th call, or the
    k-th batch of an evaluation of `split`), as Ctrl-C would at that moment."""
    real, calls = getattr(cls, method), []

    def wrapped(self, *a, **kw):
        res = real(self, *a, **kw)
        if split is None:
            calls.append(1)
            if len(calls) == k:
                os.kill(os.getpid(), sig)
            return res
        if a[0] != split:
            return res
        n, batches = res

        def gen():
            for i, b in enumerate(batches):
                if i == k:
                    os.kill(os.getpid(), sig)
                yield b
        return n, gen()
    monkeypatch.setattr(cls, method, wrapped)


def test_ctrl_c_saves_and_resumes(lm_run, lm_dir, tmp_path, capsys, monkeypatch):
    ref = train_losses(lm_run[0])
    _signal_at(monkeypatch, loader.LM, 'train_batch', 3)  # during the third step (iter 2)
    r = ok(train(*LM, f'--data_dir={lm_dir}', f'--out_dir={tmp_path}', '--max_iters=100000'))
    assert 'stopped at iter 3: saved' in r.out and 'init_from=resume' in r.out
    assert torch.load(tmp_path / 'ckpt_last.pt', weights_only=True)['iter_num'] == 3 and len(train_losses(tmp_path)) == 3
    monkeypatch.undo()
    ok(train(*LM, f'--data_dir={lm_dir}', f'--out_dir={tmp_path}', '--max_iters=12', '--init_from=resume'))
    assert train_losses(tmp_path) == ref
    # no evaluation is lost to the stop, also when it fell on an evaluation iteration (eval_interval=4)
    evals = [json.loads(line)['iter'] for line in (tmp_path / 'log.jsonl').read_text().splitlines() if '"eval"' in line]
    assert set(range(0, 13, 4)) <= set(evals)


def test_interrupted_evaluations(lm_dir, tmp_path, capsys, monkeypatch):
    """A signal during a val evaluation saves ckpt_last.pt (exit 0); during the test evaluation it writes
    metrics.json with test=null and a note, and exits 1; a resume evaluates test again."""
    args = [*TINY, f'--data_dir={lm_dir}', f'--out_dir={tmp_path}', '--max_iters=0', '--eval_batch_size=1']
    _signal_at(monkeypatch, loader.LM, 'eval_batches', 1, signal.SIGTERM, split='val')
    r = ok(train(*args, '--eval_iters=100000'))
    assert 'stopped during the evaluation at iter 0' in r.out
    ck = torch.load(tmp_path / 'ckpt_last.pt', weights_only=True)
    assert ck['iter_num'] == 0 and ck['evaluated'] is False and not (tmp_path / 'ckpt.pt').exists()
    monkeypatch.undo()
    _signal_at(monkeypatch, loader.LM, 'eval_batches', 3, split='test')
    r = train(*args, '--init_from=resume')
    one_line(r, 1, 'error: test evaluation interrupted at 3/')
    m = json.loads((tmp_path / 'metrics.json').read_text())
    assert m['test'] is None and m['note'].startswith('test evaluation interrupted at 3/') and m['best_val']['iter'] == 0
    n_val = json.loads((lm_dir / 'meta.json').read_text())['counts']['test']['tokens']
    assert m['note'].endswith(f"/{(n_val - 1) // 32} batches")  # eval_batch_size=1: one window per batch
    monkeypatch.undo()
    r = ok(train(*args, '--init_from=resume'))
    assert 'test loss' in r.out and json.loads((tmp_path / 'metrics.json').read_text())['test']


def test_finished_run_and_overwrite(lm_run, lm_dir, tmp_path, capsys):
    out = shutil.copytree(lm_run[0], tmp_path / 'run')
    before = (out / 'metrics.json').read_bytes()
    r = ok(train(*LM, f'--data_dir={lm_dir}', f'--out_dir={out}', '--max_iters=12', '--init_from=resume'))
    assert f"run already finished at iter 12; metrics in {out / 'metrics.json'}" in r.out, r.out
    assert (out / 'metrics.json').read_bytes() == before  # kept as it was
    ok(train(*LM, f'--data_dir={lm_dir}', f'--out_dir={out}', '--max_iters=2', '--overwrite=True'))
    m = json.loads((out / 'metrics.json').read_text())
    assert m['iters'] == 2 and len(train_losses(out)) == 2 and m['best_val']['iter'] in (0, 2)


def test_nan_loss_stops_without_bad_checkpoint(lm_dir, tmp_path, capsys):
    r = train(*LM, f'--data_dir={lm_dir}', f'--out_dir={tmp_path}', '--max_iters=50', '--learning_rate=1e9',
              '--warmup_iters=0', '--grad_clip=0.0', '--eval_interval=1000')
    one_line(r, 1, 'non-finite loss at iter')
    assert not (tmp_path / 'metrics.json').exists()
    assert torch.load(tmp_path / 'ckpt_last.pt', weights_only=True)['iter_num'] == 0  # the last good state
    for name in ('ckpt.pt', 'ckpt_last.pt'):
        if (tmp_path / name).exists():
            ck = torch.load(tmp_path / name, weights_only=True)
            assert all(torch.isfinite(v).all() for v in ck['model'].values() if v.is_floating_point())


def test_classify(cls_dir, tmp_path, capsys):
    r = ok(train(*TINY, '--task=classify', f'--data_dir={cls_dir}', f'--out_dir={tmp_path}', '--max_epochs=1',
                 '--eval_interval=8', '--block_size=24', '--dtype=bfloat16'))
    assert 'best val acc' in r.out and 'test acc' in r.out
    assert 'dtype=bfloat16 does not apply on a CPU' in r.out and 'are longer than block_size=24' in r.out
    m = json.loads((tmp_path / 'metrics.json').read_text())
    assert m['iters'] == 64 // 4 and 0 <= m['best_val']['acc'] <= 1 and 0 <= m['test']['acc'] <= 1
    assert m['model_config']['n_classes'] == 2 and m['train_config']['dtype'] == 'float32'


def test_seq(seq_dir, tmp_path, capsys):
    r = ok(train(*TINY, '--task=seq', f'--data_dir={seq_dir}', f'--out_dir={tmp_path}', '--max_epochs=1',
                 '--eval_interval=8', '--batch_size=8', '--eval_batch_size=5', '--cache_explore=64'))
    assert 'best val acc' in r.out and 'test acc' in r.out
    # exploration over at least every position makes training dense: train.py says so
    assert 'warning: cache_explore=64 >= block_size=16: in training every query also attends' in r.out
    m = json.loads((tmp_path / 'metrics.json').read_text())
    assert m['task'] == 'seq' and m['iters'] == 64 // 8 and m['best_val']['iter'] in (0, 8)
    assert m['model_config']['n_classes'] == 0 and m['model_config']['block_size'] == 16  # the data's seq_len
    assert 0 <= m['best_val']['acc'] <= 1 and 0 <= m['test']['acc'] <= 1 and m['test']['loss'] > 0
    # accuracy is over the 4 query positions of each row only: a multiple of 1/64 on the 16 test rows
    assert (m['test']['acc'] * 64) == pytest.approx(round(m['test']['acc'] * 64))


def test_seq_stop_at_and_time_limit(seq_dir, tmp_path, capsys):
    """stop_at=0.0001 ends training at the first evaluation that reaches it; max_minutes ends it at the next
    iteration once the time is up. Either way the best checkpoint is tested and the reason recorded."""
    common = [*TINY, '--task=seq', f'--data_dir={seq_dir}', '--max_epochs=4', '--eval_interval=2', '--batch_size=8',
              '--cache_explore=4']
    r = ok(train(*common, f'--out_dir={tmp_path / "a"}', '--stop_at=0.0001', '--learning_rate=0.05'))
    assert 'warning: cache_explore' not in r.out
    m = json.loads((tmp_path / 'a' / 'metrics.json').read_text())
    assert m['stopped_at_target'] and m['iters'] < 4 * 64 // 8 and m['best_val']['acc'] >= 0.0001 and m['test']
    r = ok(train(*common, f'--out_dir={tmp_path / "a"}', '--stop_at=0.0001', '--init_from=resume'))
    assert 'run already finished' in r.out                     # a run that reached stop_at is finished
    assert json.loads((tmp_path / 'a' / 'metrics.json').read_text()) == m
    r = ok(train(*common, f'--out_dir={tmp_path / "b"}', '--max_minutes=0.00001'))
    m = json.loads((tmp_path / 'b' / 'metrics.json').read_text())
    assert m['stopped_at_time_limit'] and m['iters'] == 0 and m['test'] and 'max_minutes=1e-05 reached' in r.out + r.err


def test_how_fields_recorded_as_used(lm_dir, tmp_path):
    """cache_impl, scan_impl and recompute come from this run's flags, and metrics.json, its train_config and
    ckpt.pt agree (a forced 'triton' was once rewritten to 'auto' in the model only)."""
    ok(train(*TINY, f'--data_dir={lm_dir}', f'--out_dir={tmp_path}', '--max_iters=1', '--cache_size=0',
             '--cache_impl=triton', '--scan_impl=torch', '--recompute=True'))
    m = json.loads((tmp_path / 'metrics.json').read_text())
    ck = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    for where in (m['model_config'], m['train_config'], ck['model_args']):
        assert (where['cache_impl'], where['scan_impl'], where['recompute']) == ('triton', 'torch', True)


def test_flags_win_over_config_files(cls_dir, tmp_path):
    """A --max_iters flag wins over a config file's max_epochs (which once set max_iters after the flags); the
    twin records no cache whatever a config file sets."""
    cfg = tmp_path / 'c.py'
    cfg.write_text("task = 'classify'\nmax_epochs = 15\ncache_size = 16\n")
    r = ok(train(*TINY, f'--data_dir={cls_dir}', f'--out_dir={tmp_path / "a"}', cfg, '--max_iters=3'))
    assert f'note: max_epochs=15 of {cfg} does not apply: --max_iters=3 wins over it' in r.out
    m = json.loads((tmp_path / 'a' / 'metrics.json').read_text())
    assert m['iters'] == 3 and m['train_config']['max_epochs'] == 0 and m['train_config']['max_iters'] == 3
    no_cache_flag = [a for a in TINY if not a.startswith('--cache_size')]
    r = ok(train(*no_cache_flag, f'--data_dir={cls_dir}', f'--out_dir={tmp_path / "b"}', cfg, '--max_epochs=1',
                 '--mixer=attention'))
    m = json.loads((tmp_path / 'b' / 'metrics.json').read_text())
    assert m['iters'] == 64 // 4 and m['model_config']['cache_size'] == 0 and m['train_config']['cache_size'] == 0


def test_resume_takes_the_model_from_the_checkpoint(lm_run, lm_dir, tmp_path):
    """Resume with another --block_size or --n_embd: the model is the checkpoint's, and so are the batches'
    length (they once took the flag's) and what train_config records; a new batch size and learning rate apply
    from the resume on, and metrics.json says where they changed."""
    out = shutil.copytree(lm_run[0], tmp_path / 'run')
    r = ok(train(*LM, f'--data_dir={lm_dir}', f'--out_dir={out}', '--init_from=resume', '--max_iters=14',
                 '--block_size=64', '--n_embd=64', '--batch_size=8', '--learning_rate=1e-3'))
    assert ("resume: the model comes from the checkpoint: ignoring block_size=64 (it has 32), n_embd=64 (it has 32)"
            in r.out), r.out
    assert ("resume at iter 12 with other settings (recorded in metrics.json): batch_size 4 -> 8, learning_rate "
            "0.003 -> 0.001, max_iters 12 -> 14" in r.out), r.out
    before = torch.load(lm_run[0] / 'ckpt_last.pt', weights_only=True)['stats']['train_tokens']
    after = torch.load(out / 'ckpt_last.pt', weights_only=True)
    assert after['stats']['train_tokens'] - before == 2 * 8 * 32  # 2 iterations of 8 windows of the model's 32
    m = json.loads((out / 'metrics.json').read_text())
    assert m['train_config']['block_size'] == m['model_config']['block_size'] == after['model_args']['block_size'] == 32
    assert m['train_config']['n_embd'] == m['model_config']['n_embd'] == 32 and m['train_config']['batch_size'] == 8
    assert m['resumes'] == [{'iter': 12, 'changed': {'batch_size': [4, 8], 'learning_rate': [3e-3, 1e-3],
                                                     'max_iters': [12, 14]}}]
    log = [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]
    assert [e['lr'] for e in log if e.get('iter') == 12 and 'lr' in e][0] < 1e-3


def test_data_rewritten_under_a_running_job(lm_run, lm_dir, tmp_path, monkeypatch):
    """A prepare that rewrites the dataset while a run trains on it (new files under the same names) does not
    change what the run reads: it trains and tests on the data it started with (the stamp it records)."""
    data = shutil.copytree(lm_dir, tmp_path / 'data')
    real, calls = loader.LM.train_batch, []

    def rewrite_at_the_third_batch(self, order, bs):
        calls.append(1)
        if len(calls) == 3:
            arrays = {k: (v[::-1] + 1) % len(char_ids(TEXT)[1]) for k, v in lm_arrays().items()}
            write_data(data, arrays, name='tiny_char', format='lm', tokenizer='char',
                       vocab_size=len(char_ids(TEXT)[1]), chars=char_ids(TEXT)[1])
        return real(self, order, bs)
    monkeypatch.setattr(loader.LM, 'train_batch', rewrite_at_the_third_batch)
    ok(train(*LM, f'--data_dir={data}', f'--out_dir={tmp_path / "out"}', '--max_iters=12'))
    assert len(calls) == 12 and json.loads((data / 'meta.json').read_text())['files'] != json.loads(
        (lm_dir / 'meta.json').read_text())['files']  # the dataset on disk is another one now
    assert train_losses(tmp_path / 'out') == train_losses(lm_run[0])  # as if nothing had happened
    ref, m = (json.loads((d / 'metrics.json').read_text()) for d in (lm_run[0], tmp_path / 'out'))
    assert m['test'] == ref['test'] and m['best_val'] == ref['best_val']


def test_signal_that_breaks_a_step(lm_run, lm_dir, tmp_path, monkeypatch):
    """A Ctrl-C / SIGTERM that also breaks the step under way (torch.compile's compiler killed with the process
    group: an exception out of the forward) stops the run as between steps: ckpt_last.pt, exit 0, an exact
    resume."""
    real, calls = loader.LM.train_batch, []

    def broken_by_the_signal(self, order, bs):
        batch = real(self, order, bs)
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
            raise RuntimeError('the compile worker died')
        return batch
    monkeypatch.setattr(loader.LM, 'train_batch', broken_by_the_signal)
    r = ok(train(*LM, f'--data_dir={lm_dir}', f'--out_dir={tmp_path}', '--max_iters=12'))
    assert 'stopped at iter 2 (the signal broke that step: RuntimeError): saved' in r.out
    assert torch.load(tmp_path / 'ckpt_last.pt', weights_only=True)['iter_num'] == 2
    monkeypatch.undo()
    ok(train(*LM, f'--data_dir={lm_dir}', f'--out_dir={tmp_path}', '--max_iters=12', '--init_from=resume'))
    assert train_losses(tmp_path) == train_losses(lm_run[0])


def test_warnings(lm_dir, tmp_path):
    """The default settings train without a warning; a run shorter than its warmup, or one whose exploration
    covers every position, says so."""
    r = ok(train('--device=cpu', f'--data_dir={lm_dir}', f'--out_dir={tmp_path / "a"}', '--max_iters=0'))
    assert not [line for line in (r.out + r.err).splitlines() if line.startswith(('warning', 'note'))]
    r = ok(train(*TINY, f'--data_dir={lm_dir}', f'--out_dir={tmp_path / "b"}', '--max_iters=1', '--warmup_iters=5',
                 '--cache_explore=-1'))
    assert 'warning: warmup_iters=5 > max_iters=1: the run ends during the warmup, below learning_rate=' in r.out
    assert 'warning: cache_explore=-1 (all): in training every query also attends' in r.out
