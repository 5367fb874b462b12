cd /work/main
for kind in sketch exact exact_legacy exact exact_legacy; do
  i=$((i+1))
  OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false nice -n 10 timeout 600 .venv/bin/python -m giva.bench.scale measure smollm2-135m $kind /tmp/h9/scale_${i}_${kind}.json > /tmp/h9/scale_${i}_${kind}.log 2>&1
  echo "$i $kind rc=$? $(date -u +%T)" >> /tmp/h9/scale_progress.txt
done
