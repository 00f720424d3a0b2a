#!/bin/bash
# The three mutants of issue 15, applied by hand to a scratch copy of src/: each must fail its named test (and, for
# the record, the old selection of tests is run on it too). The worktree itself is never modified.
# Usage, from the repository root: reports/mutation/issue_mutants.sh [python] > reports/mutation/issue_mutants.txt
set -u
PY=${1:-.venv/bin/python}
ROOT=$PWD
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
OLD="tests/test_engine.py tests/test_gtp.py tests/test_ppt.py tests/test_evit.py tests/test_dense.py"

apply() {  # file under src/tokenreduce, exact old text, new text
  rm -rf "$SCRATCH/src" && cp -r "$ROOT/src" "$SCRATCH/src"
  "$PY" - "$SCRATCH/src/tokenreduce/$1" "$2" "$3" <<'PY'
import sys
path, old, new = sys.argv[1:]
text = open(path).read()
assert text.count(old) == 1, (path, old)
open(path, "w").write(text.replace(old, new))
PY
  diff "$ROOT/src/tokenreduce/$1" "$SCRATCH/src/tokenreduce/$1"
}
run() {  # label, tests...
  label=$1; shift
  PYTHONPATH="$SCRATCH/src" nice -n 10 "$PY" -m pytest -q -p no:cacheprovider "$@" 2>&1 | tail -4 | sed "s/^/  [$label] /"
}

echo "== 1. Top-K keeps the least attended image tokens"
apply methods/topk.py 'argsort(dim=-1, descending=True, stable=True)' 'argsort(dim=-1, descending=False, stable=True)'
run named tests/test_hand_computed.py::test_topk_keeps_the_most_attended_image_tokens_in_raster_order
run old-selection $OLD
echo "== 2a. EViT fuses the dropped tokens with uniform weights (ones)"
apply methods/evit.py 'weight = scores.gather(1, drop).unsqueeze(-1)' \
  'weight = torch.ones_like(scores.gather(1, drop)).unsqueeze(-1)'
run named tests/test_hand_computed.py::test_evit_fuses_the_least_attended_with_their_attention_as_weights_and_adds_their_sizes
run old-selection $OLD
echo "== 2b. EViT fuses the dropped tokens with uniform weights (1 / dropped)"
apply methods/evit.py 'weight = scores.gather(1, drop).unsqueeze(-1)' \
  'weight = torch.full_like(scores.gather(1, drop), 1.0 / drop.shape[1]).unsqueeze(-1)'
run named tests/test_hand_computed.py::test_evit_fuses_the_least_attended_with_their_attention_as_weights_and_adds_their_sizes
echo "== 3. no size bias on the fused SDPA path (attn_mask=None)"
apply core/attention.py 'attn_mask=bias,' 'attn_mask=None,'
run named "tests/test_hand_computed.py::test_size_bias_equals_log_size_on_the_logits_and_equals_copies[fused_sdpa]" \
  "tests/test_hand_computed.py::test_attention_of_a_module_with_sizes_equals_the_model_with_copies[fused_sdpa]"
run old-selection $OLD
echo "== the unmutated scratch copy passes the named tests"
rm -rf "$SCRATCH/src" && cp -r "$ROOT/src" "$SCRATCH/src"
run clean tests/test_hand_computed.py -k "topk_keeps_the_most or evit_fuses_the_least or size_bias_equals or module_with_sizes"
