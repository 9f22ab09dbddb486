"""Prefect flows and tasks over pipelines.*.run, and the ibllm command-line interface."""
