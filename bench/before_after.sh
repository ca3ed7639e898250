#!/usr/bin/env bash
# Before and after a change, on this machine: the main job's wall time (README's sampling command)
# and `admrt bench`'s table (guided-diffusion and every backend, variants alternating inside each
# run), the two admrt versions alternating (old new old new ...). Run it with nothing else running.
#
#   bash bench/before_after.sh OLD_ADMRT NEW_ADMRT OUT_DIR [ROUNDS]
#
# OLD_ADMRT / NEW_ADMRT: commands that run each version's `admrt` (e.g. an `admrt` of a venv
# holding an older checkout, and the current one).
set -euo pipefail
old=$1 new=$2 out=$3 rounds=${4:-3}
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "side,round,wall_s" > "$out/main_job.csv"
for round in $(seq 1 "$rounds"); do
  for side in old new; do
    cmd=${!side}
    start=$(date +%s.%N)
    $cmd sample --out "$tmp/$side-$round" --no-progress > /dev/null 2>&1
    end=$(date +%s.%N)
    echo "$side,$round,$(echo "$end - $start" | bc)" >> "$out/main_job.csv"
  done
done
for side in old new; do
  cmd=${!side}
  $cmd bench --preset fashion16-cond --classifier fashion16-classifier --batch 16 --steps ddim25 --dtype fp32 \
      --device cpu --reps 5 --compile --onnxruntime --package --out "$out/bench_$side.json" > "$out/bench_$side.log" 2>&1
done
python3 - "$out" <<'PY'
import csv, json, statistics, sys
out = sys.argv[1]
rows = list(csv.DictReader(open(f"{out}/main_job.csv")))
lines = ["| side | main job wall s (median, min-max) |", "|---|---|"]
for side in ("old", "new"):
    xs = [float(r["wall_s"]) for r in rows if r["side"] == side]
    lines.append(f"| {side} | {statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f}) |")
print("\n".join(lines))
PY
