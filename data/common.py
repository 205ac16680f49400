"""
Shared helpers for the data/<name>/prepare.py scripts, and check_dataset for train.py. The tokenizers live
in the top-level codec.py (which sample.py imports without numpy); this module re-exports them.

A prepare script finds its raw files with find_source, turns them into texts and hands them to
write_dataset, which writes into the output directory (default: the script's own folder). Three on-disk
formats (meta['format']):

  'lm'        {train,val,test}.bin   flat token ids, one stream per split, no EOT, no idx / labels
  'classify'  {train,val,test}.bin   flat token ids, all documents of the split concatenated
              <split>.idx.npy        int64 offsets, length n_docs+1; doc i = bin[idx[i]:idx[i+1]]
              <split>.labels.npy     int64 labels in 0..n_classes-1
  'seq'       {train,val,test}.bin   flat token ids, n rows of meta['seq_len'] tokens (x)
              <split>.targets.bin    flat meta['target_dtype'] targets, one per token (y); -1 = ignored
  .bin dtype: uint16 when vocab_size <= 65536, else uint32.

  meta.json   {name, format, tokenizer, vocab_size, dtype, eot_token, pad_token, n_classes, label_names,
               counts: {split: {tokens, docs}}, source, command (how to rerun the prepare), chars (char only),
               files: {filename: {bytes, sha256}} for every data file}, plus per-format extras.

With cl100k_base every document ends with the EOT token (inside its idx range), so a classification
.bin doubles as an EOT-separated LM corpus. Every split must be non-empty (an LM split at least 2 tokens).

Writing is one unit (write_files), the output folder locked against another prepare meanwhile: an old
meta.json is deleted first, then every data file is written (each to a .tmp file of this process, then
renamed), then meta.json last, with the size and sha256 of the bytes written to every data file. A failed
write (a full disk) removes the files of that run and stops with one line.
check_dataset(data_dir) -> meta verifies a prepared dataset against its meta.json and raises
DatasetError (one line: the file and the problem) for anything missing, truncated, rewritten or out of range.

Raw files are looked up, each on its own, in: --src DIR, then $MIPT_DATA_MIRROR/<mirror subdir>,
then <out_dir>/raw/ (earlier downloads); failing that they are downloaded from the canonical URL
into <out_dir>/raw/ (MIPT_NO_DOWNLOAD=1 forbids downloads). Each may be plain or .xz. A raw file that
cannot be read (corrupt or truncated .xz, not UTF-8, a malformed CSV row) or that is too small stops the
script with `error: <file>: <problem>` (PrepareError), exit status 1.
"""
import argparse
import csv
import errno
import fcntl
import functools
import hashlib
import json
import lzma
import os
import re
import shlex
import shutil
import sys
import tarfile
import time
import urllib.parse
import urllib.request
import zipfile

import numpy as np
from tqdm import tqdm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # codec.py sits at the repo root; prepare scripts run from any cwd
    sys.path.insert(0, REPO)
from codec import (EOT_TEXT, ByteTokenizer, CharTokenizer, IdsTokenizer, _tiktoken,  # noqa: E402,F401 (re-exported)
                   get_tokenizer, load_codec)

SEED = 1337  # every seeded split / shuffle
MIRROR_ENV, NO_DOWNLOAD_ENV = 'MIPT_DATA_MIRROR', 'MIPT_NO_DOWNLOAD'
SPLITS = ('train', 'val', 'test')
PREPARE_COMMAND = None  # set by cli(): the command line that reruns the current prepare script

def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 65536 else np.uint32

# -----------------------------------------------------------------------------
# errors

class SourceError(RuntimeError):
    """A raw file could not be found or downloaded; the message says how to provide it."""

class PrepareError(RuntimeError):
    """A raw file (or an argument) that cannot make a dataset; str() is one line, '<file>: <problem>'."""

    def __init__(self, file, problem):
        self.file, self.problem = file, _one_line(problem)
        super().__init__(f'{file}: {self.problem}' if file is not None else self.problem)

class DatasetError(RuntimeError):
    """A prepared dataset that does not match its meta.json; str() is one line naming the file and the problem."""

def _one_line(x):
    return ' '.join(str(x).split()) or type(x).__name__

