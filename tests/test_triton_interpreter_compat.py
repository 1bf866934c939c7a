"""llama_kernels.triton._fix_interpreter_index: Triton 3.6's interpreter converts a runtime loop bound (a
1-element array) with int(array), which numpy >= 2.4 refuses; the fix squeezes it first, as Triton 3.9 does,
and leaves interpreters without the bug alone. (CI also runs the kernels' interpreter tests under 3.6.)"""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

pytest.importorskip("triton")
import triton.runtime  # noqa: E402

from llama_kernels.triton import _fix_interpreter_index  # noqa: E402

BUGGY = '''
class Scope:
    def __init__(self):
        self.changes = []

    def set_attr(self, obj, name, value):
        self.changes.append((obj, name, getattr(obj, name, None)))
        setattr(obj, name, value)


def _patch_lang_tensor(tensor, scope):
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))
'''


def _fake_interpreter(tmp_path, monkeypatch, source: str):
    path = tmp_path / "fake_interpreter.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("fake_interpreter", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "triton.runtime.interpreter", module)
    monkeypatch.setattr(triton.runtime, "interpreter", module, raising=False)
    return module


class _Handle:
    def __init__(self, data):
        self.data = data


@pytest.mark.parametrize("buggy", [True, False])
def test_index_of_a_one_element_array(tmp_path, monkeypatch, buggy):
    source = BUGGY if buggy else BUGGY.replace("int(self.handle.data)", "int(self.handle.data.squeeze())")
    module = _fake_interpreter(tmp_path, monkeypatch, source)
    original = module._patch_lang_tensor
    _fix_interpreter_index()
    assert (module._patch_lang_tensor is original) is not buggy  # patched only where the bug is

    class Tensor:
        def __init__(self, value):
            self.handle = _Handle(np.array([value], dtype=np.int32))  # a runtime scalar, as the interpreter holds it

    scope = module.Scope()
    module._patch_lang_tensor(Tensor, scope)
    assert list(range(Tensor(7))) == list(range(7))  # a loop bound
    assert [10, 11, 12, 13][Tensor(2)] == 12
