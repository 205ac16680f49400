"""
Tests for data/ and codec.py: tokenizers, raw-file lookup, every prepare.py (on small fixtures, plain and .xz,
run in this process) and, where the offline mirror ($MIPT_DATA_MIRROR, default ../shared/data) has small
files, on the real data; the prepare pipeline's hardening (datasets written as a unit and checked by
check_dataset, clear one-line errors for bad or too-small raw files); the synthetic needle and MQAR tasks.
No network is used.
"""
import contextlib
import csv
import errno
import io
import json
import lzma
import os
import random
import runpy
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, 'data'))
import codec  # noqa: E402
import common  # noqa: E402
import data.mqar.prepare as mqar  # noqa: E402
from data.needle import make_needle  # noqa: E402

MIRROR = os.environ.get('MIPT_DATA_MIRROR', os.path.join(os.path.dirname(REPO), 'shared', 'data'))
SPLITS = ('train', 'val', 'test')
EOT = 100257

def mirror_file(path):
    full = os.path.join(MIRROR, path)
    if not os.path.isfile(full):
        pytest.skip(f'offline mirror file {full} not present')
    return full

# -----------------------------------------------------------------------------
# helpers

def write_text(path, text, xz=False):
    """Write text (UTF-8, newlines untouched) to path, or to path + '.xz' compressed."""
    data = text.encode('utf-8')
    if xz:
        with lzma.open(str(path) + '.xz', 'wb') as f:
            f.write(data)
    else:
        with open(path, 'wb') as f:
            f.write(data)

def csv_text(rows, **kwargs):
    buf = io.StringIO()
    csv.writer(buf, lineterminator='\n', **kwargs).writerows(rows)
    return buf.getvalue()

def run_prepare(name, *args, mirror=None, check=True):
    """Run data/<name>/prepare.py in this process (as `python data/<name>/prepare.py args` would run), downloads
    disabled, mirror = `mirror` (default: none). -> namespace(returncode, stdout, stderr)."""
    path = os.path.join(REPO, 'data', name, 'prepare.py')
    env = dict(MIPT_NO_DOWNLOAD='1', MIPT_DATA_MIRROR=mirror or os.path.join(REPO, 'no-such-mirror'))
    saved = sys.argv, {k: os.environ.get(k) for k in env}
    sys.argv, out, err, code = [path, *map(str, args)], io.StringIO(), io.StringIO(), 0
    os.environ.update(env)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(path, run_name='__main__')
    except SystemExit as e:
        code = e.code
        if not (code is None or isinstance(code, int)):  # sys.exit('error: ...'): Python prints it, exit 1
            err.write(f'{code}\n')
            code = 1
    finally:
        sys.argv = saved[0]
        for k, v in saved[1].items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    p = SimpleNamespace(returncode=code or 0, stdout=out.getvalue(), stderr=err.getvalue())
    if check:
        assert p.returncode == 0, p.stdout + p.stderr
    return p

def load(out):
    """Read back meta.json and every split, checking the on-disk format; returns meta, {split: data} where
    data = flat ids (LM) or (list of per-doc id arrays, labels) (classification)."""
    meta = json.loads((out / 'meta.json').read_text())
    assert set(meta) >= {'name', 'tokenizer', 'vocab_size', 'dtype', 'eot_token', 'pad_token', 'n_classes',
                         'label_names', 'counts', 'source'}
    assert meta['dtype'] == ('uint16' if meta['vocab_size'] <= 65536 else 'uint32')
    assert len(meta['label_names']) == meta['n_classes']
    assert not list(out.glob('*.tmp')), 'temporary files left behind'
    assert meta['format'] == ('classify' if meta['n_classes'] else 'lm')
    kinds = ('.bin', '.idx.npy', '.labels.npy') if meta['n_classes'] else ('.bin',)
    want = {f'{s}{x}' for s in SPLITS for x in kinds}
    assert set(meta['files']) == want and all(
        meta['files'][f] == {'bytes': os.path.getsize(out / f), 'sha256': common.sha256_file(out / f)} for f in want)
    assert common.check_dataset(str(out)) == meta
    data = {}
    for s in SPLITS:
        ids = np.fromfile(out / f'{s}.bin', dtype=meta['dtype'])
        assert len(ids) == meta['counts'][s]['tokens'] and (len(ids) == 0 or ids.max() < meta['vocab_size'])
        if meta['n_classes'] == 0:
            assert not (out / f'{s}.idx.npy').exists() and meta['counts'][s]['docs'] == 1
            data[s] = ids
            continue
        idx, labels = np.load(out / f'{s}.idx.npy'), np.load(out / f'{s}.labels.npy')
        assert idx.dtype == np.int64 and labels.dtype == np.int64
        assert len(idx) == len(labels) + 1 == meta['counts'][s]['docs'] + 1
        assert idx[0] == 0 and idx[-1] == len(ids) and np.all(np.diff(idx) >= 0)
        assert labels.min() >= 0 and labels.max() < meta['n_classes']
        data[s] = ([ids[idx[i]:idx[i + 1]] for i in range(len(labels))], labels)
    return meta, data

def decode_docs(meta, docs):
    """Decode each document, checking that a cl100k doc ends with (and holds no other) EOT."""
    _, decode = common.load_codec(meta)
    out = []
    for d in docs:
        if meta['eot_token'] is not None:
            assert d[-1] == meta['eot_token'] and meta['eot_token'] not in d[:-1]
            d = d[:-1]
        out.append(decode(d.tolist()))
    return out

def check_classification(meta, data, train, test, n_val):
    """train/test: lists of (cleaned text, label) the prepare script should have produced. val must be n_val docs
    drawn from train, disjoint from test, and every split a shuffled copy with matching labels."""
    got = {s: list(zip(decode_docs(meta, data[s][0]), data[s][1].tolist())) for s in SPLITS}
    assert len(got['val']) == n_val
    assert Counter(got['train'] + got['val']) == Counter(train)
    assert Counter(got['test']) == Counter(test)
    assert not {t for t, _ in got['val']} & {t for t, _ in got['test']}
    assert [t for t, _ in got['train']] != [t for t, _ in train if (t, _) not in got['val']]  # shuffled
    return got

rng = random.Random(0)
WORDS = 'the a movie film plot actor great bad, "quoted" it\'s café naïve — 😀 1999 $3.50 end.'.split(' ')

def sentence(n=12):
    return ' '.join(rng.choice(WORDS) for _ in range(n))

# -----------------------------------------------------------------------------
# tokenizers

def test_cl100k_offline_fallback():
    tok = common.get_tokenizer('cl100k_base')
    assert tok.n_vocab == 100277 and tok.eot_token == EOT
    assert tok.encode_ordinary('hello world') == [15339, 1917]
    assert common.get_tokenizer('cl100k_base') is tok  # cached

def test_codecs():
    text = 'Hello, wörld!\n'
    enc, dec = codec.load_codec({'tokenizer': 'char', 'chars': sorted(set(text))})
    assert dec(enc(text)) == text and max(enc(text)) == len(set(text)) - 1
    enc, dec = common.load_codec({'tokenizer': 'bytes'})
    assert enc(text) == list(text.encode('utf-8')) and dec(enc(text) + [256, 256]) == text
    assert dec(enc('ö')[:1]) == '\ufffd'  # a cut multi-byte char decodes with errors='replace'
    enc, dec = common.load_codec({'tokenizer': 'cl100k_base'})
    assert enc('hi<|endoftext|>') == enc('hi') + [EOT] and dec(enc(text)) == text
    with pytest.raises(ValueError):
        common.get_tokenizer('char')
    with pytest.raises(ValueError):
        common.get_tokenizer('gpt2')

