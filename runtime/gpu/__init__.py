"""GPU decoding for the runtime: nvImageCodec JPEG decode, then the reference resize and centre
crop as CUDA kernels (cupy), written straight into the batch the model reads through
IOBinding (the schedule that drives it is runtime.schedules.GpuDecode, the buffer binding
Engine.bound). Imported only when GPU decoding is asked for; nothing here imports torch.

    resample   the NumPy reference of the crop-window resampling (bit-exact with Pillow)
    kernels    the same two passes as cupy RawKernels, batched over images
    decoder    GpuDecoder: items -> uint8 NHWC device batch + per-item errors; open_decoder,
               gpu_decode_available (the facts runtime.resolve decides with)
    tensorrt   finding libnvinfer from the tensorrt-cu13 wheels, TensorRT provider options
    fidelity   embeddings of a candidate path against the exact CPU transform
"""
