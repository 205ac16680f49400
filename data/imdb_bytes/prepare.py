"""
IMDB as UTF-8 bytes, for the Long-Range-Arena "Text"-style task (byte-level sentiment, length 4096).

Same sources, text cleaning ('<br />' -> newline) and splits as data/imdb (train 22,500 / val 2,500
from train, seed 1337 / test 25,000; same docs in the same order). Tokens: bytes 0..255, pad id 256,
vocab 257, no EOT. Each doc is truncated to --max_len bytes (default 4096; truncation may cut a
multi-byte character); train.py pads/truncates further.

$ python data/imdb_bytes/prepare.py [--src DIR] [--out_dir DIR] [--n_val 2500] [--max_len 4096]
"""
import os
import sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common

def main(args):
    train, test, paths = common.load_imdb(args)
    splits = common.split_train_val(train, test, args.n_val, names=(paths['train.csv'], paths['test.csv']))
    common.write_dataset(args.out_dir, args.name, 'bytes', splits, common.describe(paths), label_names=['neg', 'pos'],
                         max_len=args.max_len)

if __name__ == '__main__':
    common.cli(__file__, __doc__, main, n_val=dict(type=int, default=2500, help='val docs taken from train'),
               max_len=dict(type=int, default=4096, help='truncate each doc to this many bytes'))
