"""vLLM general plugin (entry point ``vllm.general_plugins``): registers the ``SafeServe<Arch>``
model classes in every vLLM process, the spawned workers included, and ties the engine
processes a SafeServe server spawns to its lifetime (process_lifetime)."""

from __future__ import annotations


def register() -> None:
    from safeserve.server.process_lifetime import die_with_the_server
    from safeserve.server.safety_model import SUPPORTED_ARCHITECTURES
    from vllm import ModelRegistry

    die_with_the_server()

    for arch in SUPPORTED_ARCHITECTURES:
        name = f"SafeServe{arch}"
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, f"safeserve.server.safety_model:{name}")
