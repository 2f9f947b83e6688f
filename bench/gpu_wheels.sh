#!/usr/bin/env bash
# The wheels bench/gpu.py needs on the lent CUDA machine, whose image has torch (and opt_einsum, tqdm, numpy,
# scipy, scikit-learn, pandas, matplotlib, torchvision, pyyaml, filelock, lightning, pytest) but not pyro-ppl and
# has no internet: pyro-ppl and its pyro-api, both pure Python, fetched into .whl/ (ignored by git; about 0.8 MB).
# Run here, once, from anywhere in the repository; then carry .whl (bench/gpu.py's header has the command).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
mkdir -p .whl
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl pyro-ppl==1.9.2 pyro-api==0.1.2
ls -l .whl/*.whl
du -sh .whl
