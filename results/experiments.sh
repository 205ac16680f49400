#!/usr/bin/env bash
# The H100 runs behind RESULTS.md's classification and language-model tables, several at once on one GPU
# (small models leave it idle otherwise). Every run is `python train.py <config> --key=value ...`;
# results/collect.py gathers their metrics.json files into results/runs_h100*.json.
# Usage: [ONLY=REGEX] bash results/experiments.sh OUT_ROOT [JOBS] [SET: a (default) | b ... g]
# Sets a-g ran at earlier commits (sets c-g record 6584c39 in their git_commit); since the needle became a
# dataset (data/needle/prepare.py) their needle_* keys are gone: results/recall.sh holds the needle runs after
# the selection signal.
set -u
root=${1:-runs}; jobs=${2:-6}; set=${3:-a}; PY=${PY:-python}
mkdir -p "$root"
cmds=()
# 1. needle-in-a-haystack (paper demo), 3 seeds
for seed in 1 2 3; do
  for K in 0 1 4 16; do cmds+=("$PY train.py config/needle.py --cache_size=$K --seed=$seed --out_dir=$root/needle-mipt-K$K-s$seed"); done
  cmds+=("$PY train.py config/needle.py --cache_size=-1 --cache_tau=0.5 --seed=$seed --out_dir=$root/needle-mipt-Kinf-s$seed")
  cmds+=("$PY train.py config/needle.py --mixer=attention --cache_size=0 --seed=$seed --out_dir=$root/needle-attn-s$seed")
done
# 2. IMDB at N=512 (paper scale: d=128, 2 layers)
cmds+=("$PY train.py config/classify_imdb.py --out_dir=$root/imdb512-mipt-s1 --seed=1")
cmds+=("$PY train.py config/classify_imdb.py --mixer=attention --cache_size=0 --out_dir=$root/imdb512-attn-s1 --seed=1")
# 4. shakespeare_char at nanoGPT's baby-GPT budget
cmds+=("$PY train.py config/train_shakespeare_char.py --out_dir=$root/shakespeare-mipt-K16")
cmds+=("$PY train.py config/train_shakespeare_char.py --mixer=attention --cache_size=0 --out_dir=$root/shakespeare-attn")
if [ "$set" = b ]; then  # the second GPU call: more seeds, tau for the unbounded cache, long documents
  cmds=()
  for seed in 1 2 3; do for tau in 0.15 0.2 0.3; do
    cmds+=("$PY train.py config/needle.py --cache_size=-1 --cache_tau=$tau --seed=$seed --out_dir=$root/needle-mipt-Kinf-tau$tau-s$seed")
  done; done
  for seed in 2 3; do
    cmds+=("$PY train.py config/classify_imdb.py --out_dir=$root/imdb512-mipt-s$seed --seed=$seed")
    cmds+=("$PY train.py config/classify_imdb.py --mixer=attention --cache_size=0 --out_dir=$root/imdb512-attn-s$seed --seed=$seed")
  done
  # shrunk to one epoch to fit a 10-minute GPU call (the config asks for 10)
  cmds+=("$PY train.py config/long_imdb_bytes.py --max_epochs=1 --eval_interval=350 --out_dir=$root/bytes4096-mipt-1ep")
  cmds+=("$PY train.py config/long_imdb_bytes.py --max_epochs=1 --eval_interval=350 --mixer=attention --cache_size=0 --out_dir=$root/bytes4096-attn-1ep")
fi
if [ "$set" = c ]; then  # the third: the LM gap (shrunk to 500 iterations), and p_init for the needle on val
  cmds=()
  lm="config/lm_imdb.py --max_iters=500 --lr_decay_iters=500 --warmup_iters=50 --eval_interval=100"
  for K in 0 16 64; do cmds+=("$PY train.py $lm --cache_size=$K --out_dir=$root/lmimdb-mipt-K$K"); done
  cmds+=("$PY train.py $lm --mixer=attention --cache_size=0 --out_dir=$root/lmimdb-attn")
  for p in 0.03 0.01 0.001; do for K in 0 4; do
    cmds+=("$PY train.py config/needle.py --cache_size=$K --p_init=$p --seed=1 --out_dir=$root/needle-pinit$p-K$K-s1")
  done; done