def test_codec_module_is_light_and_reexported():
    """sample.py imports codec.py: it must not pull in numpy, tqdm or tiktoken; data/common.py re-exports it."""
    code = ("import sys, codec; bad = {'numpy', 'tqdm', 'tiktoken', 'common', 'data.common'} & set(sys.modules); "
            "assert not bad, bad; print(codec.load_codec({'tokenizer': 'ids', 'vocab_size': 5})[1]([1, 4]))")
    p = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout == '1 4\n', p.stderr
    for name in ('EOT_TEXT', 'CharTokenizer', 'ByteTokenizer', 'IdsTokenizer', 'get_tokenizer', 'load_codec',
                 '_tiktoken'):
        assert getattr(common, name) is getattr(codec, name)

def test_ids_codec():
    enc, dec = codec.load_codec({'tokenizer': 'ids', 'vocab_size': 300})
    assert enc(' 10 250\t261\n') == [10, 250, 261] and enc('') == [] and enc('0 299') == [0, 299]
    assert dec([10, np.int64(250), torch.tensor(261)]) == '10 250 261' and dec([]) == ''
    assert enc(dec(list(range(0, 300, 7)))) == list(range(0, 300, 7))
    tok = codec.get_tokenizer('ids', vocab_size=300)
    assert (tok.n_vocab, tok.eot_token, tok.pad_token) == (300, None, None)
    for bad in (None, 0, 'x'):
        with pytest.raises(ValueError):
            codec.get_tokenizer('ids', vocab_size=bad)

@pytest.mark.parametrize('text, message', [
    ('10 x 12', "token ids: 'x' is not an integer: give space-separated integers in [0, 300), e.g. '10 250 261'"),
    ('10 2.5', "token ids: '2.5' is not an integer"),
    ('10,11', "token ids: '10,11' is not an integer"),
    ('10 300', 'token ids: 300 is outside [0, 300) (vocab_size 300)'),
    ('-1', 'token ids: -1 is outside [0, 300)'),
])
def test_ids_codec_errors(text, message):
    enc, _ = codec.load_codec({'tokenizer': 'ids', 'vocab_size': 300})
    with pytest.raises(ValueError) as e:
        enc(text)
    assert str(e.value).startswith(message) and '\n' not in str(e.value)

def test_encode_stream_equals_whole_text():
    tok = common.get_tokenizer('cl100k_base')
    text = ''.join(f' = Title {i} = \n \n {sentence()}\n \n = = Part = = \n{sentence(3)}  \n\n\n 7 {sentence()}\n'
                   for i in range(30))
    for chunk in (1, 7, 100, 1 << 18):
        assert common.encode_stream(tok, text, chunk_chars=chunk).tolist() == tok.encode_ordinary(text)

# -----------------------------------------------------------------------------
# raw-file lookup

def test_find_source_order(tmp_path, monkeypatch):
    src, mirror, raw = tmp_path / 'src', tmp_path / 'mirror', tmp_path / 'raw'
    for d in (src, mirror / 'ds', raw):
        d.mkdir(parents=True)
    write_text(src / 'a.txt', 'a from src')
    write_text(mirror / 'ds' / 'a.txt', 'a from mirror', xz=True)
    write_text(mirror / 'ds' / 'b.txt', 'b from mirror', xz=True)
    write_text(raw / 'c.txt', 'c from raw')
    monkeypatch.setenv('MIPT_DATA_MIRROR', str(mirror))
    paths = common.find_source('ds', ['a.txt', 'b.txt', 'c.txt'], str(src), raw_dir=str(raw))
    assert [common.read_text(paths[f]) for f in ('a.txt', 'b.txt', 'c.txt')] == \
        ['a from src', 'b from mirror', 'c from raw']
    assert paths['b.txt'].endswith('.xz')

def test_find_source_bad_url_fails_fast_and_clearly(tmp_path, monkeypatch):
    monkeypatch.delenv('MIPT_DATA_MIRROR', raising=False)
    monkeypatch.delenv('MIPT_NO_DOWNLOAD', raising=False)
    url = 'http://mipt-data.invalid/x.txt'
    t0 = time.time()
    with pytest.raises(common.SourceError) as e:
        common.find_source('ds', ['x.txt'], str(tmp_path), {'x.txt': url}, str(tmp_path / 'raw'))
    assert time.time() - t0 < 15
    msg = str(e.value)
    assert all(s in msg for s in ("'x.txt'", '--src', 'MIPT_DATA_MIRROR', url, 'failed'))
    assert not (tmp_path / 'raw').exists()

def test_download_and_zip_extract_from_file_url(tmp_path, monkeypatch):
    monkeypatch.delenv('MIPT_DATA_MIRROR', raising=False)
    monkeypatch.delenv('MIPT_NO_DOWNLOAD', raising=False)
    with zipfile.ZipFile(tmp_path / 'w.zip', 'w') as z:
        z.writestr('w-raw/wiki.train.raw', ' = A = \n')
    write_text(tmp_path / 'plain.txt', 'plain')
    urls = {'wiki.train.raw': ((tmp_path / 'w.zip').as_uri(), common.zip_member('w-raw/wiki.train.raw')),
            'p.txt': (tmp_path / 'plain.txt').as_uri()}
    raw = tmp_path / 'raw'
    paths = common.find_source('ds', urls, None, urls, str(raw))
    assert common.read_text(paths['wiki.train.raw']) == ' = A = \n' and common.read_text(paths['p.txt']) == 'plain'
    assert sorted(os.listdir(raw)) == ['p.txt', 'w.zip', 'wiki.train.raw']

def test_imdb_csv_from_tarball(tmp_path):
    tar_path = tmp_path / 'aclImdb_v1.tar.gz'
    files = {'aclImdb/train/pos/10_9.txt': 'ten', 'aclImdb/train/pos/2_7.txt': 'two, "q"<br />x',
             'aclImdb/train/neg/3_1.txt': 'three', 'aclImdb/test/neg/0_2.txt': 'test',
             'aclImdb/train/unsup/5_0.txt': 'u',
             'aclImdb/README': 'readme'}
    with tarfile.open(tar_path, 'w:gz') as tar:
        for name, text in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    common._imdb_csv(str(tar_path), str(tmp_path / 'train.csv'))
    assert common.read_rows(str(tmp_path / 'train.csv')) == [
        ['id', 'label', 'rating', 'text'], ['neg/3_1', '0', '1', 'three'], ['pos/2_7', '1', '7', 'two, "q"<br />x'],
        ['pos/10_9', '1', '9', 'ten']]

# -----------------------------------------------------------------------------
# missing sources

def test_missing_source_message(tmp_path):
    (tmp_path / 'src').mkdir()
    p = run_prepare('hyperpartisan', '--src', tmp_path / 'src', '--out_dir', tmp_path / 'out', check=False)
    assert p.returncode != 0 and 'Traceback' not in p.stderr
    for s in ('semeval2019_byarticle_train.tsv', '--src', 'MIPT_DATA_MIRROR', 'https://raw.githubusercontent.com/'
              'HikariLight/hyperpartisanship_classification/main/data/semeval_2019/train.tsv'):
        assert s in p.stderr
    assert not (tmp_path / 'out' / 'meta.json').exists()

@pytest.mark.parametrize('name, zipname', [('wikitext2', 'wikitext-2-raw-v1.zip'),
                                           ('wikitext103', 'wikitext-103-raw-v1.zip')])
def test_wikitext_without_train_fails_clearly(tmp_path, name, zipname):
    src = tmp_path / 'src'
    src.mkdir()
    write_text(src / 'wiki.valid.raw', ' v \n', xz=True)
    write_text(src / 'wiki.test.raw', ' t \n')
    p = run_prepare(name, '--src', src, '--out_dir', tmp_path / 'out', mirror=MIRROR, check=False)
    assert p.returncode != 0 and 'Traceback' not in p.stderr
    for s in ("'wiki.train.raw'", '--src', 'MIPT_DATA_MIRROR', 'https://wikitext.smerity.com/' + zipname):
        assert s in p.stderr

