"""
Needle in a haystack (the paper's section 3, its demo): N=512 tokens over a vocabulary of 300,
noise ids 200..299, one needle (4 classes x 5 ids, 10..29) in the first 10% of the sequence; the label
is its class. 5,000 train / 1,000 val / 1,000 test sequences, a 'classify' dataset of equal-length
documents made by data/needle/prepare.py (run it first).
Model: one MIPT layer at d=64; Adam (no weight decay) at a constant lr 3e-3, batch 128, 15 epochs.
The paper: no cache 0.845; K=1 0.960; K=4 0.968; K=16 0.992; full attention 1.000.

    python data/needle/prepare.py                  # -> data/needle (seconds)
    MIPT, K=16:  python train.py config/needle.py
    cache sizes: python train.py config/needle.py --cache_size=0 --out_dir=out-needle-k0
                 (likewise --cache_size=1, 4, and -1 = unbounded)
    Transformer: python train.py config/needle.py --mixer=attention --out_dir=out-needle-attn

Harder variants are datasets of their own, e.g. the needle anywhere in 2048 tokens:

    python data/needle/prepare.py --seq_len 2048 --span 0.0 1.0 --out_dir data/needle2048
    python train.py config/needle.py --dataset=needle2048 --block_size=2048 --out_dir=out-needle2048

(block_size must be at least the sequence length: longer documents are cut to their beginning.)
"""
out_dir = 'out-needle'
task = 'classify'
dataset = 'needle'
block_size = 512

n_layer = 1
n_embd = 64
n_head = 4
dropout = 0.0
cache_size = 16
cache_explore = 128    # R: random earlier positions each query also attends to in training (the selection
                       # signal; 128 scored 0.996-1.000 on the paper's demo model)

batch_size = 128
max_epochs = 15        # 5000 // 128 = 39 iterations per epoch
eval_interval = 39     # once per epoch
learning_rate = 3e-3
weight_decay = 0.0     # AdamW without decay = Adam
beta1 = 0.9
beta2 = 0.999          # Adam's default
decay_lr = False       # constant learning rate
warmup_iters = 0
grad_clip = 1.0
