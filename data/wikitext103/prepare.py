"""
WikiText-103 raw as cl100k_base tokens (LM; the paper's PPL benchmark, BPE vocab 100,277).

Sources: wiki.{train,valid,test}.raw (plain or .xz) from --src, the mirror (wikitext-103-raw/ holds
only valid and test) or https://wikitext.smerity.com/wikitext-103-raw-v1.zip (wikitext-103-raw/...).
Splits: train = wiki.train.raw (~540 MB, 1,801,350 lines), val = the official wiki.valid.raw (not a
slice of train: WikiText has an official validation set, which is what papers report), test =
wiki.test.raw. Each split is one stream (no EOT inserted); see common.prepare_wikitext.

$ python data/wikitext103/prepare.py [--src DIR] [--out_dir DIR]
"""
import os
import sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common

URL = 'https://wikitext.smerity.com/wikitext-103-raw-v1.zip'

if __name__ == '__main__':
    common.cli(__file__, __doc__, lambda args: common.prepare_wikitext(args, 'wikitext-103-raw', URL))