fi
if [ "$set" = d ]; then  # the fourth: the two LM runs that ran out of memory in set c, the needle at 3x the
  # epochs for both models, the needle anywhere in N=2048 (shrunk to 5 epochs), bytes-2048 (1 epoch)
  cmds=()
  lm="config/lm_imdb.py --max_iters=500 --lr_decay_iters=500 --warmup_iters=50 --eval_interval=100"
  cmds+=("$PY train.py $lm --cache_size=0 --out_dir=$root/lmimdb-mipt-K0")
  cmds+=("$PY train.py $lm --mixer=attention --cache_size=0 --out_dir=$root/lmimdb-attn")
  for seed in 1 2 3; do
    cmds+=("$PY train.py config/needle.py --max_epochs=45 --cache_size=4 --seed=$seed --out_dir=$root/needle45-mipt-K4-s$seed")
    cmds+=("$PY train.py config/needle.py --max_epochs=45 --mixer=attention --cache_size=0 --seed=$seed --out_dir=$root/needle45-attn-s$seed")
  done
  n2048="config/needle.py --needle_len=2048 --needle_span=0.0,1.0 --max_epochs=5 --seed=1"
  cmds+=("$PY train.py $n2048 --cache_size=16 --out_dir=$root/needle2048-mipt-K16-s1")
  cmds+=("$PY train.py $n2048 --mixer=attention --cache_size=0 --out_dir=$root/needle2048-attn-s1")
  bytes="config/long_imdb_bytes.py --block_size=2048 --max_epochs=1 --eval_interval=350"
  cmds+=("$PY train.py $bytes --out_dir=$root/bytes2048-mipt-1ep")
  cmds+=("$PY train.py $bytes --mixer=attention --cache_size=0 --out_dir=$root/bytes2048-attn-1ep")
fi
if [ "$set" = e ]; then  # the fifth: IMDB-512 at ~5M non-embedding parameters (4 layers, d=256), 3 seeds, shrunk
  # to 2 epochs; shakespeare_char MIPT without a cache
  cmds=("$PY train.py config/train_shakespeare_char.py --cache_size=0 --out_dir=$root/shakespeare-mipt-K0")
  big="config/classify_imdb.py --n_layer=4 --n_embd=256 --max_epochs=2"
  for seed in 1 2 3; do
    cmds+=("$PY train.py $big --seed=$seed --out_dir=$root/imdb512big-mipt-s$seed")
    cmds+=("$PY train.py $big --mixer=attention --cache_size=0 --seed=$seed --out_dir=$root/imdb512big-attn-s$seed")
  done
fi
if [ "$set" = f ]; then  # the sixth: IMDB-512 at ~5M at the config's full 5 epochs; the needle anywhere in N=2048
  # at the paper's 15 epochs
  cmds=()
  for seed in 1 2 3; do
    cmds+=("$PY train.py config/classify_imdb.py --n_layer=4 --n_embd=256 --seed=$seed --out_dir=$root/imdb512big5-mipt-s$seed")
    cmds+=("$PY train.py config/classify_imdb.py --n_layer=4 --n_embd=256 --mixer=attention --cache_size=0 --seed=$seed --out_dir=$root/imdb512big5-attn-s$seed")
  done
  n2048="config/needle.py --needle_len=2048 --needle_span=0.0,1.0 --seed=1"
  cmds+=("$PY train.py $n2048 --cache_size=16 --out_dir=$root/needle2048e15-mipt-K16-s1")
  cmds+=("$PY train.py $n2048 --mixer=attention --cache_size=0 --out_dir=$root/needle2048e15-attn-s1")
fi
if [ "$set" = g ]; then  # the seventh: the LM gap at twice set c's budget (1000 iterations, 33M tokens); at
  # most 2 jobs: three of these at once run out of memory on an 80 GB GPU
  cmds=()
  lm="config/lm_imdb.py --max_iters=1000 --lr_decay_iters=1000 --warmup_iters=100 --eval_interval=100"
  for K in 0 64; do cmds+=("$PY train.py $lm --cache_size=$K --out_dir=$root/lmimdb1k-mipt-K$K"); done
  cmds+=("$PY train.py $lm --mixer=attention --cache_size=0 --out_dir=$root/lmimdb1k-attn")
fi
# ONLY=REGEX keeps the runs whose command matches (to redo some of a set)
if [ -n "${ONLY:-}" ]; then kept=(); for c in "${cmds[@]}"; do grep -qE "$ONLY" <<< "$c" && kept+=("$c"); done; cmds=("${kept[@]}"); fi
# the long runs first, so that they overlap the short ones
order=(); for i in $(seq $((${#cmds[@]}-1)) -1 0); do order+=("${cmds[$i]}"); done
printf '%s\n' "${order[@]}" | xargs -P "$jobs" -I{} bash -c \
  'd=$(sed -n "s/.*--out_dir=\([^ ]*\).*/\1/p" <<< "{}"); mkdir -p $d; echo "{}" > $d/command.txt; {} > $d/stdout.txt 2>&1; echo "rc=$? {}"'
