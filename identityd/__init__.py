"""identityd: the identity provider a CA calls back to confirm a Kubernetes pod's certificate."""

from identityd.errors import IdentitydError
from identityd.settings import Settings

__version__ = "0.1.0"
__all__ = ["IdentitydError", "Settings", "__version__"]
