#!/usr/bin/env bash
# The whole GPU suite in one command on the GPU machine (bench/gpu_suite.py's header says what it runs and writes).
#
# Here, once, with network:   bash bench/gpu_wheels.sh .whl && echo /.whl/ >> .git/info/exclude
# Then the device tool:       run(command="bash bench/gpu_suite.sh", carry=[".whl"], timeout_s=600)
# and copy the files that come back from $OUT into bench/results/.
#
# Installs the carried wheels (torchao, torchtitan 0.2.2 and its dependencies, TRL, datasets) into /tmp/site
# when .whl is there, then runs the suite with --out $OUT (or bench/results off the device tool). Extra
# arguments go to gpu_suite.py (e.g. --only train,decode or --budget train=240).
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "error: installing the wheels in .whl failed" >&2; exit 2; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec python3 bench/gpu_suite.py --out "${OUT:-bench/results}" "$@"
