"""llama.cpp, the engine a CPU user would otherwise run, through llama-cpp-python: a
benchmark-only dependency, never installed by CI or pyproject. Build it from source (its
prebuilt wheels crash on some CPUs):

    .venv/bin/pip install --no-deps --no-binary llama-cpp-python llama-cpp-python

On an Intel Xeon with AMX, a build for the native CPU includes ggml's AMX kernels, which
died on a general protection fault in the first decode (llama-cpp-python 0.3.36, in a
virtual machine); build for the CPU's AVX-512 without them:

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
      -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX512_VBMI=ON" \
      .venv/bin/pip install --no-cache-dir --force-reinstall --no-deps --no-binary llama-cpp-python llama-cpp-python

Benchmarks that set a figure beside llama.cpp's print ``MISSING`` and go on without it
when it is not installed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

MISSING = ("llama.cpp: llama_cpp is not importable, so no llama.cpp figure; build it with "
           "`.venv/bin/pip install --no-deps --no-binary llama-cpp-python llama-cpp-python`")


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def version() -> str:
    import llama_cpp

    return f"llama-cpp-python {llama_cpp.__version__}"


def open_model(path: Path, threads: int, n_ctx: int, logits_all: bool = False):
    """A ``llama_cpp.Llama`` on the GGUF at ``path``, its decode and prompt batches on
    ``threads`` threads (llama.cpp's own defaults differ)."""
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                 logits_all=logits_all, verbose=False)


def last_logits(llm) -> np.ndarray:
    """The logits [vocab] at the last position the latest ``llm.eval`` computed."""
    import llama_cpp

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