def test_agnews_real_mirror_without_train_fails_clearly(tmp_path):
    mirror_file('agnews/test.csv.xz')
    p = run_prepare('agnews', '--out_dir', tmp_path, mirror=MIRROR, check=False)
    assert p.returncode != 0 and 'Traceback' not in p.stderr
    assert "'train.csv'" in p.stderr and os.path.join(MIRROR, 'agnews') in p.stderr
    assert 'https://raw.githubusercontent.com/mhjabreel/CharCnn_Keras/master/data/ag_news_csv/train.csv' in p.stderr

# -----------------------------------------------------------------------------
# prepare scripts on fixtures

@pytest.mark.parametrize('xz', [False, True])
def test_shakespeare_char_fixture(tmp_path, xz):
    text = ''.join(f'{sentence(8).upper()}:\n{sentence()}\n\n' for _ in range(40))
    write_text(tmp_path / 'input.txt', text, xz)
    run_prepare('shakespeare_char', '--src', tmp_path, '--out_dir', tmp_path / 'out')
    meta, data = load(tmp_path / 'out')
    assert meta['tokenizer'] == 'char' and meta['chars'] == sorted(set(text)) and meta['vocab_size'] == len(set(text))
    assert meta['dtype'] == 'uint16' and meta['eot_token'] is None and meta['n_classes'] == 0
    _, decode = common.load_codec(meta)
    n = len(text)
    assert decode(data['train'].tolist()) == text[:int(n * 0.9)]
    assert decode(data['val'].tolist()) == text[int(n * 0.9):int(n * 0.95)]
    assert decode(data['test'].tolist()) == text[int(n * 0.95):]

@pytest.mark.parametrize('name, xz', [('wikitext2', False), ('wikitext103', True)])
def test_wikitext_fixture(tmp_path, name, xz):
    tok = common.get_tokenizer('cl100k_base')
    texts = {f: ''.join(f' = {f} {i} = \n \n {sentence()}\n \n' for i in range(20))
             for f in ('wiki.train.raw', 'wiki.valid.raw', 'wiki.test.raw')}
    for f, t in texts.items():
        write_text(tmp_path / f, t, xz)
    run_prepare(name, '--src', tmp_path, '--out_dir', tmp_path / name)
    meta, data = load(tmp_path / name)
    assert meta['tokenizer'] == 'cl100k_base' and meta['dtype'] == 'uint32' and meta['eot_token'] == EOT
    assert meta['n_classes'] == 0 and meta['name'] == name  # the output folder's name
    for s, f in zip(SPLITS, texts):
        assert data[s].tolist() == tok.encode_ordinary(texts[f])

def imdb_fixture(src, xz, n_train=30, n_test=10):
    docs = {}
    for split, n in (('train', n_train), ('test', n_test)):
        rows = [(f"{'pos' if i % 3 else 'neg'}/{i}_5", int(i % 3 > 0), 5,
                 f'{split} {i}: {sentence()}<br /><br />{sentence(4)}') for i in range(n)]
        write_text(src / f'{split}.csv', csv_text([('id', 'label', 'rating', 'text')] + rows), xz)
        docs[split] = [(r[3].replace('<br />', '\n'), r[1]) for r in rows]
    return docs

@pytest.mark.parametrize('xz', [False, True])
def test_imdb_fixture(tmp_path, xz):
    docs = imdb_fixture(tmp_path, xz)
    run_prepare('imdb', '--src', tmp_path, '--out_dir', tmp_path / 'out', '--n_val', 6)
    meta, data = load(tmp_path / 'out')
    assert meta['tokenizer'] == 'cl100k_base' and meta['dtype'] == 'uint32' and meta['vocab_size'] == 100277
    assert meta['eot_token'] == EOT and meta['pad_token'] is None
    assert meta['n_classes'] == 2 and meta['label_names'] == ['neg', 'pos']
    assert meta['counts']['train']['docs'] == 24 and meta['counts']['test']['docs'] == 10
    check_classification(meta, data, docs['train'], docs['test'], n_val=6)
    # imdb_bytes: same splits and order, bytes truncated to --max_len
    run_prepare('imdb_bytes', '--src', tmp_path, '--out_dir', tmp_path / 'bytes', '--n_val', 6, '--max_len', 40)
    bmeta, bdata = load(tmp_path / 'bytes')
    assert (bmeta['tokenizer'], bmeta['vocab_size'], bmeta['dtype'], bmeta['eot_token'], bmeta['pad_token']) == \
        ('bytes', 257, 'uint16', None, 256)
    for s in SPLITS:
        texts = decode_docs(meta, data[s][0])
        assert [d.tobytes() for d in map(lambda d: d.astype(np.uint8), bdata[s][0])] == \
            [t.encode('utf-8')[:40] for t in texts]
        assert np.array_equal(bdata[s][1], data[s][1])

@pytest.mark.parametrize('xz', [False, True])
def test_agnews_fixture(tmp_path, xz):
    def rows(split, n):
        return [(str(i % 4 + 1), f'{split} {i} title', f'It #39;s a\\b\\\\c {sentence(5)} lt;p gt; AT amp;T')
                for i in range(n)]
    train, test = rows('train', 40), rows('test', 8)
    write_text(tmp_path / 'train.csv', csv_text(train, quoting=csv.QUOTE_ALL), xz)
    write_text(tmp_path / 'test.csv', csv_text(test, quoting=csv.QUOTE_ALL), xz)
    run_prepare('agnews', '--src', tmp_path, '--out_dir', tmp_path / 'out', '--val_frac', 0.25)
    meta, data = load(tmp_path / 'out')
    assert meta['label_names'] == ['World', 'Sports', 'Business', 'Sci/Tech'] and meta['dtype'] == 'uint32'
    want = lambda rs: [(f'{t} {d}'.replace('\\\\', '\n').replace('\\', ' ').replace(' #39;', "'")
                        .replace(' amp;', '&'), int(c) - 1) for c, t, d in rs]
    got = check_classification(meta, data, want(train), want(test), n_val=10)
    assert "It's a b\nc" in got['test'][0][0] and 'AT&T' in got['test'][0][0]

def hyperpartisan_fixture(src, xz):
    docs = {}
    for split, n in (('train', 20), ('test', 7)):
        rows = [(f'{split} {i}: {sentence(30)}', i % 2) for i in range(n)]
        tsv = ''.join(f'{t}\t{label}\n' for t, label in [('sentence', 'label')] + rows)
        write_text(src / f'semeval2019_byarticle_{split}.tsv', tsv, xz)
        docs[split] = rows
    return docs

@pytest.mark.parametrize('xz', [False, True])
def test_hyperpartisan_fixture(tmp_path, xz):
    docs = hyperpartisan_fixture(tmp_path, xz)
    run_prepare('hyperpartisan', '--src', tmp_path, '--out_dir', tmp_path / 'out')
    meta, data = load(tmp_path / 'out')
    assert meta['label_names'] == ['mainstream', 'hyperpartisan'] and meta['dtype'] == 'uint32'
    check_classification(meta, data, docs['train'], docs['test'], n_val=3)  # round(0.15 * 20)

def test_split_seed_is_fixed():
    train = ([str(i) for i in range(100)], [i % 2 for i in range(100)])
    a, b = (common.split_train_val(train, train, 10) for _ in range(2))
    assert a == b and common.split_train_val(train, train, 10, seed=1) != a

# -----------------------------------------------------------------------------
# prepare scripts on the real mirror (small files only)

