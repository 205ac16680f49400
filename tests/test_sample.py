"""
sample.py in process (tests/test_train.py's `script`: its code executed with sys.argv set) on tiny untrained
checkpoints written here in train.py's format (checkpoint.save of a dict with format, model, model_args, peer,
meta), so that no test trains: every bad input's one line and exit status table-driven, Ctrl-C raised from
inside the decoding loop, and one real process for --help into a closed pipe.
"""
import dataclasses
import math
import subprocess
import sys

import pytest
import torch

import checkpoint
import engine
from mipt import MIPT, MIPTConfig
from test_train import ROOT, TEXT, char_ids, ok, one_line, script

SMALL = dict(block_size=32, n_layer=1, n_embd=32, n_head=2, cache_size=4, cache_chunk=16, cache_explore=8)


def write_ckpt(path, meta, **cfg):
    """A freshly initialised model saved as train.py saves one (the fields sample.py reads, and a few more)."""
    torch.manual_seed(0)
    config = MIPTConfig(**dict(SMALL, **cfg))
    ck = {'format': checkpoint.CKPT_FORMAT, 'model': MIPT(config).state_dict(),
          'model_args': dataclasses.asdict(config), 'peer': '', 'iter_num': 0, 'best_val': math.inf,
          'best_iter': 0, 'train_config': {}, 'meta': meta}
    checkpoint.save(str(path), ck)
    return ck


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """out_dirs: 'lm' (char-level MIPT, ckpt.pt + ckpt_last.pt + metrics.json), 'cls' (a byte-level
    2-class classifier), 'attn' (the Transformer twin)."""
    root = tmp_path_factory.mktemp('sample_runs')
    chars = char_ids(TEXT)[1]
    lm_meta = dict(name='tiny_char', format='lm', tokenizer='char', vocab_size=len(chars), chars=chars,
                   eot_token=None, pad_token=None, n_classes=0, label_names=[])
    d = {k: root / k for k in ('lm', 'cls', 'attn')}
    for p in d.values():
        p.mkdir()
    write_ckpt(d['lm'] / 'ckpt.pt', lm_meta, vocab_size=len(chars))
    write_ckpt(d['lm'] / 'ckpt_last.pt', lm_meta, vocab_size=len(chars))
    (d['lm'] / 'metrics.json').write_text('{}')
    write_ckpt(d['cls'] / 'ckpt.pt', dict(name='tiny_bytes', format='classify', tokenizer='bytes', vocab_size=257,
                                          eot_token=None, pad_token=256, n_classes=2, label_names=['bad', 'good']),
               vocab_size=257, n_classes=2)
    write_ckpt(d['attn'] / 'ckpt.pt', lm_meta, vocab_size=len(chars), mixer='attention', cache_size=0)
    return d


def sample(*args):
    return script('sample.py', '--device=cpu', *args)


def _edit(runs, tmp, edit):
    """tmp/ckpt.pt: the lm run's checkpoint, edited in place by `edit(ck)`."""
    ck = torch.load(runs['lm'] / 'ckpt.pt', weights_only=True)
    edit(ck)
    torch.save(ck, tmp / 'ckpt.pt')


def _drop_weight(ck):
    del ck['model']['lm_head.weight' if 'lm_head.weight' in ck['model'] else next(iter(ck['model']))]


# (id, args, exit code, message); {lm}, {cls}, {attn}: the runs' out_dirs, {tmp}: this test's scratch folder
BAD = [
    ('wrong_ckpt', ['--ckpt=ckpt_best.pt'], 2,
     "no checkpoint 'ckpt_best.pt' in {lm} (it holds ckpt.pt, ckpt_last.pt, metrics.json): "
     "pass --ckpt=ckpt.pt or --ckpt=ckpt_last.pt"),
    ('temperature_inf', ['--temperature=1e999'], 2, 'temperature must be >= 0 and finite (0 = greedy), got inf'),
    ('temperature_minus_inf', ['--temperature=-1e999'], 2, 'temperature must be >= 0 and finite'),
    ('temperature_nan', ['{tmp}/nan.py'], 2, 'temperature must be >= 0 and finite (0 = greedy), got nan'),
    ('temperature_word', ['--temperature=nan'], 2, "temperature expects a float, got 'nan'"),
    ('temperature_negative', ['--temperature=-0.5'], 2, 'got -0.5'),
    ('temperature_none', ['--temperature=None'], 2, 'temperature must be >= 0 and finite (0 = greedy), got None'),
    ('max_new_tokens_zero', ['--max_new_tokens=0'], 2, 'max_new_tokens=0 would generate nothing'),
    ('max_new_tokens_none', ['--max_new_tokens=None'], 2, 'max_new_tokens must be >= 0, got None'),
    ('num_samples_none', ['--num_samples=None'], 2, 'num_samples must be >= 1, got None'),
    ('seed_none', ['--seed=None'], 2, 'seed must be an integer'),
    ('seed_huge', ['--seed=2**70'], 2, 'seed expects an int'),
    ('seed_range', ['--seed=1180591620717411303424'], 2, 'seed must be an integer in [-2**63, 2**64)'),
    ('p_layer_none', ['--p_layer=None', '--show_p=True'], 2, 'p_layer must be an integer'),
    ('p_html_alone', ['--p_html={tmp}/p.html'], 2, '--p_html={tmp}/p.html writes the --show_p view: add --show_p=True'),
    ('weights_missing', ['--out_dir={tmp}'], 1, '{tmp}/ckpt.pt: its weights do not fit its model config ('),
    ('weights_width', ['--out_dir={tmp}'], 1, '{tmp}/ckpt.pt: its weights do not fit its model config ('),
    ('config_bad', ['--out_dir={tmp}'], 1, '{tmp}/ckpt.pt: its model config does not fit this mipt.py'),
]
SETUP = {
    'temperature_nan': lambda runs, tmp: (tmp / 'nan.py').write_text("temperature = float('nan')\n"),
    'weights_missing': lambda runs, tmp: _edit(runs, tmp, _drop_weight),
    'weights_width': lambda runs, tmp: _edit(runs, tmp, lambda ck: ck['model_args'].update(n_embd=64)),
    'config_bad': lambda runs, tmp: _edit(runs, tmp, lambda ck: ck['model_args'].update(mixer='lstm')),
}


