"""Adapters for existing model code. Each imports its framework: ``moe_kernels.integrations.transformers``
needs ``pip install moe_kernels[transformers]``; ``import moe_kernels`` never imports them."""