# -----------------------------------------------------------------------------
# raw sources

def open_text(path):
    """Open a UTF-8 text file for reading, decompressing .xz; line endings are kept as they are."""
    if path.endswith('.xz'):
        return lzma.open(path, 'rt', encoding='utf-8', newline='')
    return open(path, encoding='utf-8', newline='')

def _read_problem(e):
    """The PrepareError problem for an exception raised while reading a raw file, or None."""
    if isinstance(e, UnicodeDecodeError):
        return f'not UTF-8 text ({e.reason}: byte 0x{e.object[e.start]:02x})'
    if isinstance(e, lzma.LZMAError):
        return f'corrupt .xz file ({_one_line(e)})'
    if isinstance(e, EOFError):
        return f'truncated .xz file ({_one_line(e)})'
    if isinstance(e, csv.Error):
        return f'malformed CSV ({_one_line(e)})'
    if isinstance(e, OSError):
        return f'cannot read ({_one_line(e.strerror or e)})'
    return None

def read_text(path):
    try:
        with open_text(path) as f:
            return f.read()
    except Exception as e:
        problem = _read_problem(e)
        if problem is None:
            raise
        raise PrepareError(path, problem) from None

def read_rows(path, ncols=None, header=None, ints=None, **csv_kwargs):
    """The rows of a (plain or .xz) csv/tsv file, as lists of strings; blank lines are skipped.
    header: the expected first row, checked and dropped. ncols: every row must have exactly this many
    fields. ints: {column: range of allowed values}: those fields become ints. Unreadable files and rows
    that break these rules raise PrepareError naming the file and the line."""
    rows, ints, need_header = [], ints or {}, header is not None
    try:
        with open_text(path) as f:
            reader, line = csv.reader(f, **csv_kwargs), 1
            for row in reader:
                start, line = line, reader.line_num + 1  # a quoted field may span lines
                if not row:
                    continue
                if need_header:
                    if row != list(header):
                        shown = ','.join(row)[:80]
                        raise PrepareError(path, f"line {start}: expected the header {','.join(header)!r}, "
                                                 f"got {shown!r}")
                    need_header = False
                    continue
                if ncols is not None and len(row) != ncols:
                    raise PrepareError(path, f'line {start}: expected {ncols} columns, got {len(row)}')
                for col, allowed in ints.items():
                    try:
                        value = int(row[col])
                    except (ValueError, IndexError):
                        value = None
                    if value not in allowed:
                        got = value if value is not None else repr(row[col][:40]) if col < len(row) else 'nothing'
                        name = f' ({header[col]})' if header else ''
                        raise PrepareError(path, f'line {start}: column {col + 1}{name}: expected an integer in '
                                                 f'{allowed.start}..{allowed.stop - 1}, got {got}')
                    row[col] = value
                rows.append(row)
    except PrepareError:
        raise
    except Exception as e:
        problem = _read_problem(e)
        if problem is None:
            raise
        raise PrepareError(path, problem) from None
    if need_header:
        raise PrepareError(path, f"empty file: expected the header {','.join(header)!r} and rows")
    return rows

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
# splits

def _smallest(ok, limit=10 ** 9):
    """The smallest n >= 1 with ok(n) (ok monotone from some point on), by doubling then bisection."""
    hi = 1
    while not ok(hi):
        hi *= 2
        if hi > limit:
            return None
    lo = hi // 2
    while lo + 1 < hi:  # ok(hi), not ok(lo) (or lo = 0)
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    for n in range(max(1, hi - 64), hi):  # round() is not monotone near .5: look just below, too
        if ok(n):
            return n
    return hi

