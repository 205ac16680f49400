"""
Multi-query associative recall (MQAR, Zoology; data/mqar/prepare.py): rows of L=512 tokens holding N=64
key-value pairs, then the keys again as queries whose targets are their values (every other position is
ignored). task 'seq': a language model trained with cross-entropy on the query positions only; accuracy
over the queries, the model selected on val accuracy. 100,000 train / 3,000 val / 3,000 test rows.
Model: 2 layers at d=128 (Zoology's d_model 128 setting), MIPT with K=64 cache slots.

Budget: Zoology trains up to 64 epochs (batch 128 at L=512, 256 below), sweeps the learning rate and stops at
val accuracy 0.99. This is a shrunk budget: at most 4 epochs (3,125 iterations of 128 rows), stop_at 0.99, a
short warmup and a cosine decay; results/recall.sh also caps each run's wall time (--max_minutes).

    python data/mqar/prepare.py                    # -> data/mqar (seconds)
    MIPT, K=64:  python train.py config/mqar.py
    no cache:    python train.py config/mqar.py --cache_size=0 --out_dir=out-mqar-k0
    Transformer: python train.py config/mqar.py --mixer=attention --cache_size=0 --out_dir=out-mqar-attn
    a peer:      python train.py config/mqar.py --cache_size=0 --peer=gla --out_dir=out-mqar-gla   (fla, GPU)
    other sizes: python data/mqar/prepare.py --seq_len 256 --n_pairs 16 --out_dir data/mqar256
                 python train.py config/mqar.py --dataset=mqar256 --cache_size=16 --cache_explore=32 --out_dir=out-mqar256
(exploration R = L/8, as cache_explore=64 at L=512: R >= L makes training attend densely; train.py warns.)
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
cache_explore = 64     # R = L/8 (see the docstring); at K=64 val chose R=32 (0.51) over 16 (0.37) and 64 (0.04)

batch_size = 128
max_epochs = 4         # 100,000 // 128 = 781 iterations per epoch
stop_at = 0.99         # Zoology's early stop
eval_interval = 250
learning_rate = 2.2e-3 # one point of Zoology's sweep {1e-4, 4.6e-4, 2.2e-3, 1e-2}
weight_decay = 0.1
warmup_iters = 100
min_lr = 1e-4
beta2 = 0.99
grad_clip = 1.0
