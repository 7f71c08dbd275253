"""identityd: the identity provider a CA calls back to confirm a Kubernetes pod's certificate."""

# Load regopy's native library before anything loads the system libstdc++ (aiohttp
# does, through frozenlist's C++ extension). librego_shared.so brings its own global
# operator new/delete; loaded after libstdc++, every policy evaluation leaks
# 50-200 KB (measured; tests/policy/test_policy_embedded_memory.py guards it).
import regopy  # noqa: F401 - must stay the first import

from identityd.errors import IdentitydError
from identityd.settings import Settings

__version__ = "0.1.0"
__all__ = ["IdentitydError", "Settings", "__version__"]
