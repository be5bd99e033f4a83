"""SafeServe HTTP service and vLLM integration."""