def test_shakespeare_char_real(tmp_path):
    path = mirror_file('tinyshakespeare/input.txt.xz')
    run_prepare('shakespeare_char', '--out_dir', tmp_path, mirror=MIRROR)
    meta, data = load(tmp_path)
    assert meta['vocab_size'] == 65 and meta['source'] == path
    assert {s: meta['counts'][s]['tokens'] for s in SPLITS} == {'train': 1003854, 'val': 55770, 'test': 55770}
    _, decode = common.load_codec(meta)
    assert decode(np.concatenate([data[s] for s in SPLITS]).tolist()) == common.read_text(path)

def test_hyperpartisan_real(tmp_path):
    mirror_file('hyperpartisan/semeval2019_byarticle_train.tsv.xz')
    run_prepare('hyperpartisan', '--out_dir', tmp_path, mirror=MIRROR)
    meta, data = load(tmp_path)
    assert {s: meta['counts'][s]['docs'] for s in SPLITS} == {'train': 548, 'val': 97, 'test': 628}
    assert np.bincount(np.concatenate([data['train'][1], data['val'][1]])).tolist() == [407, 238]
    assert np.bincount(data['test'][1]).tolist() == [314, 314]
    for s in SPLITS:
        assert sum(int((d == EOT).sum()) for d in data[s][0]) == len(data[s][0])
        assert all(d[-1] == EOT for d in data[s][0])

def test_agnews_real_test_split(tmp_path):
    """train.csv is not mirrored: a small --src train.csv, test.csv falls through to the real mirror."""
    mirror_file('agnews/test.csv.xz')
    src = tmp_path / 'src'
    src.mkdir()
    write_text(src / 'train.csv', csv_text([(str(i % 4 + 1), f't{i}', sentence()) for i in range(20)]))
    run_prepare('agnews', '--src', src, '--out_dir', tmp_path / 'out', mirror=MIRROR)
    meta, data = load(tmp_path / 'out')
    assert meta['counts']['test']['docs'] == 7600 and np.bincount(data['test'][1]).tolist() == [1900] * 4
    assert meta['counts']['val']['docs'] == 1 and os.path.join(MIRROR, 'agnews', 'test.csv.xz') in meta['source']
    texts = decode_docs(meta, data['test'][0])
    assert not any('\\' in t or ' #39;' in t or ' quot;' in t for t in texts)

@pytest.mark.skipif(not os.environ.get('MIPT_SLOW_TESTS'), reason='slow (25-60 s on 2 cores); set MIPT_SLOW_TESTS=1')
def test_imdb_real(tmp_path):
    mirror_file('imdb/train.csv.xz')
    run_prepare('imdb', '--out_dir', tmp_path / 'tok', mirror=MIRROR)
    run_prepare('imdb_bytes', '--out_dir', tmp_path / 'bytes', mirror=MIRROR)
    (meta, data), (bmeta, bdata) = load(tmp_path / 'tok'), load(tmp_path / 'bytes')
    for m, d in ((meta, data), (bmeta, bdata)):
        assert {s: m['counts'][s]['docs'] for s in SPLITS} == {'train': 22500, 'val': 2500, 'test': 25000}
        assert np.bincount(np.concatenate([d['train'][1], d['val'][1]])).tolist() == [12500, 12500]
        assert np.bincount(d['test'][1]).tolist() == [12500, 12500]
    assert all(np.array_equal(data[s][1], bdata[s][1]) for s in SPLITS)
    assert max(len(x) for x in bdata['train'][0]) == 4096
    first = decode_docs(meta, data['val'][0][:50])
    assert [bytes(x.astype(np.uint8)) for x in bdata['val'][0][:50]] == [t.encode()[:4096] for t in first]
    assert not any('<br />' in t for t in first)

# -----------------------------------------------------------------------------
# datasets are written as a unit and checked by check_dataset

def test_write_dataset_is_one_unit(tmp_path, monkeypatch):
    """Old meta.json goes first, every data file next, meta.json last, listing every file's size and sha256."""
    out = tmp_path / 'ds'
    out.mkdir()
    (out / 'meta.json').write_text('{"old": true}')
    log, real = [], common._atomic_write
    def spy(path, write, binary=True):
        log.append((os.path.basename(path), (out / 'meta.json').exists()))
        return real(path, write, binary)
    monkeypatch.setattr(common, '_atomic_write', spy)
    texts = (['ab', 'cde', 'f'], [0, 1, 1])
    meta = common.write_dataset(str(out), 'ds', 'bytes', {s: texts for s in SPLITS}, 'fixture', label_names=['a', 'b'])
    names = [n for n, _ in log]
    assert names[-1] == 'meta.json' and not any(old for _, old in log)  # the old meta.json was gone before any write
    assert sorted(names[:-1]) == sorted(meta['files']) == sorted(f'{s}{x}' for s in SPLITS
                                                                 for x in ('.bin', '.idx.npy', '.labels.npy'))
    assert json.loads((out / 'meta.json').read_text()) == meta and common.check_dataset(str(out)) == meta
    assert all(meta['files'][f] == {'bytes': os.path.getsize(out / f), 'sha256': common.sha256_file(out / f)}
               for f in meta['files'])  # the stamp of the bytes written is the files' own


@pytest.mark.parametrize('err, msg', [(errno.ENOSPC, 'disk full (no space left on the device)'),
                                      (errno.EACCES, 'Permission denied')])
def test_write_failure_leaves_nothing(tmp_path, monkeypatch, err, msg):
    """A full disk while writing val.bin: one line naming the file; no train.bin, no .tmp, no meta.json left."""
    out = tmp_path / 'ds'
    out.mkdir()
    (out / 'test.bin').write_bytes(b'\0\0')  # an earlier prepare's file: of no use without its meta.json
    real = common._write_array
    def full(f, name, arr):
        if name == 'val.bin':
            f.write(b'\0' * 10)
            raise OSError(err, os.strerror(err))
        return real(f, name, arr)
    monkeypatch.setattr(common, '_write_array', full)
    with pytest.raises(common.PrepareError) as e:
        common.write_files(str(out), {f'{s}.bin': np.zeros(3, np.uint16) for s in SPLITS}, {'name': 'ds'})
    assert str(e.value) == (f"{out / 'val.bin'}: {msg}: nothing of this dataset was kept; free some space (or pick "
                            f"another --out_dir) and rerun")
    assert os.listdir(out) == []
    with pytest.raises(common.DatasetError, match='meta.json: missing'):
        common.check_dataset(str(out))


def test_full_disk_in_a_prepare_script(tmp_path, monkeypatch):
    def full(f, name, arr):
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(common, '_write_array', full)
    p = run_prepare('needle', '--out_dir', tmp_path / 'n', '--n_train', 8, '--n_val', 4, '--n_test', 4, check=False)
    assert p.returncode == 1 and p.stderr == (f"error: {tmp_path / 'n' / 'train.bin'}: disk full (no space left on "
                                              f"the device): nothing of this dataset was kept; free some space (or "
                                              f"pick another --out_dir) and rerun\n"), p.stderr
    assert os.listdir(tmp_path / 'n') == []


def test_two_prepares_at_once(tmp_path, monkeypatch):
    """A second prepare into a folder that another is writing stops with one line; the first finishes a
    dataset that passes its stamp check, all of it its own (both once wrote the same <file>.tmp)."""
    out, real, second = tmp_path / 'ds', common._write_array, []
    arrays = lambda v: {f'{s}.bin': np.full(5, v, np.uint16) for s in SPLITS}
    meta = lambda v: {'name': 'ds', 'vocab_size': 10, 'dtype': 'uint16', 'format': 'lm',
                      'counts': {s: {'tokens': 5, 'docs': 1} for s in SPLITS}}
    def interleaved(f, name, arr):
        if name == 'val.bin' and not second:  # the first prepare is half way: a second one starts
            with pytest.raises(common.PrepareError) as e:
                common.write_files(str(out), arrays(2), meta(2))
            second.append(str(e.value))
        return real(f, name, arr)
    monkeypatch.setattr(common, '_write_array', interleaved)
    common.write_files(str(out), arrays(1), meta(1))
    assert second == [f'{out}: another prepare is writing this folder: wait for it to end, then rerun this one if you '
                      f'still need it']
    assert common.check_dataset(str(out))['files'] and all(
        np.fromfile(out / f'{s}.bin', np.uint16).tolist() == [1] * 5 for s in SPLITS)
    assert sorted(os.listdir(out)) == ['meta.json', 'test.bin', 'train.bin', 'val.bin']


