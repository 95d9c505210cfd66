"""Kernel tests run the Triton kernels on CPU tensors under Triton's interpreter.

Triton decides at ``@triton.jit`` time whether a kernel is compiled or interpreted, so
``TRITON_INTERPRET=1`` is set here, at import, before any test module imports triton or
``fastgraph.kernels``. The interpreter has no bfloat16: CPU kernel tests run in float32.
CUDA-only tests (``@pytest.mark.gpu``) run the compiled kernels in a subprocess with the
interpreter off, and skip where there is no CUDA device.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402  (after the environment variable, on purpose)


@pytest.fixture(autouse=True)
def _kernels_interpreted():
    """Fail, saying why, if ``fastgraph.kernels`` was imported before the interpreter was set."""
    from fastgraph.kernels import _triton

    if not _triton.HAS_TRITON:
        pytest.skip("triton is not installed")
    if not _triton.INTERPRET:
        pytest.fail("fastgraph.kernels was imported before TRITON_INTERPRET=1 was set: run the kernel "
                    "tests first or on their own (pytest tests/kernels)")


@pytest.fixture
def run_on_gpu():
    """``run_on_gpu(code, interpret=False)``: run Python ``code`` in a fresh process on a
    machine with CUDA, its kernels compiled (or, with ``interpret``, set to Triton's interpreter);
    fails with its output if it exits non-zero."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")

    def run(code: str, interpret: bool = False) -> str:
        env = dict(os.environ, TRITON_INTERPRET="1" if interpret else "0")
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    return run


_COMPILE_SCRIPT = """
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import importlib
specs, arch = json.loads(sys.argv[1]), int(sys.argv[2])
out = []
for module, kernel, signature, constexprs, divisible, num_warps in specs:
    fn = getattr(importlib.import_module(module), kernel)
    sig = {n: ("constexpr" if n in constexprs else signature[n]) for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible
             if n in fn.arg_names and n not in constexprs}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                       target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps))
    ptx = k.asm["ptx"]
    out.append(dict(kernel=kernel, cubin_bytes=len(k.asm["cubin"]),
                    vector_loads=len(re.findall(r"ld\\.global(\\.\\w+)*\\.v[248]", ptx)),
                    vector_stores=len(re.findall(r"st\\.global(\\.\\w+)*\\.v[248]", ptx))))
print(json.dumps(out))
"""


@pytest.fixture
def compile_for_gpu():
    """``compile_for_gpu(specs, arch=90)``: compile kernels to CUDA cubins without a GPU
    (Triton's bundled ptxas), in a fresh process with compiled (not interpreted) kernels.

    Each spec is (module, kernel name, {arg: Triton type}, {arg: constexpr value},
    [args known divisible by 16, as Triton's launcher specialises them], num_warps).
    Returns one dict per spec: cubin size and the counts of vectorised global loads/stores.
    Skips where this Triton build has no NVIDIA backend.
    """
    import json

    def run(specs, arch=90):
        env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
        done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, json.dumps(specs), str(arch)], env=env,
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0 and "ptxas" in done.stderr and "not found" in done.stderr:
            pytest.skip("this Triton build cannot compile for NVIDIA GPUs (no ptxas)")
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    return run
