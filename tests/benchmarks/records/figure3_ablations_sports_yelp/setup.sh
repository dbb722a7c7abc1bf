# Sourced by the driver scripts from the repository copy: the wheels the device lacks (only those whose
# distribution is not installed there) into /tmp/site, and an `e4srec` command that runs this checkout.
if [ ! -f /tmp/site/.done ]; then
  python3 - <<'PY'
import importlib.metadata as md, pathlib, subprocess, sys
missing = []
for wheel in sorted(pathlib.Path("/tmp/payload/whl").glob("*.whl")):
    try:
        md.distribution(wheel.name.split("-")[0])
    except md.PackageNotFoundError:
        missing.append(str(wheel))
print("setup: installing", " ".join(pathlib.Path(m).name.split("-")[0] for m in missing), flush=True)
subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", "/tmp/site", *missing], check=True)
PY
  mkdir -p /tmp/site/bin
  printf '#!/bin/sh\nexec python3 -m e4srec.cli "$@"\n' > /tmp/site/bin/e4srec && chmod +x /tmp/site/bin/e4srec
  touch /tmp/site/.done
fi
export PYTHONPATH=/tmp/site:/tmp/e4s/repo PATH=/tmp/site/bin:$PATH