def test_dataset_named_after_its_folder(tmp_path):
    write_text(tmp_path / 'input.txt', 'hello world, the tiny text. ' * 20)
    run_prepare('shakespeare_char', '--src', tmp_path, '--out_dir', tmp_path / 'tiny')
    assert json.loads((tmp_path / 'tiny' / 'meta.json').read_text())['name'] == 'tiny'


@pytest.fixture(scope='module')
def needle_dir(tmp_path_factory):
    """A small needle dataset, prepared once; tests copy it before breaking it."""
    out = tmp_path_factory.mktemp('prepared') / 'needle'
    run_prepare('needle', '--out_dir', out, '--n_train', 24, '--n_val', 8, '--n_test', 8, '--seq_len', 32)
    return out

def copy_of(src, dest):
    shutil.copytree(src, dest)
    return dest

def drop_files_entry(d, keys=('files',)):
    """Make d's meta.json look like an older prepare's (without 'files', or also without other keys)."""
    meta = json.loads((d / 'meta.json').read_text())
    for k in keys:
        del meta[k]
    (d / 'meta.json').write_text(json.dumps(meta))

def overwrite(path, offset, data):
    with open(path, 'r+b') as f:
        f.seek(offset)
        f.write(data)

RERUN = 'rerun python data/needle/prepare.py'
CHECK_CASES = {  # name: (how to break the needle dataset, drop meta['files'] first, expected message parts)
    'meta missing': (lambda d: (d / 'meta.json').unlink(), False,
                     ['meta.json: missing: prepare the dataset first: python data/needle/prepare.py --out_dir']),
    'corrupt json': (lambda d: (d / 'meta.json').write_text('{"name": "needle", '), False,
                     ['meta.json: corrupt JSON', RERUN]),
    'json not an object': (lambda d: (d / 'meta.json').write_text('[1, 2]'), False,
                           ['meta.json: expected a JSON object']),
    'listed file missing': (lambda d: (d / 'val.labels.npy').unlink(), False,
                            ['val.labels.npy: missing (meta.json lists it)', RERUN]),
    'size differs': (lambda d: open(d / 'test.bin', 'ab').write(b'\0\0'), False,
                     ['test.bin: 514 bytes, meta.json says 512: the file was rewritten after prepare', RERUN]),
    'sha256 differs': (lambda d: overwrite(d / 'train.bin', 10, b'\x07\x00'), False,
                       ['train.bin: sha256 differs from meta.json: the file was rewritten after prepare', RERUN]),
    'empty bin (old meta)': (lambda d: open(d / 'val.bin', 'wb').close(), True, ['val.bin: empty', RERUN]),
    'odd length (old meta)': (lambda d: open(d / 'train.bin', 'ab').write(b'\0'), True,
                              ['train.bin: 1,537 bytes is not a multiple of the uint16 size (2)']),
    'token count (old meta)': (lambda d: open(d / 'train.bin', 'ab').write(b'\0\0'), True,
                               ['train.bin: holds 769 tokens, meta.json counts 768: the file was rewritten']),
    'token >= vocab (old meta)': (lambda d: overwrite(d / 'test.bin', 6, np.uint16(300).tobytes()), True,
                                  ['test.bin: token id 300 >= vocab_size 300', RERUN]),
    'bin missing (old meta)': (lambda d: (d / 'test.bin').unlink(), True, ['test.bin: missing']),
    'bad offsets (old meta)': (lambda d: np.save(d / 'val.idx.npy', np.arange(9) * 31), True,
                               ['val.idx.npy: not increasing document offsets from 0 to the 256 tokens of val.bin']),
    'label range (old meta)': (lambda d: np.save(d / 'train.labels.npy', np.full(24, 4)), True,
                               ['train.labels.npy: label 4 outside 0..3']),
    'labels count (old meta)': (lambda d: np.save(d / 'train.labels.npy', np.zeros(23, np.int64)), True,
                                ['train.labels.npy: 23 labels for 24 documents']),
    'npy corrupt (old meta)': (lambda d: (d / 'test.idx.npy').write_bytes(b'garbage'), True,
                               ['test.idx.npy: not a readable .npy file']),
}

@pytest.mark.parametrize('case', CHECK_CASES)
def test_check_dataset_errors(needle_dir, tmp_path, case):
    breaks, old_meta, parts = CHECK_CASES[case]
    d = copy_of(needle_dir, tmp_path / 'needle')
    assert common.check_dataset(str(d))['name'] == 'needle'
    if old_meta:
        drop_files_entry(d, ('files', 'format', 'command'))
        assert 'files' not in common.check_dataset(str(d))  # an older prepare's meta.json passes as it is
    breaks(d)
    with pytest.raises(common.DatasetError) as e:
        common.check_dataset(str(d))
    msg = str(e.value)
    assert '\n' not in msg and all(p in msg for p in parts), msg
    assert msg.startswith(str(d))  # names the file

def test_check_dataset_sizes_without_hashes(needle_dir, tmp_path):
    d = copy_of(needle_dir, tmp_path / 'needle')
    overwrite(d / 'train.bin', 10, b'\x07\x00')
    assert common.check_dataset(str(d), verify_hashes=False)['name'] == 'needle'
    with pytest.raises(common.DatasetError, match='sha256'):
        common.check_dataset(str(d))

@pytest.mark.parametrize('folder, hint', [
    ('shakespeare_char', 'python data/shakespeare_char/prepare.py --out_dir {d}'),
    ('needle2048', 'python data/needle/prepare.py --out_dir {d} (with the options it was made with)'),
    ('mqar_short', 'python data/mqar/prepare.py --out_dir {d}'),
    ('mystery', 'python data/mystery/prepare.py (no such script: one of data/{'),
])
def test_check_dataset_missing_meta_hint(tmp_path, folder, hint):
    d = tmp_path / folder
    d.mkdir()
    with pytest.raises(common.DatasetError) as e:
        common.check_dataset(str(d))
    assert str(e.value).startswith(f"{d / 'meta.json'}: missing: prepare the dataset first: ")
    assert hint.replace('{d}', str(d)) in str(e.value)
    assert common._prepare_hint(os.path.join(REPO, 'data', 'imdb')) == 'python data/imdb/prepare.py'

SEQ_CASES = {  # name: (how to break a small mqar dataset whose meta.json has no 'files', expected message)
    'targets length': (lambda d: open(d / 'val.targets.bin', 'ab').write(b'\0\0'),
                       'val.targets.bin: 161 targets for the 160 tokens of val.bin'),
    'target below -1': (lambda d: overwrite(d / 'test.targets.bin', 0, np.int16(-2).tobytes()),
                        'test.targets.bin: target -2 outside -1..63'),
    'target >= vocab': (lambda d: overwrite(d / 'test.targets.bin', 0, np.int16(64).tobytes()),
                        'test.targets.bin: target 64 outside -1..63'),
    'not whole rows': (lambda d: open(d / 'train.bin', 'ab').write(b'\0\0'), 'train.bin: holds 641 tokens'),
    'targets missing': (lambda d: (d / 'test.targets.bin').unlink(), 'test.targets.bin: missing'),
}

@pytest.fixture(scope='module')
def mqar_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp('prepared') / 'mqar'
    run_prepare('mqar', '--out_dir', out, '--n_train', 20, '--n_val', 5, '--n_test', 5, '--seq_len', 32,
                '--n_pairs', 4, '--vocab_size', 64)
    return out