@pytest.mark.parametrize('cid, args, code, msg', BAD, ids=[c[0] for c in BAD])
def test_bad_inputs(cid, args, code, msg, runs, tmp_path):
    f = {k: str(v) for k, v in runs.items()} | {'tmp': str(tmp_path)}
    if cid in SETUP:
        SETUP[cid](runs, tmp_path)
    r = sample(*[a.format(**f) for a in ['--out_dir={lm}', '--max_new_tokens=3'] + args])
    one_line(r, code, msg.format(**f))
    assert 'tokens/s' not in r.out
    assert not (tmp_path / 'p.html').exists()  # no empty page left behind


def test_good_inputs(runs, tmp_path):
    """The settings next to the bad ones that must still work."""
    r = ok(sample(f'--out_dir={runs["lm"]}', '--ckpt=ckpt_last.pt', '--start=All:', '--max_new_tokens=4',
                  '--temperature=0', '--seed=-1', '--debug=True'))
    assert r.out.startswith('All:') and '4 new tokens' in r.out
    r = ok(sample(f'--out_dir={runs["cls"]}', '--start=good abc', '--max_new_tokens=0'))  # not used by a classifier
    assert 'tokens classified' in r.out and 'good' in r.out
    r = ok(sample(f'--out_dir={runs["attn"]}', '--max_new_tokens=2', '--show_p=True', f'--p_html={tmp_path}/p.html'))
    assert f'writing no {tmp_path}/p.html' in r.out and not (tmp_path / 'p.html').exists()
    ok(sample(f'--out_dir={runs["lm"]}', '--max_new_tokens=2', '--show_p=True', f'--p_html={tmp_path}/p.html'))
    assert (tmp_path / 'p.html').read_text().count('<span') == 1 + 2


def test_debug_re_raises(runs, tmp_path):
    (tmp_path / 'ckpt.pt').write_bytes(b'not a checkpoint')
    assert one_line(sample(f'--out_dir={tmp_path}'), 1, 'is not a trusted mipt checkpoint')
    r = sample(f'--out_dir={tmp_path}', '--debug=True')
    assert isinstance(r.code, Exception) and not isinstance(r.code, SystemExit)
    _edit(runs, tmp_path, _drop_weight)
    r = sample(f'--out_dir={tmp_path}', '--debug=True')  # not from an exception: still the one line
    one_line(r, 1, 'its weights do not fit')


def _interrupt_after(monkeypatch, n):
    """engine.decode, raising KeyboardInterrupt (as Ctrl-C does) once it has yielded n tokens."""
    real = engine.decode

    def decode(*a, **kw):
        for i, d in enumerate(real(*a, **kw)):
            if i == n:
                raise KeyboardInterrupt
            yield d
    monkeypatch.setattr(engine, 'decode', decode)


@pytest.mark.parametrize('args, summary', [
    ([], 'interrupted (Ctrl-C) after 5 of 20 new tokens in '),
    (['--num_samples=3'], '; 2 more samples not started'),
    (['--show_p=True', '--p_html={tmp}/p.html'], '; no --show_p view'),
], ids=['one', 'more_samples', 'show_p'])
def test_ctrl_c_keeps_the_text(args, summary, runs, tmp_path, monkeypatch):
    _interrupt_after(monkeypatch, 5)
    try:
        r = sample(f'--out_dir={runs["lm"]}', '--start=All:', '--max_new_tokens=20', '--temperature=0',
                   *[a.format(tmp=tmp_path) for a in args])
    except KeyboardInterrupt:
        pytest.fail('the KeyboardInterrupt went through sample.py (a traceback for the user)')
    assert r.code == 130 and r.err == '', r.err
    text, last = r.out.rstrip('\n').rsplit('\n', 1)
    assert text.startswith('All:') and len(text) == len('All:') + 5  # char-level: the 5 tokens generated
    assert last.startswith('--- sample 1/') and summary in last and 'tokens/s' not in r.out
    assert not (tmp_path / 'p.html').exists()


def test_help_into_a_closed_pipe():
    p = subprocess.run(f'{sys.executable} sample.py --help | head -2', shell=True, cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and p.stderr == '' and len(p.stdout.splitlines()) == 2, p.stderr
    r = script('sample.py', '--help')
    assert r.code == 0 and '--debug' in r.out and 'exit status is 130' in r.out and '--p_html=FILE needs' in r.out
