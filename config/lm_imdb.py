"""
Language model on the IMDB reviews (EOT-separated cl100k_base tokens: ~6.5M train tokens, 0.74M val,
7.1M test), block 1024. ~32M parameters (6 layers, d=256, most of it the tied 100,288 x 256 embedding),
particle cache K=64. The vocabulary 100,277 is padded to 100,288 (a multiple of 64) for speed; the
padded ids never occur in the data.

    python data/imdb/prepare.py
    MIPT, K=64:  python train.py config/lm_imdb.py
    no cache:    python train.py config/lm_imdb.py --cache_size=0 --out_dir=out-lm-imdb-k0
    Transformer: python train.py config/lm_imdb.py --mixer=attention --cache_size=0 --out_dir=out-lm-imdb-attn
    sample:      python sample.py --out_dir=out-lm-imdb --start="This movie" --show_p=True
"""
out_dir = 'out-lm-imdb'
task = 'lm'
dataset = 'imdb'
vocab_multiple = 64
block_size = 1024
batch_size = 16
gradient_accumulation_steps = 2   # 32 x 1024 tokens per iteration
max_iters = 2000                  # ~65M tokens, ~10 epochs of train: the best-val checkpoint is kept
eval_interval = 200
eval_iters = 50

n_layer = 6
n_embd = 256
n_head = 4
dropout = 0.1
cache_size = 64
cache_chunk = 128

learning_rate = 1e-3
weight_decay = 0.1
warmup_iters = 200
lr_decay_iters = 2000
min_lr = 1e-4
beta2 = 0.95
grad_clip = 1.0
