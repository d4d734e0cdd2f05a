"""The exact sizes of a deployed program's evaluation keys and input ciphertexts.

The compiled program fixes both: its key set has fixed parameters and an input has a fixed
shape, and the backend serializes them (compressed or not, as the program was compiled) to the
same number of bytes every time. Knowing them, the service refuses a key upload whose
declared length cannot be this model's keys before reading a byte of it, and an input of the
wrong type when the job is submitted rather than when it runs.

They are measured, not computed from parameters: at deploy, the backend makes a throwaway key
set (never used for anything else) and one encryption of zeros, and their serialized lengths
are recorded with the model. This costs one key generation per deploy (seconds for a small
model) and about twice the keys' size in memory for that moment.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gravel.protocol import Manifest
from gravel.protocol.framing import HEADER_SIZE

__all__ = ["BlobSizes", "measure_sizes"]


@dataclass(frozen=True)
class BlobSizes:
    keys_bytes: int  # framed evaluation keys
    input_bytes: int  # one framed input ciphertext


def measure_sizes(manifest: Manifest) -> BlobSizes:
    from concrete import fhe

    specs = fhe.ClientSpecs.deserialize(manifest.path("client.specs.json").read_bytes())
    keys = fhe.Keys(specs)
    keys.generate()
    keys_bytes = HEADER_SIZE + len(keys.evaluation.serialize())
    # The client encrypts the quantized image as the first stage's only encrypted argument.
    first = manifest.input_function
    arguments = len(specs.program_info.get_circuit(first).get_inputs())
    client = fhe.Client(specs)
    client.keys = keys
    zeros = np.zeros(tuple(manifest.input["shape"]), dtype=np.int64)
    value = client.encrypt(zeros, *([None] * (arguments - 1)), function_name=first)
    value = value[0] if isinstance(value, tuple) else value
    return BlobSizes(keys_bytes, HEADER_SIZE + len(value.serialize()))
