#!/usr/bin/env bash
# The recall and MQAR runs on an H200, several at once on one GPU. Every run is
# `python train.py <config> --key=value ...` and writes RUNS/<name>/metrics.json with its command in
# RUNS/<name>/command.txt; results/collect.py gathers them, results/summarize.py reads the gathered files.
#   usage: [ONLY=REGEX] bash results/recall.sh RUNS [JOBS] SET
#   SET needle : the needle at N=512 (paper demo): the selection-signal ablation (cache_explore R) at K=4,
#                K=1/16, the unbounded cache (tau, p_penalty), the paper's mean read-out, the twin; 3 seeds
#   SET long   : the needle anywhere in N=2048 (MIPT K=16, R=512, 1 layer, 3 seeds; the twin, seed 1)
#   SET lm     : the language models with and without the signal (shakespeare_char baby GPT; IMDB LM at
#                1000 iterations, K=64)
#   SET signal : the training signals (cache_signal; p_penalty 0 / 0.1 / 1 for the soft ones) compared on val
#                at five needle placements/lengths/vocabularies (anywhere in 512 K=4, anywhere in 2048 K=16, first 10%
#                of 1024 K=4, vocabulary 2000 K=4, the paper's demo K=4), seeds 1-2; MINUTES caps each run's time;
#                ONLY picks a part that one call can hold
#   SET goals  : the recall goals with SIGNAL (e.g. SIGNAL="--cache_signal=dense --p_penalty=1.0"), seeds 1-5, the
#                twin beside each row; then python results/needle_eval.py RUNS/* --lengths=8192,32768
#   SET zoology: MQAR by Zoology's Figure 2 protocol (64 epochs of cosine from the peak, no warmup, AdamW wd 0.1,
#                beta2 0.999, no clipping, stop at val 0.99), the same flags and LRS (default 2.2e-3 4.6e-4) for every
#                model: the twin as Zoology's attention (1 head, no MLP, dropout 0.1) and as ours, MIPT K=N and 2N at
#                2 and 4 layers, fla's peers; cells 256x16 and 512x64 at d=128, 512x64 at d=64. Long runs go on
#                with --init_from=resume (the same command, run again, resumes: run_one skips finished runs)
#   SET mqar   : MQAR (Zoology), d_model 128, 2 layers, at each (L, N) of SIZES: MIPT K=0/N/2N, the twin, and the
#                flash-linear-attention peers (shrunk budget: MINUTES of wall time, EPOCHS, one lr per LRS; RESULTS.md, MQAR)
# The data: python data/needle/prepare.py; python data/needle/prepare.py --seq_len 2048 --span 0.0 1.0
# --out_dir data/needle2048; python data/mqar/prepare.py; python data/{shakespeare_char,imdb}/prepare.py
set -u
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # many runs share the CPUs
root=${1:?RUNS directory}; jobs=${2:-8}; set=${3:?SET}; PY=${PY:-python}
mkdir -p "$root"
cmds=()
if [ "$set" = needle ]; then
  for seed in 1 2 3; do
    for R in 0 16 64 128 -1; do
      cmds+=("$PY train.py config/needle.py --cache_size=4 --cache_explore=$R --seed=$seed --out_dir=$root/needle-K4-R$R-s$seed")
    done
    for K in 1 16; do cmds+=("$PY train.py config/needle.py --cache_size=$K --seed=$seed --out_dir=$root/needle-K$K-s$seed"); done
    for tau in 0.15 0.2 0.3; do
      cmds+=("$PY train.py config/needle.py --cache_size=-1 --cache_tau=$tau --seed=$seed --out_dir=$root/needle-Kinf-tau$tau-pen0.0-s$seed")
    done
    for K in 0 4; do cmds+=("$PY train.py config/needle.py --readout=mean --cache_size=$K --seed=$seed --out_dir=$root/needle-mean-K$K-s$seed"); done
    cmds+=("$PY train.py config/needle.py --mixer=attention --cache_size=0 --seed=$seed --out_dir=$root/needle-attn-s$seed")
  done
