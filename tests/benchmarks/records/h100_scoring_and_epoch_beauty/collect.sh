#!/bin/bash
# Wait up to $1 seconds for the driver to finish, then bring back what it wrote so far.
for _ in $(seq 1 "$1"); do [ -f /tmp/e4s/out/DONE ] && break; sleep 1; done
cp -r /tmp/e4s/out/. "$OUT"/ 2>/dev/null
cat /tmp/e4s/out/driver.log; for f in /tmp/e4s/out/*.log; do echo "== $f"; grep -v "^\s*$" "$f" | tail -4; done
