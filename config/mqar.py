"""
Multi-query associative recall (MQAR, Zoology; data/mqar/prepare.py): rows of L=512 tokens holding N=64
key-value pairs, then the keys again as queries whose targets are their values (every other position is
ignored). task 'seq': a language model trained with cross-entropy on the query positions only; accuracy
over the queries, the model selected on val accuracy. 100,000 train / 3,000 val / 3,000 test rows.
Model: 2 layers at d=128 (Zoology's d_model 128 setting), MIPT with K=64 cache slots.

Budget: Zoology trains 64 epochs and sweeps the learning rate; this is a shrunk budget, 4 epochs
(6,248 iterations of 64 rows) at one learning rate, with a short warmup and a cosine decay.

    python data/mqar/prepare.py                    # -> data/mqar (seconds)
    MIPT, K=64:  python train.py config/mqar.py
    no cache:    python train.py config/mqar.py --cache_size=0 --out_dir=out-mqar-k0
    Transformer: python train.py config/mqar.py --mixer=attention --cache_size=0 --out_dir=out-mqar-attn
    a peer:      python train.py config/mqar.py --cache_size=0 --peer=gla --out_dir=out-mqar-gla   (fla, GPU)
    other sizes: python data/mqar/prepare.py --seq_len 256 --n_pairs 16 --out_dir data/mqar256
                 python train.py config/mqar.py --dataset=mqar256 --out_dir=out-mqar256
(block_size is the data's seq_len, whatever is set here.)
"""
out_dir = 'out-mqar'
task = 'seq'
dataset = 'mqar'

n_layer = 2
n_embd = 128
n_head = 4
dropout = 0.0
cache_size = 64

batch_size = 64
max_epochs = 4         # 100,000 // 64 = 1,562 iterations per epoch
eval_interval = 500
learning_rate = 1e-3
weight_decay = 0.1
warmup_iters = 200
min_lr = 1e-4
beta2 = 0.99
grad_clip = 1.0
