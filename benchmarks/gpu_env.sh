# Sourced by the GPU scripts: OUT (their first argument, $OUT or /tmp/ddpm-gpu), PYTHONPATH, and the
# wheels carried in .whl/ (diffusers, for a machine without it) installed to /tmp/site.
out=${1:-${OUT:-/tmp/ddpm-gpu}}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
fi
