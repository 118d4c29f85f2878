#!/usr/bin/python3
"""Reads a dynakv export with numpy alone (no safetensors package, no dynakv) and prints every
tensor as JSON: {"config": ..., "tensors": {name: {"shape": [...], "values": [...]}}}.
Used by tests/test_export.cpp to check the export equals the profile.

  read_safetensors.py DIR
"""
import json
import struct
import sys

import numpy as np

DTYPES = {"F32": np.float32, "F64": np.float64, "I32": np.int32}


def main():
    folder = sys.argv[1]
    with open(f"{folder}/dynakv.safetensors", "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        a = np.frombuffer(data[begin:end], dtype=DTYPES[info["dtype"]]).reshape(info["shape"])
        tensors[name] = {"shape": list(a.shape), "values": a.reshape(-1).tolist()}
    with open(f"{folder}/dynakv_config.json") as f:
        config = json.load(f)
    json.dump({"config": config, "metadata": header.get("__metadata__", {}), "tensors": tensors}, sys.stdout)


if __name__ == "__main__":
    main()
