"""Triton Python-backend model that decodes encoded images into the model's uint8 crops.

`export --format triton` copies this file to REPO/NAME_decode/1/model.py, beside the model
description (description.json) it reads its preprocessing from. In the ensemble NAME_images it
turns the `image` input (BYTES: JPEG, PNG, ... as clients send them to `cli.py serve`) into the
`pixels` input of the ONNX model NAME (UINT8 [S, S, 3] centre crops), with the same decoder as
the unirep pipeline (runtime.decode.load_crop), so Triton's embeddings equal the library's.

Triton's Python environment needs the unirep runtime (`pip install` this project; its decode
path needs numpy, Pillow and simplejpeg, not onnxruntime). A request with an image that cannot
be decoded fails as a whole with a message naming the item (an ensemble carries no per-item
error outputs); its other requests in the batch are answered.
"""
from __future__ import annotations

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by Triton's Python backend


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        from common.description import ModelDescription

        folder = os.path.join(args["model_repository"], str(args["model_version"]))
        with open(os.path.join(folder, "description.json")) as f:
            self.pre = ModelDescription.from_json(f.read()).preprocessing
        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]

    def execute(self, requests: list) -> list:
        from runtime.decode import load_crop

        size = self.pre.input_size
        responses = []
        for request in requests:
            images = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
            flat = images.reshape(-1)
            crops = np.empty((len(flat), size, size, 3), np.uint8)
            try:
                for i, data in enumerate(flat):
                    load_crop(bytes(data), self.pre, out=crops[i])
            except Exception as e:  # names the item: the client sees which image and why
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"image {i}: {e}")))
                continue
            out = pb_utils.Tensor(self.output_name, crops)
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses

    def finalize(self) -> None:
        pass
