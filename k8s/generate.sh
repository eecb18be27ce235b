#!/usr/bin/env bash
# Regenerates the example manifests in k8s/ (tests/launch/k8s/test_k8s.py checks they are in sync).
# Usage, from the repository root: bash k8s/generate.sh [OUTPUT_DIR]   (default: k8s)
# Set IMAGE and BUCKET to write manifests for your own image and bucket.
#
# Run ids: the Job and the JobSet take theirs from their own UID when they are created, so
# applying them again after deleting them starts a new run. TFJob pods carry no such id, so
# the TFJob manifest gets TFJOB_RUN_ID (default: a fixed one, so that this example stays
# reproducible): set a new TFJOB_RUN_ID for every new TFJob run.
set -euo pipefail

out="${1:-k8s}"
python="${PYTHON:-python}"
image="${IMAGE:-disttrain:0.1.0}"
bucket="${BUCKET:-your-bucket}"
tfjob_run_id="${TFJOB_RUN_ID:-disttrain-demo-1}"

for format in job jobset tfjob trainjob; do
  run_id=()
  if [ "$format" = tfjob ]; then
    run_id=(--run-id "$tfjob_run_id")
  fi
  "$python" -m launch.k8s --format "$format" --output "$out/$format" \
    --name disttrain-demo --workers 2 --image "$image" --cpu 2 --memory 4Gi \
    --checkpoint-url "gs://$bucket/disttrain" ${run_id[@]+"${run_id[@]}"} \
    -- python -m disttrain.demo --epochs 20 --output-dir '$(DISTTRAIN_CHECKPOINT_URL)'
done
