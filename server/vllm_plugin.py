"""vLLM general plugin (entry point ``vllm.general_plugins``): registers the ``SafeServe<Arch>``
model classes in every vLLM process, the spawned workers included."""

from __future__ import annotations


def register() -> None:
    from safeserve.server.safety_model import SUPPORTED_ARCHITECTURES
    from vllm import ModelRegistry

    for arch in SUPPORTED_ARCHITECTURES:
        name = f"SafeServe{arch}"
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, f"safeserve.server.safety_model:{name}")
