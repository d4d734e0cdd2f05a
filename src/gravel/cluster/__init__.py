"""Distributed execution on Ray: one inference's shards spread over many worker processes.

Server side only: it runs an artifact's server part with a client's evaluation keys.
"""

from gravel.cluster.executor import ClusterError, RayExecutor
from gravel.cluster.trace import InferenceTrace, ShardRecord

__all__ = ["ClusterError", "InferenceTrace", "RayExecutor", "ShardRecord"]
