"""The server's side: runs a compiled program on ciphertexts with a client's evaluation keys.

Needs only an artifact's manifest, server program and weights; never a secret key.
"""

from gravel.server.runner import ServerModel, StageTrace

__all__ = ["ServerModel", "StageTrace"]
