#!/usr/bin/env bash
# Prepares what a lent GPU machine (no package registry; 64 MiB per call; Python 3.12) needs to
# run scripts/device_check.sh: onnxruntime-gpu, nvImageCodec + nvJPEG, simplejpeg and
# onnxconverter-common, packed into folders .c1 .. .c4 of at most ~62 MiB each (ignored by git).
# The image already has torch, cupy-cuda13x and the CUDA libraries; not TensorRT, whose
# libraries (over a gigabyte) no lease can carry, so the check records that stage's skip.
#
# onnxruntime-gpu's wheel is 255 MB; without libonnxruntime.so (the Python module does not load
# it) and its transformers tools, xz -9e brings it to about 193 MB: three calls of one part each.
# Then, back to back (the machine keeps /tmp only while warm, 30 s after a call), within the
# task's 15 minutes of device time (the start, about 1-2 minutes, counts):
#   run(carry=[".c1"], "mkdir -p /tmp/parts && mv .c1/ort.part0 /tmp/parts/")
#   run(carry=[".c2"], "mv .c2/ort.part1 /tmp/parts/")
#   run(carry=[".c3"], "bash .c3/unpack.sh")
#   run(carry=[".c4"], "bash .c4/go.sh", timeout_s=480)   # the check: stopped at 7 minutes
# That leaves about 4 minutes for one rerun of some stages on the warm machine, e.g.
#   run(carry=[".c4"], "bash .c4/go.sh --stages alignment,fidelity", timeout_s=240)
# then give_back. Results come back in $OUT (device-check-ARCH.json, .log, console log);
# copy them into docs/gpu/ by hand, with the README's figures, once read.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
work=${WORK:-/tmp/gpu-carry}
mkdir -p "$work" && cd "$work"
plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
get() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp $plat -d wheels "$@"; }
get onnxruntime-gpu==1.31.1 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg simplejpeg==1.9.0
python3 -m pip download -q --no-deps --only-binary=:all: -d wheels onnxconverter-common
rm -rf ort nvx && mkdir ort nvx
(cd ort && unzip -q ../wheels/onnxruntime_gpu-*.whl \
   && rm -rf onnxruntime/transformers onnxruntime/capi/libonnxruntime.so.*)
(cd nvx && for w in ../wheels/nvidia_*.whl ../wheels/simplejpeg-*.whl ../wheels/onnxconverter_common-*.whl; do
   unzip -q -o "$w"; done
 find . -name 'nvimgcodec_impl.cpython-3*' ! -name '*cpython-312-*' -delete
 rm -f nvidia/nvimgcodec/extensions/libopencv_ext*)
[ -f ort.tar.xz ] || (cd ort && tar -cf - . | xz -9e --x86 --lzma2=preset=9e,dict=384MiB -T1 > ../ort.tar.xz)
(cd nvx && tar -cf - . | xz -9 > ../nvx.tar.xz)
rm -f ort.part*; split -b 64300000 -d -a 1 ort.tar.xz ort.part
sha256sum ort.tar.xz | cut -c1-64 > ort.sha
cd "$repo"
for i in 1 2 3 4; do rm -rf ".c$i"; mkdir ".c$i"; done
mv "$work/ort.part0" .c1/; mv "$work/ort.part1" .c2/; mv "$work/ort.part2" "$work/ort.sha" .c3/
cp "$work/nvx.tar.xz" .c4/
cp scripts/gpu_carry/unpack.sh .c3/ && cp scripts/gpu_carry/go.sh .c4/
grep -qx '/.c\[1-4\]/' .git/info/exclude 2>/dev/null || echo '/.c[1-4]/' >> .git/info/exclude
du -sh .c1 .c2 .c3 .c4
