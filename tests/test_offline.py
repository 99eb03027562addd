"""No run asks the Hub for code: bitsandbytes' CPU-kernel download (on AVX512-BF16 CPUs) never happens.

Each case runs in a fresh interpreter (bitsandbytes is imported once per process) with a stand-in
``kernels.get_kernel`` that records every call, and bitsandbytes told that the CPU has
AVX512-BF16, so the download path is taken on any host. The control shows the probe sees the call."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

PROBE = """
import importlib.abc, importlib.machinery, json, sys
import kernels
calls = []
def get_kernel(repo, *args, **kwargs):
    calls.append(repo)
    raise RuntimeError("no network here")
kernels.get_kernel = get_kernel

class BF16(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.functional":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            module.has_avx512bf16 = lambda: True
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, BF16())
{body}
print(json.dumps({{"calls": calls, "kernels": sys.modules.get("kernels") is kernels, "bnb": "bitsandbytes" in sys.modules}}))
"""


def probe(body: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(body=body)], capture_output=True, text=True, timeout=300, check=True
    )
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "stderr": out.stderr}


def test_control_peft_import_asks_the_hub_for_a_kernel():
    got = probe("import peft")
    assert got["calls"] == ["kernels-community/quantization-bitsandbytes"]


def test_import_bitsandbytes_skips_the_hub_kernel_and_its_warning():
    got = probe("from core.offline import import_bitsandbytes\nassert import_bitsandbytes()\nimport peft")
    assert got["calls"] == [] and got["bnb"]
    assert got["kernels"]  # kernels is back: transformers' own use of it is untouched
    assert "gemm_4bit_forward" not in got["stderr"]


def test_every_accelerator_is_made_without_the_hub_kernel():
    body = (
        "import torch\n"
        "from distill.train import make_accelerator\n"
        "acc = make_accelerator('no')\n"
        "acc.prepare(torch.nn.Linear(2, 2))"
    )
    got = probe(body)
    assert got["calls"] == [] and got["bnb"]
