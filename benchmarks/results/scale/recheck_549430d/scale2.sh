cd /work/main
i=10
for kind in exact exact_legacy exact exact_legacy; do
  i=$((i+1))
  OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false nice -n 10 timeout 500 .venv/bin/python -m giva.bench.scale measure llama-0.5b $kind /tmp/h9/scale_${i}_${kind}.json > /tmp/h9/scale_${i}_${kind}.log 2>&1
  echo "$i llama-0.5b $kind rc=$? $(date -u +%T)" >> /tmp/h9/scale_progress.txt
done
