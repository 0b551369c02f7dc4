#!/usr/bin/env bash
# Before a device call of bench/gpu_session.sh (on the development machine, once): what the
# device machine's image lacks goes into two git-ignored folders that the call carries,
# .whl/ (h5netcdf's wheel, pure Python) and .data/fashion-mnist/ (the four IDX files).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
exclude=$(git rev-parse --git-path info/exclude)
for d in /.whl/ /.data/; do grep -qxF "$d" "$exclude" 2>/dev/null || echo "$d" >> "$exclude"; done
mkdir -p .whl .data/fashion-mnist
version=$("$PY" -c "from importlib.metadata import version; print(version('h5netcdf'))")
"$PY" -m pip download -q --no-deps --only-binary=:all: -d .whl "h5netcdf==$version"
cp /usr/share/datasets/fashion-mnist/*-ubyte* .data/fashion-mnist/
du -sh .whl .data
echo "carry [\".whl\", \".data\"] in the device call"
