#!/usr/bin/env bash
# Device machine, last call: unpack the carried GPU wheels, make nvidia.nvimgcodec importable beside the
# image's own nvidia packages, then run the device check (device machine only).
set -u
mkdir -p /tmp/nvx && tar -xJf .c4/nvx.tar.xz -C /tmp/nvx
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
export PYTHONPATH=/tmp/site LD_LIBRARY_PATH=/tmp/nvx/nvidia/cu13/lib:${LD_LIBRARY_PATH:-} PYTHONUNBUFFERED=1
python3 -c "
import onnxruntime as o, numpy, PIL, cupy
from nvidia import nvimgcodec
print('ort', o.__version__, o.get_available_providers()); print('numpy', numpy.__version__, 'pillow', PIL.__version__, 'cupy', cupy.__version__, 'nvimgcodec', nvimgcodec.__version__)
" 2>&1 | tail -5
nproc; free -g | head -2
scripts/device_check.sh "$@" 2>&1 | tee $OUT/device-check-console.log
cp docs/gpu/device-check-* $OUT/ 2>/dev/null; ls -la $OUT
