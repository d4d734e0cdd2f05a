"""The data owner's side: keys, input quantization and encryption, decryption.

Needs only an artifact's manifest and client spec. The secret key never leaves this package
unless its user saves it with `SecretKeys.save`.
"""

from gravel.client.model import ClientModel, SecretKeys

__all__ = ["ClientModel", "SecretKeys"]
