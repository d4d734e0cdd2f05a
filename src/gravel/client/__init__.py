"""The data owner's side: keys, input quantization and encryption, decryption.

Needs only an artifact's manifest and client spec; `Client` talks to a Gravel server over HTTP. The secret key never leaves this package
unless its user saves it with `SecretKeys.save`.
"""

from gravel.client.model import ClientModel, SecretKeys
from gravel.client.remote import Client, Session
from gravel.client.remote_async import AsyncClient, AsyncSession

__all__ = ["AsyncClient", "AsyncSession", "Client", "ClientModel", "SecretKeys", "Session"]