def split_train_val(train, test, val, seed=SEED, names=('train', 'test')):
    """Draw val from train and shuffle the doc order within every split (so LM windows mix labels), seeded.
    train, test: (texts, labels); val: a count (int, the --n_val flag) or a fraction of train (float, --val_frac).
    names: the train and test files, for the messages. Every split must be non-empty (else PrepareError).
    Returns {'train' | 'val' | 'test': (texts, labels)}."""
    frac = isinstance(val, float)
    n_val_of = (lambda n: round(val * n)) if frac else (lambda n: val)
    flag = f'--val_frac {val}' if frac else f'--n_val {val}'
    if (frac and not 0.0 < val < 1.0) or (not frac and val < 1):
        raise PrepareError(None, f'{flag}: val must be a fraction in (0, 1) or a count >= 1, to make a non-empty '
                                 f'val split')
    n = len(train[0])
    if not (n_val_of(n) >= 1 and n - n_val_of(n) >= 1):
        need = _smallest(lambda m: n_val_of(m) >= 1 and m - n_val_of(m) >= 1)
        raise PrepareError(names[0], f'{n:,} documents; need at least {need:,} to make non-empty train/val/test '
                                     f'splits with {flag} (val is drawn from train)')
    if len(test[0]) < 1:
        raise PrepareError(names[1], 'no documents; need at least 1 to make non-empty train/val/test splits')
    n_val = n_val_of(n)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    pick = lambda docs, ix: ([docs[0][i] for i in ix], [docs[1][i] for i in ix])
    return {'train': pick(train, perm[n_val:]), 'val': pick(train, perm[:n_val]),
            'test': pick(test, rng.permutation(len(test[0])))}

# -----------------------------------------------------------------------------
# writers

def _atomic_write(path, write, binary=True):
    """write(f) into a temporary file of this process, then rename it to path (on failure: removed).
    -> what write returned."""
    tmp = f'{path}.{os.getpid()}.tmp'
    try:
        with open(tmp, 'wb') if binary else open(tmp, 'w', encoding='utf-8', newline='') as f:
            out = write(f)
        os.replace(tmp, path)
        return out
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise

def sha256_file(path):
    with open(path, 'rb') as f:
        return hashlib.file_digest(f, 'sha256').hexdigest()

class _Stamped:
    """A file opened for writing that counts and hashes every byte written through it."""

    def __init__(self, f):
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def write(self, b):
        self.sha.update(b)
        self.bytes += memoryview(b).nbytes
        return self.f.write(b)

def _write_array(f, name, arr):
    """name.npy with np.save, anything else as raw bytes in C order (in pieces of 16 MiB). -> the stamp of the
    bytes written: {bytes, sha256}."""
    f = _Stamped(f)
    if name.endswith('.npy'):
        np.save(f, arr)
    else:
        flat = memoryview(np.ascontiguousarray(arr).reshape(-1)).cast('B')
        for i in range(0, len(flat), 1 << 24):
            f.write(flat[i:i + (1 << 24)])
    return {'bytes': f.bytes, 'sha256': f.sha.hexdigest()}

