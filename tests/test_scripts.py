"""
The scripts end to end on the CPU: a few real processes (train.py and sample.py from the command line, a
signal, DDP on two CPU processes, --help into a closed pipe), then sample.py and results/phase.py on
checkpoints trained here, in process (tests/test_train.py's `script`), with their bad inputs table-driven.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from test_train import LM, ROOT, TEXT, TINY, cls_dir, lm_dir, lm_run, ok, one_line, script, train, train_losses  # noqa: F401


def run(*args, timeout=300):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def done(r):
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope='session')
def needle_run(tmp_path_factory):
    """The needle as a dataset (data/needle/prepare.py) trained through config/needle.py, shrunk by flags (which
    win over the config file wherever they stand)."""
    data = tmp_path_factory.mktemp('needle_data') / 'needle48'
    ok(script('data/needle/prepare.py', '--out_dir', data, '--n_train', 64, '--n_val', 32, '--n_test', 32,
              '--seq_len', 48))
    out = tmp_path_factory.mktemp('needle')
    r = ok(train(*TINY, f'--data_dir={data}', f'--out_dir={out}', '--max_iters=4', '--eval_interval=2',
                 '--batch_size=16', '--block_size=48', 'config/needle.py'))
    return out, r


# ----------------------------------------------------------------------------- real processes
def test_command_line_end_to_end(lm_dir, tmp_path):
    """train.py then sample.py as a user runs them: exit 0, the summary lines, the test's progress bar."""
    r = done(run('train.py', *TINY, f'--data_dir={lm_dir}', f'--out_dir={tmp_path}', '--max_iters=2',
                 '--eval_interval=2'))
    assert r.stdout.startswith('task lm | dataset tiny_char | mipt | ') and 'best val loss' in r.stdout
    assert f'checkpoint: {tmp_path / "ckpt.pt"}' in r.stdout and 'Traceback' not in r.stderr
    assert 'test: 100%' in r.stderr and '| 1/1 [' in r.stderr  # ~65k tokens per test batch: one batch
    r = done(run('sample.py', f'--out_dir={tmp_path}', '--device=cpu', '--start=All:', '--max_new_tokens=10'))
    assert r.stdout.startswith('All:') and 'tokens/s' in r.stdout


