"""
IMDB sentiment (25k/25k reviews; val = 2,500 held out of train), cl100k_base tokens, N=512 tokens per
review (longer reviews keep their beginning and the final EOT read-out token). MIPT: 2 layers, d=128,
particle cache K=16; the Transformer twin has the same embedding, FFN and head.

    python data/imdb/prepare.py
    MIPT:        python train.py config/classify_imdb.py
    Transformer: python train.py config/classify_imdb.py --mixer=attention --out_dir=out-imdb-attn
    classify:    python sample.py --out_dir=out-imdb --start="A wonderful, moving film."
"""
out_dir = 'out-imdb'
task = 'classify'
dataset = 'imdb'
block_size = 512
batch_size = 32
max_epochs = 5         # 22,500 // 32 = 703 iterations per epoch
eval_interval = 350

n_layer = 2
n_embd = 128
n_head = 4
dropout = 0.1
cache_size = 16

learning_rate = 1e-3
weight_decay = 0.1
warmup_iters = 200
min_lr = 1e-4
grad_clip = 1.0
