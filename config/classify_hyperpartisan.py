"""
Long-document classification: SemEval-2019 Task 4 Hyperpartisan News, by article (548 train / 97 val /
628 test articles; median ~420 words). cl100k_base tokens, N=2048 (the paper's long-document setting:
MIPT 0.857, Transformer 0.830, dataset not named there). MIPT: 2 layers, d=128, K=16.

    python data/hyperpartisan/prepare.py
    MIPT:        python train.py config/classify_hyperpartisan.py
    Transformer: python train.py config/classify_hyperpartisan.py --mixer=attention --out_dir=out-hyperpartisan-attn
"""
out_dir = 'out-hyperpartisan'
task = 'classify'
dataset = 'hyperpartisan'
block_size = 2048
batch_size = 16
max_epochs = 20        # 548 // 16 = 34 iterations per epoch
eval_interval = 34

n_layer = 2
n_embd = 128
n_head = 4
dropout = 0.1
cache_size = 16

learning_rate = 1e-3
weight_decay = 0.1
warmup_iters = 50
min_lr = 1e-4
grad_clip = 1.0
