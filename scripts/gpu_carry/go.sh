#!/usr/bin/env bash
# Device machine, last call: unpack the carried GPU wheels, make nvidia.nvimgcodec importable
# beside the image's own nvidia packages, then run the device check (scripts/device_check.sh)
# with its results written straight to $OUT (DEVICE_CHECK_OUT), the folder that comes back;
# nothing is written into the checkout's docs/gpu/ there. Extra arguments go to the check
# (say --stages alignment,fidelity for a rerun on the still-warm machine).
set -u
if [ ! -d /tmp/site/onnxruntime ]; then
    echo "onnxruntime-gpu is not unpacked in /tmp/site: run the three transfer calls first" >&2
    exit 3
fi
mkdir -p /tmp/nvx
[ -d /tmp/nvx/nvidia ] || tar -xJf .c4/nvx.tar.xz -C /tmp/nvx
cp -r /tmp/nvx/simplejpeg /tmp/nvx/onnxconverter_common /tmp/site/
cat > /tmp/site/sitecustomize.py <<'PY'
# nvImageCodec was carried to /tmp/nvx/nvidia: add it to the image's nvidia namespace.
import sys
try:
    import nvidia
    if "/tmp/nvx/nvidia" not in list(nvidia.__path__):
        nvidia.__path__.append("/tmp/nvx/nvidia")
except ImportError:
    sys.path.append("/tmp/nvx")
PY
export PYTHONPATH=/tmp/site LD_LIBRARY_PATH=/tmp/nvx/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}
export PYTHONUNBUFFERED=1 DEVICE_CHECK_OUT=$OUT DEVICE_CHECK_WORK=/tmp/device-check-work
python3 -c "
import onnxruntime as o, numpy, PIL, cupy
from nvidia import nvimgcodec
print('ort', o.__version__, o.get_available_providers()); print('numpy', numpy.__version__, 'pillow', PIL.__version__, 'cupy', cupy.__version__, 'nvimgcodec', nvimgcodec.__version__)
" 2>&1 | tail -5
nproc; free -g | head -2
set -o pipefail
scripts/device_check.sh "$@" 2>&1 | tee "$OUT/device-check-console.log"
rc=$?
ls -la "$OUT"
exit $rc
