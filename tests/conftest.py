"""Test set-up shared by every module.

- The repository root goes on sys.path, so tests import `algos.*` and `kernels.*` as the scripts do.
- Without a GPU, Triton kernels run under the Triton interpreter. It must be switched on before triton is first
  imported in this process (a kernel is compiled or interpreted when its module is imported), hence here.
"""
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
