"""
Long-range byte-level IMDB (the Long Range Arena "Text" setting): UTF-8 bytes, N=4096 (longer reviews
keep their first 4096 bytes), 2 classes. LRA reference points: Transformer 64.3%, S4 86.8%,
LRU 89.0%, S5 89.3%, Mega 90.4%. MIPT: 4 layers, d=128, K=16.

    python data/imdb_bytes/prepare.py
    MIPT:        python train.py config/long_imdb_bytes.py
    Transformer: python train.py config/long_imdb_bytes.py --mixer=attention --out_dir=out-imdb-bytes-attn
"""
out_dir = 'out-imdb-bytes'
task = 'classify'
dataset = 'imdb_bytes'
block_size = 4096
batch_size = 32
max_epochs = 10        # 22,500 // 32 = 703 iterations per epoch
eval_interval = 700

n_layer = 4
n_embd = 128
n_head = 4
dropout = 0.1
cache_size = 16

learning_rate = 1e-3
weight_decay = 0.05
warmup_iters = 500
min_lr = 1e-4
grad_clip = 1.0
