"""Python source that makes a fresh interpreter behave as if some packages were not installed (a device without
torch): prepend it to a ``python -c`` script."""


def blocking(*packages: str) -> str:
    """Source installing an import hook under which any import of ``packages`` raises ImportError."""
    return f'''
import importlib.abc, importlib.util, sys
class Block(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    # Any import of these packages fails, as if they were not installed.
    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name.split(".")[0] in {packages!r} else None
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        raise ImportError(f"blocked: {{module.__name__}}", name=module.__name__)
sys.meta_path.insert(0, Block())
'''


def hiding(*packages: str) -> str:
    """Source installing a finder under which ``packages`` look uninstalled to imports and to ``find_spec`` alike
    (``blocking``'s packages are still found by ``find_spec``, so ``mmedge.device.importable`` sees them)."""
    return f'''
import importlib.abc, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {packages!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, Hide())
'''
