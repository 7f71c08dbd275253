"""Policy engines: embedded (regopy, in-process) and OPA (sidecar REST).

The engines live in their own modules (``identityd.policy.embedded``, ...) and
are not imported here, so importing the package does not load a native library.
"""

from identityd.policy.base import Decision, PolicyCompileError, PolicyEngine
from identityd.policy.sources import load_policy_dir, refuse_with

__all__ = ["Decision", "PolicyCompileError", "PolicyEngine", "load_policy_dir", "refuse_with"]
