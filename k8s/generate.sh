#!/usr/bin/env bash
# Regenerates the example manifests in k8s/ (tests/test_k8s.py checks they are in sync).
# Usage, from the repository root: bash k8s/generate.sh [OUTPUT_DIR]   (default: k8s)
# Set IMAGE and BUCKET to write manifests for your own image and bucket.
set -euo pipefail

out="${1:-k8s}"
python="${PYTHON:-python}"
image="${IMAGE:-disttrain:0.1.0}"
bucket="${BUCKET:-your-bucket}"

for format in job jobset tfjob; do
  "$python" -m launch.k8s --format "$format" --output "$out/$format" \
    --name disttrain-demo --workers 2 --image "$image" --cpu 2 --memory 4Gi \
    --checkpoint-url "gs://$bucket/disttrain" \
    -- python -m disttrain.demo --epochs 20 --output-dir '$(DISTTRAIN_CHECKPOINT_URL)'
done
