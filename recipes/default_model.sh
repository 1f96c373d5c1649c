#!/usr/bin/env bash
# Trains the bundled default model: a small PerceiverS on the ASAP performances (split by piece),
# and, with the same recipe and step budget, its Perceiver AR baseline (one full cross-attention,
# baseline segmentation) so the model card can compare the two.
#
#   bash recipes/default_model.sh                 # both models, then evaluate them
#   STEPS=300 bash recipes/default_model.sh       # a shorter budget
#   THREADS=1 PARALLEL=1 bash ...                 # train the two side by side, a core each
#   BASELINE_STEPS=4000 bash ...                  # the baseline on a smaller budget (the card says so)
#   OLD=runs/old_bundled bash ...                 # also measure the model being replaced (validity table)
#   UNCOND=runs/x bash ...                        # a conditioned model's unconditioned twin (same budget)
#   MAIN=runs/bundle/decay_2000 bash ...          # evaluate a model trained elsewhere (recipes/bundle_run.sh)
#   BASELINE=0 SETTINGS=0 COND_BENCH=0 bash ...   # skip the baseline, the sampling settings, the steering benches
#   GUIDANCE=1 bash ...                           # the composer and style benches without guidance (default 3)
#
# Runs on CPU or on a GPU when one is visible (train.precision=auto uses bf16 there).
# When it is done, `python recipes/bundle_model.py runs/default/perceivers` copies the weights
# into the package and writes the model card.
set -euo pipefail
cd "$(dirname "$0")/.."

ASAP=${ASAP:-../shared/data/asap}
DATA=${DATA:-data/asap}
OUT=${OUT:-runs/default}
STEPS=${STEPS:-1800}
BASELINE_STEPS=${BASELINE_STEPS:-$STEPS}
OLD=${OLD:-}
UNCOND=${UNCOND:-}
THREADS=${THREADS:-}
PARALLEL=${PARALLEL:-0}
MAIN=${MAIN:-}
BASELINE=${BASELINE:-1}
SETTINGS=${SETTINGS:-1}
COND_BENCH=${COND_BENCH:-1}
GUIDANCE=${GUIDANCE:-3}  # the steering benches' classifier-free guidance (README: Conditioning)

bash scripts/setup.sh >/dev/null
. .venv/bin/activate
[ -n "$THREADS" ] && export OMP_NUM_THREADS="$THREADS"

perceiver-music prepare "$ASAP" --out "$DATA"

common=(--config asap_cpu --data "$DATA" train.eval_every=300 train.eval_windows=128
        train.ckpt_every=300 train.seed=0)
