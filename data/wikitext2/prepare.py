"""
WikiText-2 raw as cl100k_base tokens (LM), a small stand-in for WikiText-103.

Sources: wiki.{train,valid,test}.raw (plain or .xz) from --src, the mirror (wikitext-2-raw/ holds
only valid and test) or https://wikitext.smerity.com/wikitext-2-raw-v1.zip (wikitext-2-raw/...).
Splits: train = wiki.train.raw (~10.9 MB, 36,718 lines), val = the official wiki.valid.raw (not a
slice of train: WikiText has an official validation set), test = wiki.test.raw. Each split is one
stream (no EOT inserted); see common.prepare_wikitext.

$ python data/wikitext2/prepare.py [--src DIR] [--out_dir DIR]
"""
import os
import sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common

URL = 'https://wikitext.smerity.com/wikitext-2-raw-v1.zip'

if __name__ == '__main__':
    common.cli(__file__, __doc__, lambda args: common.prepare_wikitext(args, 'wikitext-2-raw', URL))
