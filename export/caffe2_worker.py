"""Runs exported Caffe2 nets in a real Caffe2 runtime (the `caffe2` package of torch 1.8.1).

This file is executed by the separate Python 3.8 environment (`make caffe2-env`), never imported by
the project: it may use only the standard library, NumPy and caffe2, and must stay Python 3.8
syntax. `export/caffe2_runtime.py` is its only caller:

    python caffe2_worker.py INIT_NET PREDICT_NET INPUTS.npz OUTPUTS.npz

INPUTS.npz holds one array per batch (`b0`, `b1`, ...) for the predict net's data input; OUTPUTS.npz
gets `b<i>/<output name>` for every batch and external output. A JSON line on stdout reports the
runtime's version and the operator types it ran. Exit status 2 with a one-line message on stderr
when the runtime refuses a net (unknown operator, bad arguments).
"""
import json
import sys


def _load(path, net_cls):
    net = net_cls()
    with open(path, "rb") as f:
        net.ParseFromString(f.read())
    return net


def main(argv):
    if len(argv) != 4:
        sys.stderr.write("usage: caffe2_worker.py INIT_NET PREDICT_NET INPUTS.npz OUTPUTS.npz\n")
        return 64
    init_path, predict_path, inputs_path, outputs_path = argv
    import numpy as np
    import torch
    from caffe2.proto import caffe2_pb2
    from caffe2.python import workspace

    init_net = _load(init_path, caffe2_pb2.NetDef)
    predict_net = _load(predict_path, caffe2_pb2.NetDef)
    filled = {out for op in init_net.op for out in op.output}
    data_inputs = [name for name in predict_net.external_input if name not in filled]
    if len(data_inputs) != 1:
        sys.stderr.write(f"predict net must have exactly one data input, found {data_inputs!r}\n")
        return 2
    data = data_inputs[0]
    with np.load(inputs_path, allow_pickle=False) as archive:
        batches = [archive[f"b{i}"] for i in range(len(archive.files))]
    results = {}
    try:
        workspace.ResetWorkspace()
        workspace.RunNetOnce(init_net)
        workspace.FeedBlob(data, np.ascontiguousarray(batches[0], dtype=np.float32))
        workspace.CreateNet(predict_net)
        for i, batch in enumerate(batches):
            workspace.FeedBlob(data, np.ascontiguousarray(batch, dtype=np.float32))
            workspace.RunNet(predict_net.name)
            for name in predict_net.external_output:
                results[f"b{i}/{name}"] = np.asarray(workspace.FetchBlob(name))
    except RuntimeError as e:  # Caffe2 reports enforce failures and unknown ops as RuntimeError
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "no message")
        sys.stderr.write(f"caffe2 refused the net: {first[:400]}\n")
        return 2
    np.savez(outputs_path, **results)
    print(json.dumps({"runtime": f"caffe2 (torch {torch.__version__})",
                      "python": ".".join(str(v) for v in sys.version_info[:3]),
                      "data_input": data, "outputs": list(predict_net.external_output),
                      "ops": sorted({op.type for op in predict_net.op})}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
