"""
WikiText-103 language model, cl100k_base tokens (the paper: 31M parameters, BPE vocab 100,277; PPL
102.2 with K=0, 96.3 with K=16, 92.1 with K=64; Transformer 90.5). ~32M parameters here (6 layers,
d=256, tied 100,288 x 256 embedding; the vocabulary is padded to a multiple of 64), block 1024.
Perplexities are per cl100k token, so they compare only with runs on the same tokenizer.

    python data/wikitext103/prepare.py   (wiki.train.raw is not in the offline mirror: it is downloaded)
    MIPT, K=64:  python train.py config/lm_wikitext103.py
    K=0 / K=16:  python train.py config/lm_wikitext103.py --cache_size=0 --out_dir=out-wt103-k0
                 python train.py config/lm_wikitext103.py --cache_size=16 --out_dir=out-wt103-k16
    Transformer: python train.py config/lm_wikitext103.py --mixer=attention --cache_size=0 --out_dir=out-wt103-attn
    multi-GPU:   torchrun --standalone --nproc_per_node=4 train.py config/lm_wikitext103.py --gradient_accumulation_steps=4
"""
out_dir = 'out-wt103'
task = 'lm'
dataset = 'wikitext103'
vocab_multiple = 64
block_size = 1024
batch_size = 16
gradient_accumulation_steps = 2   # 32 x 1024 = 32K tokens per iteration (split across DDP processes)
max_iters = 10000                 # ~330M tokens, ~3 epochs of the ~115M-token train split
eval_interval = 500
eval_iters = 100

n_layer = 6
n_embd = 256
n_head = 4
dropout = 0.0
cache_size = 64
cache_chunk = 128

learning_rate = 1e-3
weight_decay = 0.1
warmup_iters = 500
lr_decay_iters = 10000
min_lr = 1e-4
beta2 = 0.95
grad_clip = 1.0
