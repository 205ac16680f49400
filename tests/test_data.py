"""
Tests for data/: tokenizers, raw-file lookup, every prepare.py (on small fixtures, plain and .xz, run as
subprocesses) and, where the offline mirror ($MIPT_DATA_MIRROR, default ../shared/data) has small
files, on the real data. Also the synthetic needle task. No network is used.
"""
import csv
import io
import json
import lzma
import os
import random
import subprocess
import sys
import tarfile
import time
import zipfile
from collections import Counter

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, 'data'))
import common  # noqa: E402
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
    """Run data/<name>/prepare.py as a subprocess, downloads disabled, mirror = `mirror` (default: none)."""
    env = dict(os.environ, MIPT_NO_DOWNLOAD='1', MIPT_DATA_MIRROR=mirror or os.path.join(REPO, 'no-such-mirror'))
    p = subprocess.run([sys.executable, os.path.join(REPO, 'data', name, 'prepare.py'), *map(str, args)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
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
    enc, dec = common.load_codec({'tokenizer': 'char', 'chars': sorted(set(text))})
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
    run_prepare(name, '--src', tmp_path, '--out_dir', tmp_path / 'out')
    meta, data = load(tmp_path / 'out')
    assert meta['tokenizer'] == 'cl100k_base' and meta['dtype'] == 'uint32' and meta['eot_token'] == EOT
    assert meta['n_classes'] == 0 and meta['name'] == name
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
# needle task

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