@pytest.mark.parametrize('case', SEQ_CASES)
def test_check_dataset_seq_format(mqar_dir, tmp_path, case):
    d = copy_of(mqar_dir, tmp_path / 'mqar')
    assert common.check_dataset(str(d))['format'] == 'seq'
    drop_files_entry(d)
    breaks, message = SEQ_CASES[case]
    breaks(d)
    with pytest.raises(common.DatasetError) as e:
        common.check_dataset(str(d))
    assert message in str(e.value) and 'rerun python data/mqar/prepare.py' in str(e.value), str(e.value)

# -----------------------------------------------------------------------------
# bad, corrupt and too-small raw files: `error: <file>: <problem>`, exit 1, nothing written

def xz_bytes(text):
    return lzma.compress(text.encode('utf-8'))

IMDB_HEAD = 'id,label,rating,text\n'
IMDB_ROWS = ''.join(f'neg/{i}_1,{i % 2},1,review {i}\n' for i in range(20))
BAD_INPUTS = {  # name: (script, extra args, {file: bytes}, the file named in the error, problem)
    'corrupt xz': ('shakespeare_char', [], {'input.txt.xz': b'\xfd7zXZ\0' + bytes(range(200))}, 'input.txt.xz',
                   'corrupt .xz file'),
    'not xz at all': ('shakespeare_char', [], {'input.txt.xz': b'hello' * 20}, 'input.txt.xz', 'corrupt .xz file'),
    'truncated xz': ('shakespeare_char', [], {'input.txt.xz': xz_bytes('First Citizen:\n' * 500)[:60]},
                     'input.txt.xz', 'truncated .xz file'),
    'not utf-8': ('shakespeare_char', [], {'input.txt': b'abc\xff\xfedef' * 20}, 'input.txt',
                  'not UTF-8 text (invalid start byte: byte 0xff)'),
    'too small text': ('shakespeare_char', [], {'input.txt': b'sixteen chars!!\n'}, 'input.txt',
                       '16 characters; need at least 31 to make non-empty train/val/test splits'),
    'imdb wrong columns': ('imdb', [], {'train.csv': (IMDB_HEAD + IMDB_ROWS + 'neg/x_1,0,1\n').encode(),
                                        'test.csv': (IMDB_HEAD + IMDB_ROWS).encode()},
                           'train.csv', 'line 22: expected 4 columns, got 3'),
    'imdb label not an integer': ('imdb', [], {'train.csv': (IMDB_HEAD + 'neg/0_1,neg,1,"a\nb"\n').encode(),
                                               'test.csv': (IMDB_HEAD + IMDB_ROWS).encode()},
                                  'train.csv', "line 2: column 2 (label): expected an integer in 0..1, got 'neg'"),
    'imdb label out of range': ('imdb', [], {'train.csv': (IMDB_HEAD + IMDB_ROWS).encode(),
                                             'test.csv': (IMDB_HEAD + 'a,0,1,"x\ny"\nb,7,1,t\n').encode()},
                                'test.csv', 'line 4: column 2 (label): expected an integer in 0..1, got 7'),
    'imdb no header': ('imdb', [], {'train.csv': IMDB_ROWS.encode(), 'test.csv': (IMDB_HEAD + IMDB_ROWS).encode()},
                       'train.csv', "line 1: expected the header 'id,label,rating,text'"),
    'imdb not utf-8 (.xz)': ('imdb_bytes', [], {'train.csv.xz': lzma.compress((IMDB_HEAD + IMDB_ROWS).encode()
                                                                              + b'latin-1 \xe9t\xe9\n'),
                                                'test.csv': (IMDB_HEAD + IMDB_ROWS).encode()},
                             'train.csv.xz', 'not UTF-8 text'),
    'imdb too few rows': ('imdb', [], {'train.csv': (IMDB_HEAD + IMDB_ROWS * 10).encode(),
                                       'test.csv': (IMDB_HEAD + IMDB_ROWS).encode()},
                          'train.csv', '200 documents; need at least 2,501 to make non-empty train/val/test splits '
                                       'with --n_val 2500 (val is drawn from train)'),
    'imdb empty test': ('imdb', ['--n_val', 5], {'train.csv': (IMDB_HEAD + IMDB_ROWS).encode(),
                                                 'test.csv': IMDB_HEAD.encode()},
                        'test.csv', 'no documents; need at least 1 to make non-empty train/val/test splits'),
    'agnews label out of range': ('agnews', [], {'train.csv': b'"5","t","d"\n', 'test.csv': b'"1","t","d"\n'},
                                  'train.csv', 'line 1: column 1: expected an integer in 1..4, got 5'),
    'agnews too few rows': ('agnews', [], {'train.csv': b'"1","t","d"\n' * 10, 'test.csv': b'"1","t","d"\n'},
                            'train.csv', '10 documents; need at least 11 to make non-empty train/val/test splits '
                                         'with --val_frac 0.05'),
    'hyperpartisan extra tab': ('hyperpartisan', [], {
        'semeval2019_byarticle_train.tsv': b'sentence\tlabel\na\t1\nb\tc\t0\n',
        'semeval2019_byarticle_test.tsv': b'sentence\tlabel\na\t1\n'},
        'semeval2019_byarticle_train.tsv', 'line 3: expected 2 columns, got 3'),
    'wikitext too short': ('wikitext2', [], {'wiki.train.raw': b' = A = \n text \n', 'wiki.valid.raw': b'v',
                                             'wiki.test.raw': b' t t t \n'},
                           'wiki.valid.raw', "1 token(s) after tokenizing; an LM split needs at least 2"),
}

@pytest.mark.parametrize('case', BAD_INPUTS)
def test_bad_raw_files(tmp_path, case):
    script, extra, files, named, problem = BAD_INPUTS[case]
    src = tmp_path / 'src'
    src.mkdir()
    for name, data in files.items():
        (src / name).write_bytes(data)
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'meta.json').write_text('{}')  # an old dataset's: stays until a prepare actually writes
    p = run_prepare(script, '--src', src, '--out_dir', out, *extra, check=False)
    lines = p.stderr.strip().splitlines()  # tqdm's progress bars may come first
    assert p.returncode == 1 and 'Traceback' not in p.stderr, p.stderr
    assert [line for line in lines if 'error' in line] == lines[-1:], p.stderr
    assert lines[-1].startswith(f'error: {src / named}: ') and problem in lines[-1], lines[-1]
    assert sorted(os.listdir(out)) == ['meta.json']

@pytest.mark.parametrize('script', ['shakespeare_char', 'imdb', 'wikitext103'])
def test_src_must_be_a_directory(tmp_path, script):
    """A --src that does not exist (or is a file) is an error, not a silent fall-back to the mirror."""
    for src in (tmp_path / 'no-such-dir', tmp_path / 'a-file'):
        (tmp_path / 'a-file').write_text('x')
        p = run_prepare(script, '--src', src, '--out_dir', tmp_path / 'out', mirror=MIRROR, check=False)
        assert p.returncode == 1 and p.stderr.strip() == f'error: {src}: --src is not an existing directory', p.stderr
        assert not (tmp_path / 'out').exists()

def test_read_rows_rules(tmp_path):
    path = tmp_path / 't.csv'
    write_text(path, 'a,b\n\n1,x\n"2\n",y\n3,z\n')
    assert common.read_rows(str(path), ncols=2, header=('a', 'b'), ints={0: range(4)}) == [[1, 'x'], [2, 'y'], [3, 'z']]
    assert common.read_rows(str(path)) == [['a', 'b'], ['1', 'x'], ['2\n', 'y'], ['3', 'z']]
    with pytest.raises(common.PrepareError, match=r"line 6: column 1 \(a\): expected an integer in 0..2, got 3"):
        common.read_rows(str(path), header=('a', 'b'), ints={0: range(3)})
    write_text(path, '')
    with pytest.raises(common.PrepareError, match='empty file'):
        common.read_rows(str(path), header=('a', 'b'))

