#!/usr/bin/env bash
# The quality study of docs/results/quality.md: every run is one `fullsparse train`
# into runs/quality/<task>/<variant>-seed<S>. Resumable: a finished run (its summary.json says
# "completed") is skipped, an interrupted one continues with `--resume`.
#   bash scripts/quality_study.sh list          # the jobs, in priority order
#   bash scripts/quality_study.sh worker &      # start one worker per core (each one thread)
# Workers take the next unclaimed job (claims are folders under runs/quality/.claims) whose
# result is not already collected under docs/results/quality/ (scripts/quality_collect.py).
set -u
ROOT=${QUALITY_ROOT:-runs/quality}
R20='--train-subset all --test-subset 10000 --epochs 15 --checkpoint-every 100'
VIT='--model vit_tiny --model-kwargs {"depth":4,"patch_size":7} --optimizer adamw --lr 1e-3'
VIT+=' --weight-decay 0.05 --warmup-epochs 1 --train-subset 20000 --test-subset 10000 --epochs 10'
VIT+=' --checkpoint-every 100'
GPT='--task lm --batch-size 32 --steps-per-epoch 100 --epochs 5 --test-subset 512'
MVUE='--recipe fst2 --grad-weight-mode mvue'

jobs() {  # task variant seed flags...
  echo "resnet20 fst2-mvue 0 $R20 $MVUE"
  echo "resnet20 fst2-mvue 1 $R20 $MVUE"
  for s in 0; do
    for v in dense:--recipe=dense fst2-mvue:MVUE fst:--recipe=fst fst2:--recipe=fst2 srste:--recipe=srste; do
      echo "gpt ${v%%:*} $s $GPT ${v#*:}"
    done
  done
  echo "gpt dense 1 $GPT --recipe=dense"
  echo "gpt fst2-mvue 1 $GPT MVUE"
  echo "vit dense 0 $VIT --recipe=dense"
  echo "vit fst2-mvue 0 $VIT MVUE"
  echo "vit dense 1 $VIT --recipe=dense"
  echo "vit fst2-mvue 1 $VIT MVUE"
  echo "vit fst 0 $VIT --recipe=fst"
  echo "vit fst2 0 $VIT --recipe=fst2"
  echo "gpt fst2-mvue-finish0.1 0 $GPT MVUE --dense-finish 0.1"
  echo "gpt fst2-mvue-sste 0 $GPT MVUE --output-weight soft_2:4 --decay 0"
  echo "gpt fst2-mvue-maskeddecay 0 $GPT MVUE --decay-kind masked_grad --decay 6e-5"
  for v in fst:--recipe=fst fst2:--recipe=fst2 srste:--recipe=srste; do
    echo "gpt ${v%%:*} 1 $GPT ${v#*:}"
  done
  echo "vit srste 0 $VIT --recipe=srste"
  # Second seeds, the dense reference and the options on the CNN and the ViT.
  MD='--decay-kind masked_grad --decay 6e-5'
  echo "resnet20 dense 1 $R20 --recipe=dense"
  echo "gpt fst2-mvue-maskeddecay 1 $GPT MVUE $MD"
  echo "vit fst2-mvue-maskeddecay 0 $VIT MVUE $MD"
  echo "resnet20 fst2-mvue-maskeddecay 0 $R20 MVUE $MD"
  echo "resnet20 srste 0 $R20 --recipe=srste"
  echo "resnet20 fst2 0 $R20 --recipe=fst2"
  echo "vit fst2-mvue-maskeddecay 1 $VIT MVUE $MD"
  echo "gpt fst2-mvue-finish0.08 0 $GPT MVUE --dense-finish 0.08"
  for v in srste:--recipe=srste fst2:--recipe=fst2 fst:--recipe=fst; do
    echo "vit ${v%%:*} 1 $VIT ${v#*:}"
  done
  # The sampled weight gradients (fullsparse.sampling): GPT and ViT first (short runs),
  # ResNet-20 with three seeds, then the third seeds of dense and fst_mvue there.
  SAMPLED='fst_adaptive fst_is fst_rand'
  for r in $SAMPLED; do echo "gpt $r 0 $GPT --recipe=$r"; done
  for r in $SAMPLED; do echo "gpt $r 1 $GPT --recipe=$r"; done
  # the adaptive budget's frontier: fewer measurements, a looser budget
  echo "gpt fst_adaptive-i10 0 $GPT --recipe=fst_adaptive --variance-interval 10"
  echo "gpt fst_adaptive-i10 1 $GPT --recipe=fst_adaptive --variance-interval 10"
  # a fully sparse sampled weight gradient with the dense finish of the last 8 % of steps
  echo "gpt fst_is-finish0.08 0 $GPT --recipe=fst_is --dense-finish 0.08"
  for r in $SAMPLED; do echo "vit $r 0 $VIT --recipe=$r"; done
  # the ViT's second seeds
  for r in fst_adaptive fst_is; do echo "vit $r 1 $VIT --recipe=$r"; done
  # importance sampling over the whole batch (one group per call), keeping 1/2 or 9/16
  G1='--recipe=fst_is --sample-group 4096'
  G2='--recipe=fst_is --sample-group 4096 --sample-share 0.5625'
  G3='--recipe=fst_is --sample-group 4096 --sample-share 0.59'
  for s in 0 1; do
    echo "gpt fst_is-g4096 $s $GPT $G1"
    echo "gpt fst_is-g4096-s0.5625 $s $GPT $G2"
  done
  # 9/16 of the whole batch: +3.1 % on the GPT at 0.92 sparse; its ViT and ResNet-20 seeds,
  # and 0.59 (the largest share that keeps the GPT's FLOPs 0.9 sparse)
  echo "resnet20 fst_adaptive 0 $R20 --recipe=fst_adaptive"
  echo "vit fst_is-g4096-s0.5625 0 $VIT $G2"
  echo "resnet20 fst_is-g4096-s0.5625 0 $R20 $G2"
  for s in 0 1; do echo "gpt fst_is-g4096-s0.59 $s $GPT $G3"; done
  # 0.59: +2.8 % on the GPT at 0.90 sparse; its ViT seeds, then ResNet-20's
  for s in 0 1; do echo "vit fst_is-g4096-s0.59 $s $VIT $G3"; done
  # fst_is_batch: 0.59 of the whole batch, convolutions sampling whole samples (one
  # full-width product: ResNet-20's sampling 17 % -> 5 % of a dense step); the GPT has no
  # convolution (its runs equal fst_is-g4096-s0.59's: a check)
  echo "resnet20 fst_is_batch 0 $R20 --recipe=fst_is_batch"
  for s in 0 1; do echo "vit fst_is_batch $s $VIT --recipe=fst_is_batch"; done
  for s in 0 1; do echo "gpt fst_is_batch $s $GPT --recipe=fst_is_batch"; done
  for s in 1 2; do echo "resnet20 fst_is_batch $s $R20 --recipe=fst_is_batch"; done
  for s in 0 1 2; do echo "resnet20 fst_is-g4096-s0.59 $s $R20 $G3"; done
  echo "resnet20 dense 2 $R20 --recipe=dense"
  echo "resnet20 fst2-mvue 2 $R20 $MVUE"
  echo "vit fst_is-g4096-s0.5625 1 $VIT $G2"
  echo "vit fst_is-g4096 0 $VIT $G1"
  # the weight masks S_K / S_Co recomputed every 40 steps (the weight side's cheapest lever)
  echo "vit fst_adaptive-mask40 0 $VIT --recipe=fst_adaptive --mask-interval 40"
  echo "resnet20 fst_adaptive 1 $R20 --recipe=fst_adaptive"
  echo "resnet20 fst_adaptive 2 $R20 --recipe=fst_adaptive"
  echo "gpt fst_is-finish0.08 1 $GPT --recipe=fst_is --dense-finish 0.08"
  echo "gpt fst_adaptive-b0.5 0 $GPT --recipe=fst_adaptive --variance-budget 0.5"
  echo "vit fst_rand 1 $VIT --recipe=fst_rand"
  echo "resnet20 fst_adaptive-mask40 0 $R20 --recipe=fst_adaptive --mask-interval 40"
  echo "resnet20 fst_is 0 $R20 --recipe=fst_is"
  echo "resnet20 fst_rand 0 $R20 --recipe=fst_rand"
  for s in 1 2; do echo "resnet20 fst_is-g4096-s0.5625 $s $R20 $G2"; done
  # the weight masks every 40 steps under the candidate, on the CNN (seed 0: paired with
  # fst_is_batch's own seed 0)
  echo "resnet20 fst_is_batch-mask40 0 $R20 --recipe=fst_is_batch --mask-interval 40"
  # ... and on the transformers (seed 0, paired with the recipe's own seed 0)
  echo "vit fst_is_batch-mask40 0 $VIT --recipe=fst_is_batch --mask-interval 40"
  echo "gpt fst_is_batch-mask40 0 $GPT --recipe=fst_is_batch --mask-interval 40"
  echo "vit fst_is-g4096 1 $VIT $G1"
  # the GPT's seeds 2 to 5 of dense and the three candidates (the goal's margins are of the
  # size of the seed spread there)
  for s in 2 3 4 5; do
    echo "gpt dense $s $GPT --recipe=dense"
    echo "gpt fst_is_batch $s $GPT --recipe=fst_is_batch"
    echo "gpt fst2-mvue $s $GPT MVUE"
    echo "gpt fst2-mvue-maskeddecay $s $GPT MVUE $MD"
  done
  # ResNet-20 seeds 1 and 2 of fst_mvue with masked decay (its seed 0: -0.57 points):
  # whether one setting of it is within the goal of every task
  for s in 1 2; do echo "resnet20 fst2-mvue-maskeddecay $s $R20 MVUE $MD"; done
  # fst_is_batch with masked decay on the GPT (the lever that took fst_mvue's gap there from
  # +3.1 to +2.5 %), paired with its own and dense's seeds 0 to 5 (no better: not run on the
  # ViT)
  for s in 0 1 2 3 4 5; do echo "gpt fst_is_batch-maskeddecay $s $GPT --recipe=fst_is_batch $MD"; done
}

