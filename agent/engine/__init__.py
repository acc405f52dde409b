"""The device engine, model-agnostic: the thread that owns the device, the static-cache
Llama decode loop with CUDA graphs, continuous batching, and the sampling both decode
loops share.

May import: agent.errors only (and torch). Never a model module, agent.call or signaling/.
"""
