"""Gravel's CKKS core (Microsoft SEAL through TenSEAL), shared by `gravel.tensor` and the CKKS
model backend: parameters from the 128-bit security table for a depth and precision
(`params`), key sets for the data owner and the compute party (`context`), exact
rescaling and level alignment (`evaluator`), slot layouts and the diagonal method for linear
maps (`packing`), and framed bytes for ciphertexts (`blob`; contexts frame themselves).
"""

from gravel.ckks.blob import dump_ciphertexts, load_ciphertexts
from gravel.ckks.ciphertext import Ciphertext
from gravel.ckks.context import POWER_OF_TWO, PublicContext, SecretContext, power_of_two_steps
from gravel.ckks.evaluator import Evaluator, polyval_depth
from gravel.ckks.params import SECURITY_TABLE_128, CkksParams, choose_params, max_depth

__all__ = [
    "POWER_OF_TWO",
    "SECURITY_TABLE_128",
    "Ciphertext",
    "CkksParams",
    "Evaluator",
    "PublicContext",
    "SecretContext",
    "choose_params",
    "dump_ciphertexts",
    "load_ciphertexts",
    "max_depth",
    "polyval_depth",
    "power_of_two_steps",
]
