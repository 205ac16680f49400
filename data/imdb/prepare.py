"""
IMDB movie reviews (Maas et al. 2011) as cl100k_base tokens: 2-class sentiment ("neg", "pos") and,
through the EOT-separated .bin files, an LM corpus.

Sources: imdb/{train,test}.csv (mirror, .xz; header id,label,rating,text) or the aclImdb tarball
https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz (see common.load_imdb).
'<br />' becomes a newline. Splits: train 22,500 / val 2,500 (drawn from the 25,000 train reviews,
seed 1337) / test 25,000 (the official test set); doc order shuffled within every split (seeded),
so LM windows mix labels. Every document ends with EOT (100257).

$ python data/imdb/prepare.py [--src DIR] [--out_dir DIR] [--n_val 2500]
"""
import os
import sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common

def main(args):
    train, test, paths = common.load_imdb(args)
    splits = common.split_train_val(train, test, args.n_val, names=(paths['train.csv'], paths['test.csv']))
    common.write_dataset(args.out_dir, args.name, 'cl100k_base', splits, common.describe(paths),
                         label_names=['neg', 'pos'])

if __name__ == '__main__':
    common.cli(__file__, __doc__, main, n_val=dict(type=int, default=2500, help='val docs taken from train'))