def test_command_line_errors():
    r = run('train.py', '--batch_size', '8')
    assert r.returncode == 2 and r.stdout == '' and r.stderr == (
        'error: --batch_size needs a value: write --batch_size=8 (flags are --key=value, without a space)\n')
    p = subprocess.run(f'{sys.executable} train.py --help | head -2', shell=True, cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and p.stderr == '' and len(p.stdout.splitlines()) == 2, p.stderr


def test_sigterm_saves_a_real_run(lm_dir, tmp_path):
    """SIGTERM to a training process (once it has trained a step): ckpt_last.pt, the resume hint, exit 0."""
    p = subprocess.Popen([sys.executable, str(ROOT / 'train.py'), *LM, f'--data_dir={lm_dir}', f'--out_dir={tmp_path}',
                          '--max_iters=100000'], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, deadline = tmp_path / 'log.jsonl', time.time() + 120
    while p.poll() is None and time.time() < deadline and not (log.exists() and '"loss"' in log.read_text()):
        time.sleep(0.05)  # waits for a state, whatever the time it takes; the signal may come at any point later
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0 and 'saved' in stdout and '--init_from=resume' in stdout, stdout + stderr
    k = torch.load(tmp_path / 'ckpt_last.pt', weights_only=True)['iter_num']
    assert k >= 1 and len(train_losses(tmp_path)) == k


def test_ddp_gloo_cpu(lm_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo): rank 0 writes, gradient accumulation is split across ranks."""
    done(run('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', ROOT / 'train.py', *LM,
             '--backend=gloo', f'--data_dir={lm_dir}', f'--out_dir={tmp_path}', '--max_iters=4',
             '--gradient_accumulation_steps=2'))
    m = json.loads((tmp_path / 'metrics.json').read_text())
    assert m['world_size'] == 2 and m['iters'] == 4 and len(train_losses(tmp_path)) == 4


# ----------------------------------------------------------------------------- sample.py, in process
def sample(*args):
    return script('sample.py', '--device=cpu', *args)


def test_needle(needle_run):
    tmp_path, r = needle_run
    m = json.loads((tmp_path / 'metrics.json').read_text())
    assert m['task'] == 'classify' and m['dataset'] == 'needle48' and m['iters'] == 4
    assert m['model_config']['n_classes'] == 4 and m['model_config']['block_size'] == 48
    assert m['model_config']['n_embd'] == 32 and m['train_config']['learning_rate'] == 3e-3  # flag; config file
    assert 0 <= m['test']['acc'] <= 1 and 'test acc' in r.out


def test_sample_streams(lm_run):
    r = ok(sample(f'--out_dir={lm_run[0]}', '--start=All:', '--max_new_tokens=40', '--num_samples=2'))
    assert r.out.startswith('All:') and r.out.count('tokens/s') == 2 and 'bytes' in r.out
    assert '\x1b[' not in r.out


def test_sample_show_p(lm_run, tmp_path):
    page = tmp_path / 'p.html'
    r = ok(sample(f'--out_dir={lm_run[0]}', '--max_new_tokens=20', '--show_p=True', '--start=First', f'--p_html={page}'))
    assert '\x1b[48;2;' in r.out and '\x1b[0m' in r.out and 'particle' in r.out
    html = page.read_text()
    spans = html.count('<span style="background:rgb(')
    assert spans == len('First') + 20  # char-level: one span per prompt and generated token
    cached = int(html.split('at the end (')[1].split(' tokens)')[0])
    assert 1 <= cached <= 4 and html.count('text-decoration:underline') >= 1  # TINY: cache_size 4


def test_sample_classifier(cls_dir, needle_run, tmp_path):
    ok(train(*TINY, '--task=classify', f'--data_dir={cls_dir}', f'--out_dir={tmp_path}', '--max_iters=2',
             '--eval_interval=2', '--block_size=24'))
    r = ok(sample(f'--out_dir={tmp_path}', '--start=good abc abc', '--show_p=True'))
    assert 'good' in r.out and 'bad' in r.out and '\x1b[48;2;' in r.out
    probs = [float(line.split()[-1]) for line in r.out.splitlines() if line.strip().startswith(('good', 'bad'))]
    assert len(probs) == 2 and sum(probs) == pytest.approx(1.0, abs=1e-3)
    r = ok(sample(f'--out_dir={needle_run[0]}', '--start=' + ' '.join(['250'] * 40 + ['11'])))
    assert 'class0' in r.out and 'tokens classified' in r.out


def test_phase_sweep(needle_run, tmp_path):
    r = ok(script('results/phase.py', f'--out_dir={needle_run[0]}', '--device=cpu', '--Ns=16,40', '--n_seq=3',
                  f'--out={tmp_path / "phase.json"}'))
    res = json.loads((tmp_path / 'phase.json').read_text())
    assert set(res['by_N']) == {'16', '40'} and 'N=    40' in r.out
    for v in res['by_N'].values():
        assert len(v['p_mean']) == res['n_layer'] and all(0 < p < 1 for p in v['p_mean'])
        assert all(0 <= f <= 1 for f in v['particle_fraction'] + v['particle_fraction_by_quarter'])
    assert script('results/phase.py', '--out_dir=/nonexistent', '--device=cpu').code != 0


def test_sample_without_cache_and_twin(lm_dir, lm_run, tmp_path):
    """show_p without a cache; the twin's window keeps the last block_size tokens of a long prompt."""
    ok(train(*TINY, f'--data_dir={lm_dir}', f'--out_dir={tmp_path / "k0"}', '--max_iters=2', '--cache_size=0',
             '--eval_interval=2'))
    assert '\x1b[48;2;' in ok(sample(f'--out_dir={tmp_path / "k0"}', '--max_new_tokens=5', '--show_p=True')).out
    ok(train(*TINY, f'--data_dir={lm_dir}', f'--out_dir={tmp_path / "attn"}', '--max_iters=2', '--mixer=attention',
             '--cache_size=0', '--eval_interval=2'))
    prompt = tmp_path / 'prompt.txt'
    prompt.write_text(TEXT[:150])  # block_size is 32
    r = ok(sample(f'--out_dir={lm_run[0]}', f'--start=FILE:{prompt}', '--max_new_tokens=10'))
    assert r.out.startswith(TEXT[:150])
    r = ok(sample(f'--out_dir={tmp_path / "attn"}', f'--start=FILE:{prompt}', '--max_new_tokens=40'))
    assert 'keeping the last block_size=32' in r.out and 'sliding window' in r.out


def test_sample_greedy(lm_run):
    a = ok(sample(f'--out_dir={lm_run[0]}', '--start=All:', '--max_new_tokens=20', '--temperature=0', '--seed=1'))
    b = ok(sample(f'--out_dir={lm_run[0]}', '--start=All:', '--max_new_tokens=20', '--temperature=0', '--seed=2'))
    assert a.out.split('---')[0] == b.out.split('---')[0]   # greedy: the seed does not matter


def _edited(path, **meta):
    """The checkpoint at path with its dataset meta edited."""
    ck = torch.load(path, weights_only=True)
    return dict(ck, meta=dict(ck['meta'], **meta))


def _bad_ckpt(tmp, content):
    if isinstance(content, bytes):
        (tmp / 'ckpt.pt').write_bytes(content)
    else:
        torch.save(content, tmp / 'ckpt.pt')


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
    ('no_checkpoint', ['--out_dir={tmp}'], 1, 'no checkpoint at'),
    ('garbage', ['--out_dir={tmp}'], 1, 'is not a trusted mipt checkpoint'),
    ('tensor', ['--out_dir={tmp}'], 1, 'is not a mipt checkpoint'),
    ('other_format', ['--out_dir={tmp}'], 1, "format 'something-else'"),
    ('tokenizer', ['--out_dir={tmp}'], 1, 'cannot load the tokenizer'),
]
SAMPLE_SETUP = {
    'garbage': lambda tmp, f: _bad_ckpt(tmp, os.urandom(1000)),
    'tensor': lambda tmp, f: _bad_ckpt(tmp, torch.randn(3)),
    'other_format': lambda tmp, f: _bad_ckpt(tmp, {'format': 'something-else', 'model': {}}),
    'tokenizer': lambda tmp, f: _bad_ckpt(tmp, _edited(f['run'] / 'ckpt.pt', tokenizer='no_such_tokenizer')),
}


@pytest.mark.parametrize('cid, args, code, msg', SAMPLE_BAD, ids=[c[0] for c in SAMPLE_BAD])
def test_sample_bad_inputs(cid, args, code, msg, lm_run, needle_run, tmp_path):
    (tmp_path / 'bin.dat').write_bytes(b'\xff\xfe\x00\x81' * 50)
    f = {'run': lm_run[0], 'needle': needle_run[0], 'tmp': tmp_path}
    if cid in SAMPLE_SETUP:
        SAMPLE_SETUP[cid](tmp_path, f)
    r = sample(*[a.format(**f) for a in ['--out_dir={run}', '--max_new_tokens=3'] + args])
    one_line(r, code, msg)
    assert r.out.count('tokens/s') == 0
