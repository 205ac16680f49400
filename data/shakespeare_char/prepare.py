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

def main(args):
    paths = common.find_source('tinyshakespeare', ['input.txt'], args.src, {'input.txt': URL}, args.raw_dir)
    text = common.read_text(paths['input.txt'])
    n = len(text)
    a, b = int(n * 0.9), int(n * 0.95)
    splits = {'train': text[:a], 'val': text[a:b], 'test': text[b:]}
    common.write_dataset(args.out_dir, args.name, 'char', splits, common.describe(paths), chars=sorted(set(text)))

if __name__ == '__main__':
    common.cli(__file__, __doc__, main)