def write_files(out_dir, arrays, meta):
    """Write one dataset as a unit, out_dir locked against another prepare meanwhile: delete out_dir/meta.json,
    write every array (name.npy with np.save, anything else as raw bytes, C order; each to a temporary file of
    this process, then renamed), then meta.json last with meta['files'] = {name: {bytes, sha256}} of the bytes
    written (and meta['command'] from cli, if not set). Returns the meta written. A failed write (a full disk)
    removes the dataset's files and raises PrepareError."""
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, 'meta.json')
    lock = os.open(out_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise PrepareError(out_dir, 'another prepare is writing this folder: wait for it to end, then rerun '
                                        'this one if you still need it') from None
        if os.path.lexists(meta_path):
            os.remove(meta_path)
        files, path = {}, None
        try:
            for name, arr in arrays.items():
                path = os.path.join(out_dir, name)
                files[name] = _atomic_write(path, lambda f: _write_array(f, name, arr))
            meta = dict(meta)
            if PREPARE_COMMAND and 'command' not in meta:
                meta['command'] = PREPARE_COMMAND
            meta['files'] = files
            path = meta_path
            _atomic_write(meta_path, lambda f: json.dump(meta, f, indent=1), binary=False)
        except OSError as e:
            for name in arrays:  # meta.json is gone: the dataset's other files are of no use either
                if os.path.lexists(os.path.join(out_dir, name)):
                    os.remove(os.path.join(out_dir, name))
            why = ('disk full (no space left on the device)' if e.errno == errno.ENOSPC else
                   _one_line(e.strerror or e))
            raise PrepareError(path, f'{why}: nothing of this dataset was kept; free some space (or pick another '
                                     f'--out_dir) and rerun') from None
    finally:
        os.close(lock)
    return meta

def write_dataset(out_dir, name, tokenizer, splits, source, label_names=(), chars=None, max_len=None, origins=None):
    """Tokenize and write a dataset in the 'lm' or 'classify' format of the module docstring, print a summary,
    return meta. splits: {split: text} for an LM stream, or {split: (texts, labels)} for labelled documents.
    origins: {split: file} for the messages. A split that comes out empty (an LM split: under 2 tokens)
    raises PrepareError before anything is written."""
    t0 = time.time()
    tok = get_tokenizer(tokenizer, chars)
    dtype = token_dtype(tok.n_vocab)
    counts, label_counts, arrays = {}, {}, {}
    for split, data in splits.items():
        what = (origins or {}).get(split, f'the {split} split')
        if isinstance(data, str):
            ids = encode_stream(tok, data, desc=split)
            if len(ids) < 2:
                raise PrepareError(what, f'{len(ids)} token(s) after tokenizing; an LM split needs at least 2 '
                                         f'(an input and its next-token target)')
            counts[split] = {'tokens': len(ids), 'docs': 1}
        else:
            texts, labels = data
            labels = np.asarray(labels, dtype=np.int64)
            assert len(labels) == len(texts) and np.all((0 <= labels) & (labels < len(label_names))), 'bad labels'
            if len(texts) == 0:
                raise PrepareError(what, f'no documents for the {split} split')
            docs = encode_docs(tok, texts, max_len=max_len, desc=split)
            idx = np.concatenate([[0], np.cumsum([len(d) for d in docs], dtype=np.int64)]).astype(np.int64)
            ids = np.concatenate([np.zeros(0, dtype)] + docs)
            if len(ids) == 0:
                raise PrepareError(what, f'all {len(texts):,} documents of the {split} split are empty')
            arrays[f'{split}.idx.npy'], arrays[f'{split}.labels.npy'] = idx, labels
            counts[split] = {'tokens': len(ids), 'docs': len(docs)}
            label_counts[split] = np.bincount(labels, minlength=len(label_names)).tolist()
        arrays[f'{split}.bin'] = ids
    meta = {'name': name, 'format': 'classify' if label_names else 'lm', 'tokenizer': tokenizer,
            'vocab_size': tok.n_vocab, 'dtype': np.dtype(dtype).name, 'eot_token': tok.eot_token,
            'pad_token': getattr(tok, 'pad_token', None), 'n_classes': len(label_names),
            'label_names': list(label_names), 'counts': counts, 'source': source}
    if tokenizer == 'char':
        meta['chars'] = tok.chars
    meta = write_files(out_dir, arrays, meta)
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
# checking a prepared dataset

def _prepare_hint(data_dir):
    """The command that (re)makes data_dir, guessed from its folder name."""
    data_dir = os.path.normpath(data_dir)
    name = os.path.basename(data_dir)
    scripts = sorted(d for d in os.listdir(os.path.join(REPO, 'data'))
                     if os.path.isfile(os.path.join(REPO, 'data', d, 'prepare.py')))
    home = lambda d: os.path.realpath(data_dir) == os.path.realpath(os.path.join(REPO, 'data', d))
    if name in scripts:
        return f'python data/{name}/prepare.py' + ('' if home(name) else f' --out_dir {data_dir}')
    prefix = [d for d in scripts if name.startswith(d)]
    if prefix:  # e.g. data/needle2048 made by data/needle/prepare.py
        d = max(prefix, key=len)
        return f'python data/{d}/prepare.py --out_dir {data_dir} (with the options it was made with)'
    return (f'python data/{name}/prepare.py (no such script: one of data/{{{",".join(scripts)}}}/prepare.py '
            f'--out_dir {data_dir})')

def _check_bin(path, dtype, rerun):
    """Number of elements of a raw .bin of `dtype`: it must exist, be non-empty and hold whole elements."""
    if not os.path.isfile(path):
        raise DatasetError(f'{path}: missing: rerun {rerun}')
    size = os.path.getsize(path)
    if size == 0:
        raise DatasetError(f'{path}: empty: rerun {rerun}')
    if size % dtype.itemsize:
        raise DatasetError(f'{path}: {size:,} bytes is not a multiple of the {dtype.name} size ({dtype.itemsize}): '
                           f'truncated or rewritten: rerun {rerun}')
    return size // dtype.itemsize

def _load_npy(path, rerun):
    if not os.path.isfile(path):
        raise DatasetError(f'{path}: missing: rerun {rerun}')
    try:
        a = np.load(path, allow_pickle=False)
    except Exception as e:
        raise DatasetError(f'{path}: not a readable .npy file ({_one_line(e)}): rerun {rerun}') from None
    if a.ndim != 1 or a.dtype.kind not in 'iu' or len(a) == 0:
        raise DatasetError(f'{path}: expected a non-empty 1-d integer array, got {a.dtype} {a.shape}: rerun {rerun}')
    return a

def check_dataset(data_dir, verify_hashes=True):
    """Check a prepared dataset against its meta.json and return meta; raise DatasetError (one line naming the
    file and the problem) for: meta.json missing (the message says which prepare command makes it) or not
    valid JSON; a file listed in meta['files'] missing, or of another size or sha256 (rewritten after the
    prepare); an empty .bin, or one whose length is not a multiple of its dtype, or whose token count differs
    from meta['counts']; a token id >= vocab_size (one max over a memmap); bad idx / labels (classify) or
    targets (seq). A meta.json without 'files' (an older prepare) gets every check but the size/sha256 ones.
    verify_hashes=False skips the sha256 (sizes are still compared)."""
    data_dir = os.path.normpath(data_dir)
    meta_path = os.path.join(data_dir, 'meta.json')
    if not os.path.isfile(meta_path):
        raise DatasetError(f'{meta_path}: missing: prepare the dataset first: {_prepare_hint(data_dir)}')
    try:
        with open(meta_path, encoding='utf-8') as f:
            meta = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise DatasetError(f'{meta_path}: corrupt JSON ({_one_line(e)}): rerun {_prepare_hint(data_dir)}') from None
    rerun = meta.get('command') if isinstance(meta, dict) and isinstance(meta.get('command'), str) else None
    rerun = rerun or _prepare_hint(data_dir)

    def fail(path, problem):
        raise DatasetError(f'{path}: {problem}: rerun {rerun}')

    if not isinstance(meta, dict):
        fail(meta_path, f'expected a JSON object, got {type(meta).__name__}')
    for key in ('vocab_size', 'dtype', 'counts'):
        if key not in meta:
            fail(meta_path, f'no {key!r} entry')
    try:
        dtype = np.dtype(meta['dtype'])
        assert dtype.kind in 'iu'
    except Exception:
        fail(meta_path, f"dtype {meta['dtype']!r} is not an integer dtype")
    vocab = meta['vocab_size']
    files = meta.get('files')
    if files is not None:
        if not isinstance(files, dict):
            fail(meta_path, "'files' is not an object")
        for name, info in files.items():
            path = os.path.join(data_dir, name)
            if not os.path.isfile(path):
                fail(path, 'missing (meta.json lists it)')
            size = os.path.getsize(path)
            if size != info.get('bytes'):
                fail(path, f"{size:,} bytes, meta.json says {info.get('bytes')}: "
                           f"the file was rewritten after prepare")
            if verify_hashes and sha256_file(path) != info.get('sha256'):
                fail(path, 'sha256 differs from meta.json: the file was rewritten after prepare')
    fmt = meta.get('format') or ('classify' if meta.get('n_classes') else 'lm')
    if fmt not in ('lm', 'classify', 'seq'):
        fail(meta_path, f"unknown format {fmt!r} (expected 'lm', 'classify' or 'seq')")
    for split in SPLITS:
        counts = meta['counts'].get(split) if isinstance(meta['counts'], dict) else None
        if not isinstance(counts, dict):
            fail(meta_path, f'no counts for the {split!r} split')
        path = os.path.join(data_dir, f'{split}.bin')
        n = _check_bin(path, dtype, rerun)
        if counts.get('tokens', n) != n:
            fail(path, f"holds {n:,} tokens, meta.json counts {counts['tokens']:,}: "
                       f"the file was rewritten after prepare")
        top = int(np.memmap(path, dtype=dtype, mode='r').max())
        if top >= vocab:
            fail(path, f'token id {top} >= vocab_size {vocab}')
        if fmt == 'classify':
            ipath, lpath = (os.path.join(data_dir, f'{split}{s}') for s in ('.idx.npy', '.labels.npy'))
            idx, labels = _load_npy(ipath, rerun), _load_npy(lpath, rerun)
            if len(idx) < 2 or idx[0] != 0 or idx[-1] != n or np.any(np.diff(idx) < 0):
                fail(ipath, f'not increasing document offsets from 0 to the {n:,} tokens of {split}.bin')
            if len(labels) != len(idx) - 1:
                fail(lpath, f'{len(labels):,} labels for {len(idx) - 1:,} documents')
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= meta.get('n_classes', 0):
                fail(lpath, f"label {lo if lo < 0 else hi} outside 0..{meta.get('n_classes', 0) - 1}")
        elif fmt == 'seq':
            L = meta.get('seq_len')
            if not isinstance(L, int) or L < 1 or n % L:
                fail(path, f'{n:,} tokens are not whole rows of seq_len {L}')
            tpath = os.path.join(data_dir, f'{split}.targets.bin')
            tdtype = np.dtype(meta.get('target_dtype', 'int16'))
            nt = _check_bin(tpath, tdtype, rerun)
            if nt != n:
                fail(tpath, f'{nt:,} targets for the {n:,} tokens of {split}.bin')
            t = np.memmap(tpath, dtype=tdtype, mode='r')
            lo, hi = int(t.min()), int(t.max())
            if lo < -1 or hi >= vocab:
                fail(tpath, f'target {lo if lo < -1 else hi} outside -1..{vocab - 1}')
    return meta

# -----------------------------------------------------------------------------
# command line

def cli(script, doc, main, src=True, **extras):
    """Parse --src (if src) / --out_dir (+ extras: flag -> argparse kwargs) and run main(args). args also gets
    name (the output folder's name: the dataset's name, its --dataset) and raw_dir (<out_dir>/raw). A --src that is not a directory, a SourceError
    or a PrepareError exits 1 with `error: ...`."""
    global PREPARE_COMMAND
    here = os.path.dirname(os.path.abspath(script))
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if src:
        p.add_argument('--src', help='directory holding the raw files (plain or .xz)')
    p.add_argument('--out_dir', default=here, help='output directory (default: %(default)s)')
    for flag, kwargs in extras.items():
        p.add_argument('--' + flag, **kwargs)
    args = p.parse_args()
    if src and args.src is not None and not os.path.isdir(args.src):
        sys.exit(f'error: {args.src}: --src is not an existing directory')
    args.name = os.path.basename(os.path.normpath(os.path.abspath(args.out_dir)))  # the dataset: its folder's name
    args.raw_dir = os.path.join(args.out_dir, 'raw')
    rel = os.path.relpath(os.path.abspath(script), REPO)
    PREPARE_COMMAND = shlex.join(['python', rel if not rel.startswith('..') else os.path.abspath(script)]
                                 + sys.argv[1:])
    try:
        main(args)
    except (SourceError, PrepareError) as e:
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
                  describe(paths), origins={s: paths[f] for s, f in files.items()})

IMDB_URL = 'https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz'
IMDB_HEADER = ('id', 'label', 'rating', 'text')

def load_imdb(args):
    """IMDB (data/imdb, data/imdb_bytes) -> (train, test, paths), train/test = (texts, labels 0=neg 1=pos),
    paths = {'train.csv' | 'test.csv': path}. Reads the mirror's train.csv / test.csv (header id,label,rating,text),
    which are built from the aclImdb tarball when downloaded. '<br />' becomes a newline."""
    urls = {f: (IMDB_URL, _imdb_csv) for f in ('train.csv', 'test.csv')}
    paths = find_source('imdb', urls, args.src, urls, args.raw_dir)
    def read(path):
        rows = read_rows(path, ncols=4, header=IMDB_HEADER, ints={1: range(2)})
        return [r[3].replace('<br />', '\n') for r in rows], [r[1] for r in rows]
    return read(paths['train.csv']), read(paths['test.csv']), paths

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
        [IMDB_HEADER] + [(r[2], int(r[0]), r[3], r[4]) for r in rows]), binary=False)