@pytest.mark.parametrize('val, n, need', [(10, 10, 11), (0.05, 10, 11), (0.15, 3, 4), (0.5, 1, 2), (0.9, 4, 5)])
def test_split_train_val_minimum(val, n, need):
    docs = ([str(i) for i in range(n)], [0] * n)
    with pytest.raises(common.PrepareError, match=f'train.csv: {n} documents; need at least {need} to make '):
        common.split_train_val(docs, docs, val, names=('train.csv', 'test.csv'))
    docs = ([str(i) for i in range(need)], [0] * need)
    s = common.split_train_val(docs, docs, val)
    assert all(len(s[k][0]) >= 1 for k in SPLITS)

# -----------------------------------------------------------------------------
# needle task

# sha256(x.numpy().tobytes() + y.numpy().tobytes())[:16] of the removed data/needle.py's make_needle
NEEDLE_DIGESTS = [
    (dict(n=300, seed=3), '2de1523eb94eb304'),
    (dict(n=5000, seed=0), '58a028405c6cd18d'),  # the default train split
    (dict(n=1000, seed=1), '543567941c767d4b'),  # test
    (dict(n=1000, seed=2), 'cd1d3d57da2dec3a'),  # val
    (dict(n=50, seq_len=64, vocab_size=40, noise_lo=20, needle_span=(0.5, 0.5), n_classes=2, ids_per_class=3,
          first_id=5, seed=0), 'c5e05b4b2e22d5bd'),
    (dict(n=64, seq_len=2048, needle_span=(0.0, 1.0), seed=7), '43f321f5124e9e68'),
]

@pytest.mark.parametrize('kwargs, digest', NEEDLE_DIGESTS)
def test_make_needle_unchanged(kwargs, digest):
    import hashlib
    x, y = make_needle(**kwargs)
    assert hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()[:16] == digest

