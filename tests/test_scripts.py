"""
End-to-end tests of train.py / sample.py / configurator.py on CPU, through subprocesses, with tiny
models on tiny datasets written here in the on-disk format of data/<name>/ (meta.json + .bin [+ .idx.npy,
.labels.npy]).
"""
import json
import os
import signal
import subprocess
import sys
import time
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


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope='session')
def lm_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp('lm_data')
    text = TEXT * 40
    chars = sorted(set(text))
    ids = np.array([chars.index(c) for c in text], dtype=np.uint16)
    n = len(ids)
    ids[:int(0.8 * n)].tofile(d / 'train.bin')
    ids[int(0.8 * n):int(0.9 * n)].tofile(d / 'val.bin')
    ids[int(0.9 * n):].tofile(d / 'test.bin')
    meta = {'name': 'tiny_char', 'tokenizer': 'char', 'vocab_size': len(chars), 'dtype': 'uint16',
            'eot_token': None, 'pad_token': None, 'n_classes': 0, 'label_names': [], 'chars': chars}
    (d / 'meta.json').write_text(json.dumps(meta))
    return d


@pytest.fixture(scope='session')
def cls_dir(tmp_path_factory):
    """Byte-level 2-class documents of 5..60 bytes: label 1 iff the text starts with 'good'."""
    d = tmp_path_factory.mktemp('cls_data')
    rng = np.random.default_rng(0)
    for split, n in [('train', 64), ('val', 24), ('test', 24)]:
        docs, labels = [], []
        for _ in range(n):
            y = int(rng.integers(2))
            body = ''.join(rng.choice(list('abcdefgh '), size=int(rng.integers(1, 56))))
            docs.append(list((('good ' if y else 'bad ') + body).encode()))
            labels.append(y)
        np.array([t for doc in docs for t in doc], dtype=np.uint16).tofile(d / f'{split}.bin')
        np.save(d / f'{split}.idx.npy', np.cumsum([0] + [len(doc) for doc in docs]).astype(np.int64))
        np.save(d / f'{split}.labels.npy', np.array(labels, dtype=np.int64))
    meta = {'name': 'tiny_bytes', 'tokenizer': 'bytes', 'vocab_size': 257, 'dtype': 'uint16', 'eot_token': None,
            'pad_token': 256, 'n_classes': 2, 'label_names': ['bad', 'good']}
    (d / 'meta.json').write_text(json.dumps(meta))
    return d


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
    r = ok(run('sample.py', '--help'))
    assert '--max_new_tokens' in r.stdout


def test_bad_flag_stops_train():
    r = run('train.py', '--no_such_key=1')
    assert r.returncode == 2 and "unknown key 'no_such_key'" in r.stderr, r.stderr
    assert 'valid keys:' in r.stderr and 'learning_rate' in r.stderr


DEFAULTS = dict(batch_size=12, learning_rate=1e-3, compile=False, dataset='x', top_k=None, span=(0.0, 0.1))


@pytest.mark.parametrize('args, msg', [
    (['--batch_size=abc'], 'batch_size expects an int'),
    (['--compile=maybe'], 'compile expects True or False'),
    (['--learning_rate=(1, 2)'], 'learning_rate expects a float'),
    (['--dataset=3'], None),  # a string key keeps '3' as a string
    (['--batch_size'], 'expected --key=value'),
    (['no_such_file.py'], 'cannot read config file'),
])
def test_configurator_errors(args, msg, capsys):
    sys.path.insert(0, str(ROOT))
    from configurator import configure
    g = dict(DEFAULTS)
    if msg is None:
        assert configure(g, argv=args)['dataset'] == '3'
        return
    with pytest.raises(SystemExit) as e:
        configure(g, argv=args)
    assert e.value.code == 2 and msg in capsys.readouterr().err


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


def test_bad_key_in_config_file(tmp_path):
    cfg = tmp_path / 'bad.py'
    cfg.write_text('import math\nbatch_size = 8\nlerning_rate = 1e-3\n')
    r = run('train.py', cfg)
    assert r.returncode == 2 and "unknown key 'lerning_rate'" in r.stderr, r.stderr


def test_missing_dataset(tmp_path):
    r = run('train.py', '--device=cpu', '--dataset=no_such_dataset', f'--out_dir={tmp_path}')
    assert r.returncode == 1 and 'python data/no_such_dataset/prepare.py' in r.stderr, r.stderr
    r = run('train.py', '--device=cpu', '--task=classify', f'--data_dir={tmp_path}', f'--out_dir={tmp_path}')
    assert r.returncode == 1 and 'not found' in r.stderr, r.stderr


# ----------------------------------------------------------------------------- training
def test_lm_metrics(lm_run):
    out, r = lm_run
    assert 'best val loss' in r.stdout and 'checkpoint:' in r.stdout
    m = json.loads((out / 'metrics.json').read_text())
    for key in ('train_config', 'model_config', 'params', 'params_non_embedding', 'best_val', 'test',
                'tokens_per_sec', 'peak_memory_bytes', 'wall_time_s', 'device', 'git_commit', 'probe'):
        assert key in m, key
    assert m['model_config']['mixer'] == 'mipt' and m['model_config']['n_embd'] == 32
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
    assert ck['meta']['tokenizer'] == 'char' and ck['model_args']['n_layer'] == 1
    last = torch.load(out / 'ckpt_last.pt', weights_only=True)
    assert last['iter_num'] == 12 and set(last['rng']) >= {'torch', 'numpy', 'python', 'data'}


def test_resume_is_exact(lm_run, lm_dir, tmp_path):
    ref = train_losses(lm_run[0])
    ok(run('train.py', *LM, f'--data_dir={lm_dir}', f'--out_dir={tmp_path}', '--max_iters=6'))
    assert train_losses(tmp_path) == ref[:6]
    r = ok(run('train.py', *LM, f'--data_dir={lm_dir}', f'--out_dir={tmp_path}', '--max_iters=12',
               '--init_from=resume'))
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
               '--max_epochs=1', '--eval_interval=8', '--block_size=24'))
    assert 'best val acc' in r.stdout and 'test acc' in r.stdout
    m = json.loads((tmp_path / 'metrics.json').read_text())
    assert m['iters'] == 64 // 4 and 0 <= m['best_val']['acc'] <= 1 and 0 <= m['test']['acc'] <= 1
    assert m['model_config']['n_classes'] == 2
    r = ok(run('sample.py', f'--out_dir={tmp_path}', '--device=cpu', '--start=good abc abc', '--show_p=True'))
    assert 'good' in r.stdout and 'bad' in r.stdout and '\x1b[48;2;' in r.stdout
    probs = [float(line.split()[-1]) for line in r.stdout.splitlines() if line.strip().startswith(('good', 'bad'))]
    assert len(probs) == 2 and sum(probs) == pytest.approx(1.0, abs=1e-3)


@pytest.fixture(scope='session')
def needle_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('needle')
    r = ok(run('train.py', *TINY, '--task=needle', f'--out_dir={out}', '--n_train=64', '--n_val=32',
               '--n_test=32', '--needle_len=48', '--max_iters=4', '--eval_interval=2',
               '--batch_size=16'))
    return out, r


def test_needle(needle_run):
    tmp_path, r = needle_run
    m = json.loads((tmp_path / 'metrics.json').read_text())
    assert m['task'] == 'needle' and m['model_config']['n_classes'] == 4 and m['model_config']['block_size'] == 48
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
    assert r.returncode == 1 and 'is not a mipt checkpoint' in r.stderr and 'Traceback' not in r.stderr, r.stderr
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
