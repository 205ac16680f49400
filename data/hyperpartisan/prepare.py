"""
SemEval-2019 Task 4 Hyperpartisan News, by-article (long-document classification) as cl100k_base
tokens, 2 classes: 0 = "mainstream", 1 = "hyperpartisan".

Sources: semeval2019_byarticle_{train,test}.tsv (mirror hyperpartisan/, .xz; header sentence\\tlabel,
text "title: body" with HTML stripped) or, online,
https://raw.githubusercontent.com/HikariLight/hyperpartisanship_classification/main/data/semeval_2019/{train,test}.tsv
Splits: train 548 / val 97 (15% of the 645 train articles, seed 1337, not stratified) / test 628
(official by-article test set); doc order shuffled within every split. Every document ends with EOT.

$ python data/hyperpartisan/prepare.py [--src DIR] [--out_dir DIR] [--val_frac 0.15]
"""
import csv
import os
import sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common

URL = 'https://raw.githubusercontent.com/HikariLight/hyperpartisanship_classification/main/data/semeval_2019/'

def load(path):
    rows = common.read_rows(path, ncols=2, header=('sentence', 'label'), ints={1: range(2)},
                            delimiter='\t', quoting=csv.QUOTE_NONE)
    return [text for text, _ in rows], [label for _, label in rows]

def main(args):
    files = {f'semeval2019_byarticle_{s}.tsv': URL + f'{s}.tsv' for s in ('train', 'test')}
    paths = common.find_source('hyperpartisan', files, args.src, files, args.raw_dir)
    train, test = (load(paths[f]) for f in files)
    splits = common.split_train_val(train, test, args.val_frac, names=tuple(paths[f] for f in files))
    common.write_dataset(args.out_dir, args.name, 'cl100k_base', splits, common.describe(paths),
                         label_names=['mainstream', 'hyperpartisan'])

if __name__ == '__main__':
    common.cli(__file__, __doc__, main, val_frac=dict(type=float, default=0.15, help='share of train used as val'))
