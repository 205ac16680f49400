"""
AG News 4-class topic classification (the paper: MIPT 0.905 with 248K non-embedding parameters, Transformer
0.736 with 422K). cl100k_base tokens, N=512. MIPT: 1 layer, d=128 (282K non-embedding parameters with
this code's layer), K=16. Transformer twin: same embedding, FFN, head.

    python data/agnews/prepare.py       (train.csv is not in the offline mirror: it is downloaded)
    MIPT:        python train.py config/classify_agnews.py
    Transformer: python train.py config/classify_agnews.py --mixer=attention --out_dir=out-agnews-attn
    3 seeds:     add --seed=1 --out_dir=out-agnews-s1 (and so on)
"""
out_dir = 'out-agnews'
task = 'classify'
dataset = 'agnews'
block_size = 512
batch_size = 64
max_epochs = 5
eval_interval = 500

n_layer = 1
n_embd = 128
n_head = 4
dropout = 0.1
cache_size = 16

learning_rate = 1e-3
weight_decay = 0.1
warmup_iters = 200
min_lr = 1e-4
grad_clip = 1.0
