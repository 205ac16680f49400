"""
Character-level Shakespeare at nanoGPT's "baby GPT" budget (nanoGPT config/train_shakespeare_char.py):
6 layers, 6 heads, 384 wide, block 256, batch 64, 5000 iterations, lr 1e-3, dropout 0.2.

    python data/shakespeare_char/prepare.py
    MIPT:        python train.py config/train_shakespeare_char.py
    Transformer: python train.py config/train_shakespeare_char.py --mixer=attention --out_dir=out-shakespeare-char-attn
    sample:      python sample.py --out_dir=out-shakespeare-char --show_p=True

On a GPU this takes minutes; on a CPU add --device=cpu --compile=False and expect hours.
"""
out_dir = 'out-shakespeare-char'
eval_interval = 250
eval_iters = 20     # the 56K-token val split fits in 4 batches: val is then the whole split
task = 'lm'
dataset = 'shakespeare_char'
batch_size = 64
block_size = 256
gradient_accumulation_steps = 1

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2
cache_size = 16

learning_rate = 1e-3   # with baby networks we can afford to go a bit higher
max_iters = 5000
lr_decay_iters = 5000  # usually = max_iters
min_lr = 1e-4          # learning_rate / 10
beta2 = 0.99           # a bit bigger because the number of tokens per iter is small
warmup_iters = 100
weight_decay = 0.1
