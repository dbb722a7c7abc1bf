#!/bin/bash
# Wait (at most $1 seconds) for the driver (driver.sh), then pack what it produced since it started into $OUT.
END=$((SECONDS + ${1:-540}))
while [ $SECONDS -lt $END ] && [ ! -f /tmp/e4s/DONE ]; do sleep 10; done
cd /tmp/e4s || exit 1
cat logs/driver.log
tail -3 logs/stage0.log logs/ddp_*.log logs/chain*.log 2>/dev/null
for f in results/paper/logs/runs/*/*/*/seed~*.log; do [ $f -nt marker ] || continue
  echo "== $f"; grep -h -E "gpu-slot|epoch [0-9]|Error|error" $f | tail -3; done
find results/paper/runs -name run.json -newer marker | sort | sed 's/^/new /'
nvidia-smi --query-gpu=index,name,utilization.gpu,memory.used --format=csv
uptime
find results/paper/runs -newer marker -type f ! -path '*checkpoints*' ! -path '*components*' ! -name '*.pt' > /tmp/list
ls ddp/*/run.json >> /tmp/list 2>/dev/null
tar czf /tmp/pack.tgz -T /tmp/list logs results/paper/logs results/paper/benchmarks results/paper/data/*/dataset.json \
  resources/backbones/*/backbone.json resources/encoders/*/backbone.json 2>/dev/null
cd $OUT && cp /tmp/pack.tgz . && split -b 15000000 pack.tgz pack.part_ && rm pack.tgz; ls -la $OUT
