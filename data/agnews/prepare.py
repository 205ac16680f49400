"""
AG News (Zhang et al. 2015) topic classification as cl100k_base tokens, 4 classes
(World, Sports, Business, Sci/Tech; csv labels 1-4 become 0-3).

Sources: train.csv and test.csv (no header: label, title, description). The mirror holds only
agnews/test.csv.xz; train.csv comes from --src or
https://raw.githubusercontent.com/mhjabreel/CharCnn_Keras/master/data/ag_news_csv/train.csv
Text = title + " " + description, cleaned: the csv writes a line break as a backslash (a paragraph
break as two), which become a space (a newline), and it drops the '&' of some HTML entities
(' #39;', ' quot;', ...), which are restored and unescaped. Splits: train 114,000 / val 6,000 (5% of
the 120,000 train rows, seed 1337) / test 7,600 (official); doc order shuffled within every split.
Every document ends with EOT (100257).

$ python data/agnews/prepare.py [--src DIR] [--out_dir DIR] [--val_frac 0.05]
"""
import html
import os
import re
import sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common

URL = 'https://raw.githubusercontent.com/mhjabreel/CharCnn_Keras/master/data/ag_news_csv/'
LABELS = ['World', 'Sports', 'Business', 'Sci/Tech']

def clean(s):
    s = s.replace('\\\\', '\n').replace('\\', ' ')
    return html.unescape(re.sub(r' (#\d+|quot|amp|hellip);', r'&\1;', s))

def load(path):
    rows = common.read_rows(path, ncols=3, ints={0: range(1, len(LABELS) + 1)})
    return [clean(title + ' ' + desc) for _, title, desc in rows], [label - 1 for label, _, _ in rows]

def main(args):
    files = ['train.csv', 'test.csv']
    paths = common.find_source('agnews', files, args.src, {f: URL + f for f in files}, args.raw_dir)
    splits = common.split_train_val(load(paths['train.csv']), load(paths['test.csv']), args.val_frac,
                                    names=(paths['train.csv'], paths['test.csv']))
    common.write_dataset(args.out_dir, args.name, 'cl100k_base', splits, common.describe(paths), label_names=LABELS)

if __name__ == '__main__':
    common.cli(__file__, __doc__, main, val_frac=dict(type=float, default=0.05, help='share of train used as val'))
