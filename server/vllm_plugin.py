"""vLLM general plugin (entry point ``vllm.general_plugins``): registers SafeServe's model
classes in every vLLM process, the spawned workers included."""


def register() -> None:
    pass