def test_needle_task():
    x, y = make_needle(300, seed=3)
    assert x.shape == (300, 512) and y.shape == (300,) and x.dtype == y.dtype == torch.long
    needle = x < 200
    assert needle.sum(1).eq(1).all() and x.max() < 300  # exactly one non-noise token per row
    pos = needle.float().argmax(1)
    ids = x[torch.arange(300), pos]
    assert pos.max() < 51 and ((ids >= 10) & (ids < 30)).all()  # floor(0.1 * 512) = 51
    assert torch.equal(y, (ids - 10) // 5) and set(y.tolist()) == {0, 1, 2, 3}
    assert len(set(pos.tolist())) > 30 and len(set(ids.tolist())) == 20
    x2, y2 = make_needle(300, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = make_needle(300, seed=4)
    assert not torch.equal(x, x3)

def test_needle_options():
    x, y = make_needle(50, seq_len=64, vocab_size=40, noise_lo=20, needle_span=(0.5, 0.5), n_classes=2,
                       ids_per_class=3, first_id=5, seed=0)
    pos = (x < 20).float().argmax(1)
    assert (x < 20).sum(1).eq(1).all() and pos.eq(32).all()  # an empty span still gets one position
    assert torch.equal(y, (x[torch.arange(50), pos] - 5) // 3)
    x, _ = make_needle(20, seq_len=10, needle_span=(0.9, 1.0))
    assert (x < 200).float().argmax(1).eq(9).all()
    for bad in (dict(first_id=190), dict(noise_lo=300), dict(needle_span=(0.2, 0.1)), dict(needle_span=(1.0, 1.0)),
                dict(n_classes=0), dict(seq_len=0), dict(n=-1)):
        with pytest.raises(ValueError):
            make_needle(**{'n': 4, **bad})

def test_needle_prepare_round_trip(needle_dir, tmp_path):
    meta, data = load(needle_dir)
    assert {k: meta[k] for k in ('name', 'format', 'tokenizer', 'vocab_size', 'dtype', 'eot_token', 'pad_token',
                                 'n_classes', 'label_names')} == \
        {'name': 'needle', 'format': 'classify', 'tokenizer': 'ids', 'vocab_size': 300, 'dtype': 'uint16',
         'eot_token': None, 'pad_token': None, 'n_classes': 4, 'label_names': ['class0', 'class1', 'class2', 'class3']}
    assert meta['counts'] == {'train': {'tokens': 768, 'docs': 24}, 'val': {'tokens': 256, 'docs': 8},
                              'test': {'tokens': 256, 'docs': 8}}
    g = meta['generator']
    assert g['split_seeds'] == {'train': 0, 'val': 2, 'test': 1} and g['needle_span'] == [0.0, 0.1]
    assert (g['seq_len'], g['vocab_size'], g['noise_lo'], g['n_classes'], g['ids_per_class'], g['first_id'],
            g['n_train'], g['n_val'], g['n_test'], g['seed']) == (32, 300, 200, 4, 5, 10, 24, 8, 8, 0)
    assert meta['command'].startswith('python data/needle/prepare.py --out_dir ')
    for split, n, seed in (('train', 24, 0), ('val', 8, 2), ('test', 8, 1)):
        x, y = make_needle(n, seq_len=32, seed=seed)
        docs, labels = data[split]
        assert np.array_equal(np.stack(docs), x.numpy()) and np.array_equal(labels, y.numpy())
    encode, decode = common.load_codec(meta)
    assert encode(decode(data['val'][0][0].tolist())) == data['val'][0][0].tolist()

@pytest.mark.parametrize('args, positions', [
    (['--span', '0.0', '1.0'], range(0, 64)),          # "needle anywhere"
    (['--span', '0.5', '0.5'], [32]),                  # an empty span still gets one position
    (['--span', '0.9', '1.0', '--n_classes', '2', '--vocab_size', '250'], range(57, 64)),
])
def test_needle_prepare_span(tmp_path, args, positions):
    out = tmp_path / 'needle64'
    run_prepare('needle', '--out_dir', out, '--seq_len', 64, '--n_train', 400, '--n_val', 5, '--n_test', 5,
                '--seed', 9, *args)
    meta, data = load(out)
    assert meta['name'] == 'needle64' and meta['generator']['needle_span'] == [float(a) for a in args[1:3]]
    x = np.stack(data['train'][0])
    pos = (x < 200).argmax(1)
    assert ((x < 200).sum(1) == 1).all() and set(pos.tolist()) <= set(positions)
    assert len(set(pos.tolist())) >= min(len(positions), 40)
    assert set(data['train'][1].tolist()) == set(range(meta['n_classes']))

@pytest.mark.parametrize('args, message', [
    (['--span', '0.2', '0.1'], 'error: needle arguments: needle_span=(0.2, 0.1) must satisfy'),
    (['--vocab_size', '150'], 'error: needle arguments: need 0 <= noise_lo < vocab_size'),
    (['--n_val', '0'], 'error: --n_val: 0: need at least 1 sequence per split to make non-empty train/val/test splits'),
])
def test_needle_prepare_bad_args(tmp_path, args, message):
    p = run_prepare('needle', '--out_dir', tmp_path / 'n', *args, check=False)
    assert p.returncode == 1 and p.stderr.startswith(message) and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (tmp_path / 'n' / 'meta.json').exists()

# -----------------------------------------------------------------------------
# MQAR (Zoology's multi-query associative recall)

def test_mqar_structure():
    n, L, N, V = 600, 64, 8, 128
    x, y = mqar.make_mqar(n, seq_len=L, n_pairs=N, vocab_size=V, seed=1)
    assert x.shape == y.shape == (n, L) and x.dtype == np.uint16 and y.dtype == np.int16
    x, y = x.astype(np.int64), y.astype(np.int64)
    keys, values = x[:, 0:2 * N:2], x[:, 1:2 * N:2]
    assert ((keys >= 1) & (keys < V // 2)).all() and ((values >= V // 2) & (values < V)).all()
    assert all(len(set(k)) == N for k in keys.tolist()) and all(len(set(v)) == N for v in values.tolist())
    assert (y[:, :2 * N] == -1).all()
    q = y != -1
    assert (q.sum(1) == N).all() and not q[:, 2 * N + 1::2].any()  # queries at 2N + 2g only
    r, p = np.nonzero(q)
    i = np.argmax(keys[r] == x[r, p][:, None], axis=1)  # which pair the query's key is
    assert (keys[r, i] == x[r, p]).all() and (y[r, p] == values[r, i]).all()  # the target is the key's value
    assert all(sorted(row) == list(range(N)) for row in i.reshape(n, N).tolist())  # every key queried once
    rest = x[:, 2 * N:][~q[:, 2 * N:]]
    assert (rest == 0).all()
    # keys and values cover their ranges, and the draws differ between rows
    assert len(np.unique(keys)) > 55 and len(np.unique(values)) > 55 and len({tuple(k) for k in keys.tolist()}) == n

def test_mqar_gap_law():
    """The i-th key is queried at the i-th gap drawn without replacement with P(g) ~ (g+1)^(alpha-1): the first
    key's gap follows the law exactly; short gaps dominate at alpha = 0.01, none do at alpha = 1."""
    n, L, N = 20000, 64, 8
    space = (L - 2 * N) // 2
    for alpha in (0.01, 1.0):
        x, y = mqar.make_mqar(n, seq_len=L, n_pairs=N, vocab_size=128, alpha=alpha, seed=2)
        q = x[:, 2 * N::2]
        first = np.argmax(q == x[:, :1], axis=1)  # gap of key 1
        hist = np.bincount(first, minlength=space) / n
        law = np.arange(1, space + 1) ** (alpha - 1.0)
        law /= law.sum()
        assert 0.5 * np.abs(hist - law).sum() < 0.02, (alpha, hist, law)
        taken = (y[:, 2 * N::2] != -1).mean(0)  # how often each gap holds a query
        assert abs(taken.mean() - N / space) < 1e-9
        if alpha < 1:
            assert hist[0] > 0.2 and hist[:3].sum() > 0.4 and taken[0] > 0.9 > 0.2 > taken[-1]
            assert (np.diff(taken) < 0.01).all()  # non-increasing, up to noise
        else:
            assert np.abs(taken - N / space).max() < 0.03

def test_gumbel_top_k_is_sequential_sampling():
    w = np.array([4.0, 2.0, 1.0, 1.0])
    draws = mqar.gumbel_top_k(np.random.default_rng(0), np.log(w), 200_000, 2)
    freq = Counter(map(tuple, draws.tolist()))
    p = {(i, j): w[i] / w.sum() * w[j] / (w.sum() - w[i]) for i in range(4) for j in range(4) if i != j}
    assert set(freq) == set(p) and max(abs(freq[k] / 200_000 - p[k]) for k in p) < 0.005

def test_sample_distinct_is_uniform():
    s = mqar.sample_distinct(np.random.default_rng(0), 100_000, 10, 15, 2)
    assert (s[:, 0] != s[:, 1]).all() and s.min() == 10 and s.max() == 14
    freq = Counter(map(tuple, s.tolist()))
    assert len(freq) == 20 and max(abs(c / 100_000 - 1 / 20) for c in freq.values()) < 0.004
    full = mqar.sample_distinct(np.random.default_rng(1), 50, 0, 7, 7)  # k = m: permutations
    assert (np.sort(full, 1) == np.arange(7)).all()

def test_mqar_deterministic_and_streams():
    a = mqar.make_mqar(5000, seq_len=32, n_pairs=4, vocab_size=64, seed=3)
    b = mqar.make_mqar(10, seq_len=32, n_pairs=4, vocab_size=64, seed=3)
    assert np.array_equal(a[0][:10], b[0]) and np.array_equal(a[1][:10], b[1])  # a prefix of a longer split
    assert np.array_equal(a[0], mqar.make_mqar(5000, seq_len=32, n_pairs=4, vocab_size=64, seed=3)[0])
    for other in (dict(seed=4), dict(seed=3, stream=1)):
        assert not np.array_equal(b[0], mqar.make_mqar(10, seq_len=32, n_pairs=4, vocab_size=64, **other)[0])
    r, yr = mqar.make_mqar(10, seq_len=32, n_pairs=4, vocab_size=64, seed=3, random_non_queries=True)
    assert np.array_equal(yr, b[1]) and np.array_equal(r[b[0] != 0], b[0][b[0] != 0]) and (r != 0).mean() > 0.9

def test_mqar_prepare_files(tmp_path):
    out = tmp_path / 'mqar'
    p = run_prepare('mqar', '--out_dir', out, '--n_train', 300, '--n_val', 20, '--n_test', 30, '--seq_len', 64,
                    '--n_pairs', 8, '--vocab_size', 128, '--seed', 5)
    assert 'train' in p.stdout
    meta = common.check_dataset(str(out))
    assert {k: meta[k] for k in ('name', 'format', 'tokenizer', 'vocab_size', 'dtype', 'target_dtype', 'seq_len',
                                 'n_pairs', 'alpha', 'eot_token', 'pad_token', 'n_classes', 'label_names')} == \
        {'name': 'mqar', 'format': 'seq', 'tokenizer': 'ids', 'vocab_size': 128, 'dtype': 'uint16',
         'target_dtype': 'int16', 'seq_len': 64, 'n_pairs': 8, 'alpha': 0.01, 'eot_token': None, 'pad_token': None,
         'n_classes': 0, 'label_names': []}
    assert set(meta['files']) == {f'{s}{x}' for s in SPLITS for x in ('.bin', '.targets.bin')}
    g = meta['generator']
    assert (g['seed'], g['n_train'], g['n_val'], g['n_test'], g['split_streams']) == \
        (5, 300, 20, 30, {'train': 0, 'val': 1, 'test': 2})
    xs = {}
    for s, n in (('train', 300), ('val', 20), ('test', 30)):
        assert meta['counts'][s] == {'tokens': n * 64, 'docs': n}
        x = np.fromfile(out / f'{s}.bin', np.uint16).reshape(n, 64)
        y = np.fromfile(out / f'{s}.targets.bin', np.int16).reshape(n, 64)
        want = mqar.make_mqar(n, seq_len=64, n_pairs=8, vocab_size=128, seed=5, stream=g['split_streams'][s])
        assert np.array_equal(x, want[0]) and np.array_equal(y, want[1])
        xs[s] = {r.tobytes() for r in x}
    assert not (xs['train'] & xs['val']) and not (xs['train'] & xs['test'])
    assert common.load_codec(meta)[0]('1 127') == [1, 127]

@pytest.mark.parametrize('args, message', [
    (['--seq_len', '64', '--n_pairs', '20'], 'error: mqar arguments: seq_len must be >= 4 * n_pairs = 80'),
    (['--vocab_size', '16', '--n_pairs', '8', '--seq_len', '64'],
     'error: mqar arguments: 8 distinct keys do not fit in [1, 8)'),
    (['--alpha', '0'], 'error: mqar arguments: alpha must be a positive number'),
    (['--n_test', '0'], 'error: --n_test: 0: need at least 1 sequence per split'),
])
def test_mqar_prepare_bad_args(tmp_path, args, message):
    p = run_prepare('mqar', '--out_dir', tmp_path / 'm', '--n_train', 10, *args, check=False)
    assert p.returncode == 1 and p.stderr.startswith(message) and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (tmp_path / 'm').exists()
