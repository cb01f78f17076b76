"""The CUDA paths of verify and bench, in one short script for a GPU machine.

Usage: python benchmarks/gpu_check.py [--json gpu_check.json]
Folds resnet-tiny and a ResNet-50-sized net, verifies the folded model on torch-cuda (and ort-cuda
when onnxruntime-gpu is installed), and benchmarks original vs folded on the same runtimes at batch 1
and 32; then verifies resnet-tiny folded in float16 and bfloat16 on torch-cuda. Prints tables, writes
JSON. Exits 1 if a verification fails, 2 if no CUDA GPU is visible.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings

import torch

import bnfold
from bnfold import zoo
from bnfold.deploy.bench import benchmark, compare
from bnfold.deploy.export import export_keeping_bn

warnings.filterwarnings("ignore")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="gpu_check.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU visible to torch")
        sys.exit(2)
    import onnxruntime as ort

    ort_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    sys.path.insert(0, "benchmarks")
    from onnx_fold import resnet50

    out = {"device": torch.cuda.get_device_name(0), "ort_providers": ort.get_available_providers(), "models": []}
    ok = True
    for name, model, shape in (
        ("resnet-tiny", zoo.build("resnet-tiny"), (2, 1, 8, 8)),
        ("resnet50-size", resnet50(), (2, 3, 224, 224)),
    ):
        model = zoo.randomize_batchnorm(model, seed=1).eval()
        x = torch.randn(shape)
        folded, report = bnfold.fold(model, x)
        entry = {"model": name, "bn_folded": report.bn_folded, "bn_total": report.bn_total}
        check = bnfold.verify(model, folded, input_shapes=[shape], runtimes=("torch-cuda",))
        entry["verify_torch_cuda"] = check.to_dict()
        ok &= check.passed
        print(f"{name}: torch-cuda verify {'pass' if check.passed else 'FAIL'}")
        kw = {"batch_sizes": (1, 32), "iterations": 100, "input_shape": shape, "progress": False}
        cmp = compare(
            benchmark(model, runtimes=("torch-cuda",), **kw), benchmark(folded, runtimes=("torch-cuda",), **kw)
        )
        entry["bench_torch_cuda"] = cmp["rows"]
        print(cmp["text"])
        if ort_cuda:
            with tempfile.TemporaryDirectory() as tmp:
                path = f"{tmp}/m.onnx"
                bnfold.export_onnx(folded, x, path)
                check = bnfold.verify(model, path, input_shapes=[shape], runtimes=("ort-cuda",))
                ok &= check.passed
                entry["verify_ort_cuda"] = check.to_dict()
                print(f"{name}: ort-cuda verify {'pass' if check.passed else 'FAIL'}")
                original = export_keeping_bn(model, (x,))
                cmp = compare(
                    benchmark(original, runtimes=("ort-cuda",), **kw), benchmark(path, runtimes=("ort-cuda",), **kw)
                )
                entry["bench_ort_cuda"] = cmp["rows"]
                print(cmp["text"])
        out["models"].append(entry)
    for dtype in (torch.float16, torch.bfloat16):  # half precision: folded in float64, rounded once, run on the GPU
        model = zoo.randomize_batchnorm(zoo.build("resnet-tiny"), seed=1).eval().to(dtype)
        folded, report = bnfold.fold(model, torch.randn(2, 1, 8, 8).to(dtype))
        check = bnfold.verify(model, folded, input_shapes=[(2, 1, 8, 8)], runtimes=("torch-cuda",))
        ok &= check.passed
        name = f"resnet-tiny-{str(dtype).removeprefix('torch.')}"
        out["models"].append({"model": name, "bn_folded": report.bn_folded, "verify_torch_cuda": check.to_dict()})
        print(f"{name}: torch-cuda verify {'pass' if check.passed else 'FAIL'}")
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.json}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