collected() {  # task variant seed: the run is committed under docs/ (a fresh machine has no runs/)
  local done='"status": "completed"'
  grep -q "$done" "docs/results/quality/$1/$2-seed$3/summary.json" 2>/dev/null && return 0
  case "$1 $2" in  # the earlier full-data runs of the same setting (quality_collect.EARLIER)
    "resnet20 dense" | "resnet20 fst") grep -q "$done" "docs/results/full/$2-seed$3/summary.json" 2>/dev/null ;;
    *) return 1 ;;
  esac
}

run_job() {  # task variant seed flags...
  local task=$1 variant=$2 seed=$3; shift 3
  local out="$ROOT/$task/$variant-seed$seed" flags=()
  for f in "$@"; do
    case $f in MVUE) flags+=($MVUE) ;; --recipe=*) flags+=(--recipe "${f#--recipe=}") ;; *) flags+=("$f") ;; esac
  done
  if grep -q '"status": "completed"' "$out/summary.json" 2>/dev/null; then return 0; fi
  if [ -f "$out/config.json" ]; then
    fullsparse train --resume --out "$out" --threads 1 --no-progress
  else
    fullsparse train "${flags[@]}" --seed "$seed" --threads 1 --no-plot --no-progress --out "$out"
  fi
}

case ${1:-list} in
  list) jobs ;;
  worker)
    mkdir -p "$ROOT/.claims"
    jobs | while read -r task variant seed rest; do
      collected "$task" "$variant" "$seed" && continue
      mkdir "$ROOT/.claims/$task-$variant-$seed" 2>/dev/null || continue
      echo "$(date -u +%FT%TZ) start $task $variant seed $seed"
      # shellcheck disable=SC2086
      run_job "$task" "$variant" "$seed" $rest
      rc=$?
      echo "$(date -u +%FT%TZ) end $task $variant seed $seed rc=$rc"
    done ;;
  *) echo "usage: $0 list|worker" >&2; exit 2 ;;
esac