run() {  # name, steps, overrides...
    local name=$1 steps=$2; shift 2
    if [ -d "$OUT/$name/checkpoints/step_$(printf %07d "$steps")" ]; then
        echo "$OUT/$name: already trained to step $steps"
        return
    fi
    if [ -e "$OUT/$name/config.json" ]; then resume=(--resume); else resume=(); fi
    perceiver-music train "${common[@]}" "train.steps=$steps" --out "$OUT/$name" "${resume[@]}" "$@" \
        > "$OUT/$name.log" 2>&1
}
mkdir -p "$OUT"
if [ -n "$MAIN" ]; then  # trained elsewhere: evaluate it as it is
    ln -sfn "$(realpath "$MAIN")" "$OUT/perceivers"
    last=$(ls "$MAIN/checkpoints" | grep -E '^step_[0-9]+$' | tail -1)
    STEPS=$((10#${last#step_}))
fi
models=(perceivers); [ "$BASELINE" = 1 ] && models+=(perceiver_ar)
if [ "$BASELINE" = 0 ]; then
    run perceivers "$STEPS"
elif [ "$PARALLEL" = 1 ]; then
    run perceivers "$STEPS" & a=$!
    run perceiver_ar "$BASELINE_STEPS" 'model.scales=[full]' data.segmentation=baseline & b=$!
    wait $a; wait $b
else
    run perceivers "$STEPS"
    run perceiver_ar "$BASELINE_STEPS" 'model.scales=[full]' data.segmentation=baseline
fi

# Likelihood on the held-out pieces, every token with full context.
likelihood() {  # name
    for split in valid test; do
        perceiver-music evaluate --ckpt "$OUT/$1" --data "$DATA" --split "$split" --out "$OUT/eval/$1-$split" --quiet
    done
}
if [ "$BASELINE" = 0 ]; then
    likelihood perceivers
elif [ "$PARALLEL" = 1 ]; then
    likelihood perceivers & a=$!
    likelihood perceiver_ar & b=$!
    wait $a; wait $b
else
    likelihood perceivers
    likelihood perceiver_ar
fi

# The metric suite: SAMPLES unconditioned pieces from each model against the test performances.
SAMPLES=${SAMPLES:-16}
SAMPLE_TOKENS=${SAMPLE_TOKENS:-2048}
for name in "${models[@]}"; do
    perceiver-music generate --ckpt "$OUT/$name" --out "$OUT/samples/$name" --num "$SAMPLES" \
        --tokens "$SAMPLE_TOKENS" --seed 1 --quiet --no-render
done
python - "$DATA" "$OUT/reference-test" <<'PY'
import json, os, sys
data, out = sys.argv[1], sys.argv[2]
meta = json.load(open(os.path.join(data, "meta.json")))
os.makedirs(out, exist_ok=True)
for i, piece in enumerate(p for p in meta["pieces"] if p["split"] == "test"):
    link = os.path.join(out, f"{i:03d}_" + os.path.basename(piece["path"]))
    if not os.path.lexists(link):
        os.symlink(os.path.join(meta["source"], piece["path"]), link)
PY
names=PerceiverS; [ "$BASELINE" = 1 ] && names=PerceiverS,PerceiverAR
perceiver-music evaluate --generated "${models[@]/#/$OUT/samples/}" \
    --names "$names" --reference "$OUT/reference-test" --out "$OUT/eval/sets"

# Sampling settings for the card: the same PerceiverS, four settings, the same comparison.
settings=("temperature-1.0:--temperature 1.0" "temperature-0.9:--temperature 0.9" "top-p-0.95:--top-p 0.95" "top-p-0.9:--top-p 0.9")
[ "$SETTINGS" = 1 ] || settings=()
dirs=()
for entry in "${settings[@]}"; do
    name=${entry%%:*}
    # shellcheck disable=SC2086  # the options are meant to split
    perceiver-music generate --ckpt "$OUT/perceivers" --out "$OUT/sampling/$name" --num "$SAMPLES" \
        --tokens "$SAMPLE_TOKENS" --seed 1 --quiet --no-render ${entry#*:}
    dirs+=("$OUT/sampling/$name")
done
[ "$SETTINGS" = 1 ] && perceiver-music evaluate --generated "${dirs[@]}" --reference "$OUT/reference-test" \
    --out "$OUT/eval/sampling" --no-plots

# Event validity as a listener meets it: 8 pieces of 45 s with generate's defaults (the keyboard
# mask on, re-strikes released), with the mask dropping re-strikes instead, and without the mask,
# from this model and, with OLD=CKPT, from the one it replaces.
validity=() names=()
for model in new ${OLD:+old}; do
    ckpt="$OUT/perceivers"; [ "$model" = old ] && ckpt=$OLD
    for mode in masked drop free; do
        flag=(); [ "$mode" = free ] && flag=(--no-keyboard-mask); [ "$mode" = drop ] && flag=(--restrike drop)
        validity+=("$OUT/validity/$model-$mode") names+=("$model-$mode")
        # The replaced model does not change: its pieces from an earlier run of the recipe stand.
        [ "$model" = old ] && [ -f "$OUT/validity/$model-$mode/generate.json" ] && continue
        perceiver-music generate --ckpt "$ckpt" --out "$OUT/validity/$model-$mode" --num 8 --seconds 45 \
            --seed 5 --quiet --no-render "${flag[@]}"
    done
done
perceiver-music evaluate --generated "${validity[@]}" --names "$(IFS=,; echo "${names[*]}")" \
    --reference "$OUT/reference-test" --out "$OUT/eval/validity" --no-plots

# A conditioned model (model.condition): what each condition is worth, and whether it steers.
if [ "$COND_BENCH" = 1 ] && python -c "import json,sys; sys.exit(0 if json.load(open('$OUT/perceivers/config.json'))['model']['condition'] else 1)"; then
    python bench/conditioning.py --ckpt "$OUT/perceivers" --data "$DATA" --split test \
        ${UNCOND:+--baseline "$UNCOND"} --out "$OUT/eval/conditioning/conditioning.json"
    python bench/conditioning.py --ckpt "$OUT/perceivers" --data "$DATA" --split test --at start \
        --out "$OUT/eval/conditioning/conditioning_start.json"
    python bench/conditioning_music.py composers --ckpt "$OUT/perceivers" --data "$DATA" --source "$ASAP" \
        --guidance "$GUIDANCE" --out "$OUT/eval/conditioning"
    python bench/conditioning_music.py endings --ckpt "$OUT/perceivers" ${UNCOND:+--baseline "$UNCOND"} \
        --out "$OUT/eval/conditioning"
    python bench/conditioning_music.py style --ckpt "$OUT/perceivers" --data "$DATA" --source "$ASAP" \
        --guidance "$GUIDANCE" --out "$OUT/eval/conditioning"
fi

echo "done: python recipes/bundle_model.py copies the PerceiverS model into the package"
