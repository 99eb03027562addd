"""Imports that must not reach the network or load code from it.

bitsandbytes (imported by peft, which accelerate imports to check each model it prepares, so by every
distillation) asks the Hugging Face Hub for a compiled CPU kernel when it is first imported on a CPU with
AVX512-BF16 (``kernels.get_kernel("kernels-community/quantization-bitsandbytes")``): a network call at
import, and, where the Hub vouches for the publisher, native code downloaded and loaded into the run
without the user asking (offline it fails and logs a warning that mentions ``trust_remote_code``). Our runs
load nothing from the Hub: ``import_bitsandbytes`` imports it with ``kernels`` hidden, so it keeps the CPU
kernels it ships (4-bit teacher loading only, ``teacher.quantization``), and silences that one warning.
"""

from __future__ import annotations

import importlib.util
import logging
import sys

_CPU_OPS_LOGGER = "bitsandbytes.backends.cpu.ops"  # where bitsandbytes logs the failed kernel download


def import_bitsandbytes() -> bool:
    """Import bitsandbytes (if installed and not imported yet) without its Hub kernel lookup; True when it is
    imported after the call. Import errors of bitsandbytes itself propagate."""
    if "bitsandbytes" in sys.modules:
        return True
    if importlib.util.find_spec("bitsandbytes") is None:
        return False
    missing = object()
    saved = sys.modules.get("kernels", missing)
    sys.modules["kernels"] = None  # `from kernels import get_kernel` raises ImportError: no Hub call
    ops_log = logging.getLogger(_CPU_OPS_LOGGER)
    level = ops_log.level
    ops_log.setLevel(logging.ERROR)
    try:
        import bitsandbytes  # noqa: F401
    finally:
        ops_log.setLevel(level)
        if saved is missing:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = saved
    return True
