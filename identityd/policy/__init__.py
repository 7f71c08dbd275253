"""Policy engines: embedded (regopy, in-process) and OPA (sidecar REST)."""

from identityd.policy.base import Decision, PolicyCompileError, PolicyEngine

__all__ = ["Decision", "PolicyCompileError", "PolicyEngine"]
