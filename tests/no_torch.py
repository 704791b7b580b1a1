"""Preamble for subprocess tests that prove `runtime` works without torch installed."""

BLOCK_TORCH = '''
import sys
class BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision"):
            raise ImportError(f"torch is blocked in this test ({name})")
sys.meta_path.insert(0, BlockTorch())
sys.path.insert(0, sys.argv[1])
'''
