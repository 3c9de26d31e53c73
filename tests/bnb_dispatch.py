"""Python source that makes bitsandbytes detect AVX512-BF16 (or not) in a child process, whatever the CPU has.

bitsandbytes chooses its CPU 4-bit kernels once, at import, by asking its native library
(`lib.has_avx512bf16_cpu()`): with AVX512-BF16 it registers a fused bf16 kernel and tries to load an
optional `kernels` package. The prelude wraps that library object as soon as bitsandbytes.cextension
has loaded it, before anything asks, so a child started with it takes the chosen path from the start.
"""


def force_detection_prelude(avx512bf16: bool) -> str:
    return f"""
import importlib.abc, importlib.util, sys


class _Library:
    def __init__(self, lib):
        self._lib = lib

    def has_avx512bf16_cpu(self):
        return {int(avx512bf16)}

    def __getattr__(self, name):
        return getattr(self._lib, name)


class _Loader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        module.lib = _Library(module.lib)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.cextension":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        spec.loader = _Loader(spec.loader)
        return spec


sys.meta_path.insert(0, _Finder())
"""
