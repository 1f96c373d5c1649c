#!/usr/bin/env bash
# The bundled model's long run: a PerceiverS conditioned on composer, length, style and the keys
# sounding, trained on ASAP by two processes (one per core) under a warmup-stable-decay schedule.
# The rate is held until the last DECAY steps, so the run resumes and extends across sessions, and
# a finished model can be branched off any checkpoint with a short decay of its own.
#
#   bash recipes/bundle_run.sh                 # start, or resume, the held run (runs/bundle/full)
#   DECAY=400 bash recipes/bundle_run.sh decay # branch a decay off its latest checkpoint (or
#                                              #   STEP=N's): runs/bundle/decay_<step>, DECAY steps more
#   STEPS=8000 DECAY=1200 [SEED=2] [REINIT=a,b] bash recipes/bundle_run.sh finetune
#                                              # go on from the bundled model's weights (a fresh
#                                              #   optimizer, warm-up, held rate, decay; seed 1, so
#                                              #   other crops than its first run): runs/bundle/finetune;
#                                              #   REINIT: parameter prefixes that start afresh;
#                                              #   overrides after `finetune` are added (e.g.
#                                              #   model.style_logits=true, README: Conditioning)
#   FROM=runs/bundle/finetune OUT=runs/bundle/stage3 STEPS=4700 DECAY=800 bash recipes/bundle_run.sh branch
#                                              # go on from a run's latest checkpoint (STEP=N: that
#                                              #   one) with the recipe as it now stands: optimizer and
#                                              #   schedule carry on, what was added starts as a no-op
#   STEPS=1200 bash recipes/bundle_run.sh twin # its unconditioned twin (runs/bundle/twin): the same
#                                              #   data, seed and held rate, so the two runs' validation
#                                              #   NLL (the same windows) compare at equal budget
#
# Then evaluate and bundle the decayed model:
#   MAIN=runs/bundle/decay_<step> OUT=runs/final DATA=data/asap-exact BASELINE=0 bash recipes/default_model.sh
#   python recipes/bundle_model.py --runs runs/final --data data/asap-exact
set -euo pipefail
cd "$(dirname "$0")/.."

ASAP=${ASAP:-../shared/data/asap}
DATA=${DATA:-data/asap-exact}
RUN=${RUN:-runs/bundle/full}
STEPS=${STEPS:-18000}  # about 37 M target tokens: three passes over ASAP train
DECAY=${DECAY:-1800}
PROCS=${PROCS:-2}
# bf16 autocast trains ~1.4x faster at the same NLL where the CPU has bf16 units (bench/bf16_nll.py)
if [ -z "${PRECISION:-}" ]; then
    PRECISION=fp32; grep -qE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null && PRECISION=bf16
fi

bash scripts/setup.sh >/dev/null
. .venv/bin/activate
perceiver-music prepare "$ASAP" --out "$DATA"

# keyboard_logits lets the model itself rule out what the keys down make impossible (a re-strike
# of a held key, the release of one up), which attention alone had not learnt by 25 M tokens;
# context_dropout shows a tenth of the windows no context before their latents, as at a piece's
# start, where only the conditions say what the piece is (else the context makes the style
# vector redundant: the model had turned it off); timing_remaining tells the time left, and
# end_windows trains on endings 3-4 times as often as the data holds them: both for pieces that
# end at the length asked for (bench/conditioning_music.py endings)
recipe=(--config asap_cpu --data "$DATA" 'model.condition=[label, timing, style, keyboard]'
        model.timing_remaining=true model.keyboard_logits=true model.context_dropout=0.1 data.end_windows=0.05
        train.batch_size=$((8 / PROCS)) train.schedule=wsd train.eval_every=600 train.eval_windows=192
        train.ckpt_every=250 train.seed=0 train.precision=$PRECISION)
launch=(torchrun --standalone --nproc_per_node "$PROCS" -m perceiver_music train)
export OMP_NUM_THREADS=1

branch_point() {  # run: its latest checkpoint's folder name, or with STEP=N that step's
    if [ -n "${STEP:-}" ]; then printf 'step_%07d' "$STEP"; return; fi
    ls "$1/checkpoints" | grep -E '^step_[0-9]+$' | tail -1  # not .tmp, not .damaged
}

if [ "${1:-train}" = decay ]; then
    last=$(branch_point "$RUN")
    step=$((10#${last#step_}))
    out=runs/bundle/decay_$step
    resume=(); [ -e "$out/config.json" ] && resume=(--resume)
    [ -e "$out/config.json" ] || resume=(--branch "$RUN/checkpoints/$last")
    exec "${launch[@]}" "${recipe[@]}" --out "$out" "${resume[@]}" \
        train.steps=$((step + DECAY)) train.decay_steps="$DECAY"
fi
if [ "${1:-train}" = finetune ]; then
    # The session's machine is not kept between sessions, and a checkpoint other than the bundled
    # model is never committed: the bundled model is where a longer training goes on from.
    out=runs/bundle/finetune
    resume=(); [ -e "$out/config.json" ] && resume=(--resume)
    [ -e "$out/config.json" ] || resume=(--init "${INIT:-bundled}")
    exec "${launch[@]}" "${recipe[@]}" train.seed="${SEED:-1}" --out "$out" "${resume[@]}" \
        train.steps="$STEPS" train.decay_steps="$DECAY" ${REINIT:+"train.reinit=[$REINIT]"} "${@:2}"
fi
if [ "${1:-train}" = branch ]; then
    # Go on from a run's latest checkpoint (or STEP=N's) with the recipe as it stands now: its
    # optimizer and schedule carry on, and what the recipe added since (conditioning, keyboard
    # logits) starts as a no-op. FROM=run OUT=new run.
    last=$(branch_point "$FROM")
    resume=(); [ -e "$OUT/config.json" ] && resume=(--resume)
    [ -e "$OUT/config.json" ] || resume=(--branch "$FROM/checkpoints/$last")
    seed=$(python -c "import json; print(json.load(open('$FROM/config.json'))['train']['seed'])")
    exec "${launch[@]}" "${recipe[@]}" train.seed="$seed" --out "$OUT" "${resume[@]}" \
        train.steps="$STEPS" train.decay_steps="$DECAY"
fi
if [ "${1:-train}" = twin ]; then
    twin=runs/bundle/twin
    resume=(); [ -e "$twin/config.json" ] && resume=(--resume)
    # decay_steps=0: held to its end, as the main run is until its own decay
    exec "${launch[@]}" "${recipe[@]}" 'model.condition=[]' model.timing_remaining=false model.keyboard_logits=false model.context_dropout=0 --out "$twin" "${resume[@]}" \
        train.steps="$STEPS" train.decay_steps=0
fi
resume=(); [ -e "$RUN/config.json" ] && resume=(--resume)
exec "${launch[@]}" "${recipe[@]}" --out "$RUN" "${resume[@]}" train.steps="$STEPS" train.decay_steps="$DECAY"