fi
if [ "$set" = long ]; then  # R=512: a quarter of the 2048 positions explored, as R=128 of 512 at N=512
  n2048="config/needle.py --dataset=needle2048 --block_size=2048 --cache_size=16 --cache_explore=512"
  for seed in 1 2 3; do cmds+=("$PY train.py $n2048 --seed=$seed --out_dir=$root/needle2048-L1-K16-R512-s$seed"); done
  cmds+=("$PY train.py config/needle.py --dataset=needle2048 --block_size=2048 --mixer=attention --cache_size=0 --seed=1 --out_dir=$root/needle2048-attn-s1")
fi
if [ "$set" = lm ]; then
  cmds+=("$PY train.py config/train_shakespeare_char.py --out_dir=$root/shakespeare-K16-R64")
  lm="config/lm_imdb.py --max_iters=1000 --lr_decay_iters=1000 --warmup_iters=100 --eval_interval=100 --cache_size=64"
  for R in 0 64; do cmds+=("$PY train.py $lm --cache_explore=$R --out_dir=$root/lmimdb-K64-R$R"); done
fi
prep() {  # a needle dataset in data/<name>, made once
  [ -f "data/$1/meta.json" ] || $PY data/needle/prepare.py "${@:2}" --out_dir "data/$1" > /dev/null
}
nd() { echo "config/needle.py --dataset=$1 --block_size=$2"; }
if [ "$set" = signal ]; then
  prep needle_a512 --span 0.0 1.0; prep needle_a2048 --seq_len 2048 --span 0.0 1.0
  prep needle_f1024 --seq_len 1024; prep needle_v2000 --vocab_size 2000 --n_classes 8; prep needle_demo
  for seed in 1 2; do
    for sig in "explore" "weighted" "dense --p_penalty=0.0" "dense --p_penalty=0.1" "dense --p_penalty=1.0" \
               "mixed --p_penalty=0.0" "mixed --p_penalty=0.1" "mixed --p_penalty=1.0" "distill"; do
      tag=${sig// --p_penalty=/-pen}
      for c in "a512 512 4" "a2048 2048 16" "f1024 1024 4" "v2000 512 4" "demo 512 4"; do
        set -- $c
        cmds+=("$PY train.py $(nd needle_$1 $2) --cache_size=$3 --cache_signal=$sig --seed=$seed ${MINUTES:+--max_minutes=$MINUTES} --out_dir=$root/signal-$1-$tag-s$seed")
      done
    done
  done
fi
if [ "$set" = goals ]; then
  prep needle_a512 --span 0.0 1.0; prep needle_a2048 --seq_len 2048 --span 0.0 1.0
  prep needle_a8192 --seq_len 8192 --span 0.0 1.0; prep needle; prep needle_v5000 --vocab_size 5000 --n_classes 16
  prep needle_v300c8 --n_classes 8 --ids_per_class 5
  sig=${SIGNAL:?SIGNAL: the flags of the chosen signal}
  for seed in 1 2 3 4 5; do
    for c in "a512 needle_a512 512 4" "a2048 needle_a2048 2048 16" "a8192 needle_a8192 8192 16" "demoK1 needle 512 1" \
             "demoK4 needle 512 4" "v5000 needle_v5000 512 4" "v300c8 needle_v300c8 512 4"; do
      set -- $c
      cmds+=("$PY train.py $(nd $2 $3) --cache_size=$4 $sig --seed=$seed --out_dir=$root/goal-$1-s$seed")
      cmds+=("$PY train.py $(nd $2 $3) --mixer=attention --cache_size=0 --seed=$seed --out_dir=$root/goal-$1-attn-s$seed")
    done
    for c in "unb512 needle 512" "unb2048 needle_a2048 2048"; do
      set -- $c
      for tau in 0.2 0.5; do
        cmds+=("$PY train.py $(nd $2 $3) --cache_size=-1 --cache_tau=$tau $sig --seed=$seed --out_dir=$root/goal-$1-tau$tau-s$seed")
      done
    done
  done
fi
if [ "$set" = zoology ]; then
  z="--max_epochs=64 --warmup_iters=0 --min_lr=0 --beta2=0.999 --grad_clip=0 --weight_decay=0.1 --stop_at=0.99"
  for cell in "256 16 128" "512 64 128" "512 64 64"; do
    set -- $cell; L=$1; n=$2; d=$3; ds=mqar; bs=128
    [ "$L" = 512 ] && [ "$n" = 64 ] || { ds=mqar${L}x$n; bs=256; }
    [ -f "data/$ds/meta.json" ] || $PY data/mqar/prepare.py --seq_len "$L" --n_pairs "$n" --out_dir "data/$ds" > /dev/null
    mq="config/mqar.py --dataset=$ds --batch_size=$bs --n_embd=$d $z ${MINUTES:+--max_minutes=$MINUTES}"
    for lr in ${LRS:-2.2e-3 4.6e-4}; do
      tag=mqar${L}x$n-d$d
      cmds+=("$PY train.py $mq --learning_rate=$lr --mixer=attention --cache_size=0 --n_head=1 --mlp=False --dropout=0.1 --out_dir=$root/$tag-zattn-lr$lr")
      cmds+=("$PY train.py $mq --learning_rate=$lr --mixer=attention --cache_size=0 --out_dir=$root/$tag-attn-lr$lr")
      for layers in 2 4; do
        for K in $n $((2 * n)); do
          cmds+=("$PY train.py $mq --learning_rate=$lr --n_layer=$layers --cache_size=$K --cache_explore=$((L / 8)) ${SIGNAL:-} --out_dir=$root/$tag-L$layers-K$K-lr$lr")
        done
        for p in gated_deltanet mamba2 gla; do
          cmds+=("$PY train.py $mq --learning_rate=$lr --n_layer=$layers --cache_size=0 --peer=$p --out_dir=$root/$tag-L$layers-$p-lr$lr")
        done
      done
    done
  done
fi
if [ "$set" = mqar ]; then  # SIZES (LxN; 512x64 reads data/mqar, others data/mqar<LxN>), LRS, MINUTES, EPOCHS, TAG
  for size in ${SIZES:-512x64}; do
    n=${size#*x}; L=${size%x*}; R=$((L / 8)); ds=mqar; bs=128; [ "$size" = 512x64 ] || { ds=mqar$size; bs=256; }
    mq="config/mqar.py --dataset=$ds --batch_size=$bs --max_minutes=${MINUTES:-8} --max_epochs=${EPOCHS:-4}"
    t=${TAG:+-$TAG}  # a budget tag in the run's name (results/summarize_mqar.py keeps it as a variant)
    for lr in ${LRS:-2.2e-3}; do
      # MIPT: exploration R = L/8 (as R=64 at 512; R >= L would make training attend densely, see train.py)
      for K in 0 $n $((2 * n)); do
        x=; [ $K = 0 ] || x="--cache_explore=$R"
        cmds+=("$PY train.py $mq --learning_rate=$lr --cache_size=$K $x --out_dir=$root/mqar$size-K$K${x:+R$R}-lr$lr$t")
      done
      cmds+=("$PY train.py $mq --learning_rate=$lr --mixer=attention --cache_size=0 --out_dir=$root/mqar$size-attn-lr$lr$t")
      for p in gated_deltanet mamba2 gla; do
        cmds+=("$PY train.py $mq --learning_rate=$lr --cache_size=0 --peer=$p --out_dir=$root/mqar$size-$p-lr$lr$t")
      done
    done
  done
fi
run_one() {  # run one command, logging it beside its run
  local cmd=$1 dir=${1##*--out_dir=}
  dir=${dir%% *}
  [ -f "$dir/metrics.json" ] && { echo "done already: $dir"; return; }  # a finished run is never redone
  [ -f "$dir/ckpt_last.pt" ] && cmd="$cmd --init_from=resume"            # a cut one goes on where it stopped
  mkdir -p "$dir"
  echo "$cmd" >> "$dir/command.txt"
  $cmd >> "$dir/stdout.txt" 2>&1 || echo "FAILED ($?): $cmd"
}
export -f run_one
printf '%s\n' "${cmds[@]}" | grep -E -e "${ONLY:-.}" | xargs -d '\n' -P "$jobs" -I{} bash -c 'run_one "$@"' _ {}
echo "done: $set"
