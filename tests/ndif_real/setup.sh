#!/usr/bin/env bash
# One-time setup for the opt-in real-NDIF test (tests/ndif_real/test_ndif_real.py).
#
#   tests/ndif_real/setup.sh [VENV]        # default /work/ndif-venv, or $NDIF_REAL_VENV
#
# Makes a Python 3.12 venv OUTSIDE the repository with the NDIF server (ndif 0.1.2, which
# needs Python >= 3.12), the nnsight it speaks (0.8.1), moto's S3 server in place of NDIF's
# object store, and einops (attnflow's shipped reductions use it; NDIF's `ext` extra has it);
# and Debian's redis-server.  About 6 GB (pip takes torch's CUDA build, which runs on CPU),
# 5-10 minutes with a warm pip cache.  The test itself runs in attnflow's own environment.
set -euo pipefail
VENV="${1:-${NDIF_REAL_VENV:-/work/ndif-venv}}"
# the first Python 3.12 that runs (a pyenv shim can exist and still refuse to run)
if [ -z "${PY312:-}" ]; then
    for c in python3.12 /root/.pyenv/versions/3.12*/bin/python3.12; do
        if "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then PY312="$c"; break; fi
    done
fi
[ -n "${PY312:-}" ] || { echo "setup.sh: no working Python 3.12 found; set PY312=/path/to/python3.12" >&2; exit 2; }
if ! command -v redis-server >/dev/null; then
    apt-get update -qq && apt-get install -y -qq redis-server
fi
[ -x "$VENV/bin/python" ] || "$PY312" -m venv "$VENV"
"$VENV/bin/pip" install -q 'ndif[api,ray]==0.1.2' 'nnsight==0.8.1' 'moto[server]' 'einops==0.8.2'
"$VENV/bin/python" -c "import ndif, nnsight, ray, moto, einops; print('NDIF venv ready:', nnsight.__version__, ray.__version__)"
echo "run: NDIF_REAL_VENV=$VENV ATTNFLOW_NDIF_REAL=1 python -m pytest -q -s tests/ndif_real/"
