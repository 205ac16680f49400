"""
Tiny Shakespeare as characters (vocab 65), one LM stream per split, as in nanoGPT's shakespeare_char.

Source: tinyshakespeare/input.txt (mirror, .xz) or
https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt
Splits (contiguous, of 1,115,394 characters): train = first 90% (1,003,854 chars, identical to
nanoGPT's train), val = next 5% (55,770), test = last 5% (55,770). The vocabulary is every character
of the whole text, sorted; meta.json keeps it as "chars".

$ python data/shakespeare_char/prepare.py [--src DIR] [--out_dir DIR]
"""
import os
import sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common

URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'

def cuts(n):
    """train = text[:a], val = text[a:b], test = text[b:] for a text of n characters."""
    return int(n * 0.9), int(n * 0.95)

def big_enough(n):
    a, b = cuts(n)
    return min(a, b - a, n - b) >= 2  # every split: at least an input and its next-character target

def main(args):
    paths = common.find_source('tinyshakespeare', ['input.txt'], args.src, {'input.txt': URL}, args.raw_dir)
    text = common.read_text(paths['input.txt'])
    n = len(text)
    if not big_enough(n):
        need = next(m for m in range(1, 10 ** 6) if all(big_enough(k) for k in range(m, m + 100)))
        raise common.PrepareError(paths['input.txt'], f'{n:,} characters; need at least {need:,} to make non-empty '
                                  f'train/val/test splits (90/5/5%, at least 2 characters each)')
    a, b = cuts(n)
    splits = {'train': text[:a], 'val': text[a:b], 'test': text[b:]}
    common.write_dataset(args.out_dir, args.name, 'char', splits, common.describe(paths), chars=sorted(set(text)))

if __name__ == '__main__':
    common.cli(__file__, __doc__, main)
