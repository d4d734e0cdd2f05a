"""Parameter choice: within the HE standard's 128-bit table, deep enough, refused when not."""

import pytest

from gravel.ckks import SECURITY_TABLE_128, CkksParams, choose_params, max_depth
from gravel.errors import DepthError, InputError


@pytest.mark.parametrize("depth", range(18))
def test_choice_is_secure_and_deep_enough(depth):
    p = choose_params(depth)
    assert p.depth == depth
    assert p.total_bits <= SECURITY_TABLE_128[p.poly_modulus_degree]
    assert p.coeff_mod_bit_sizes[-1] >= p.coeff_mod_bit_sizes[0]  # special prime largest
    assert all(b == p.scale_bits for b in p.coeff_mod_bit_sizes[1:-1])
    assert p.precision_bits >= 16  # what was asked (default), before depth losses
    assert p.integer_bits == 10


def test_smallest_ring_first():
    assert choose_params(1).poly_modulus_degree == 4096
    assert choose_params(4).poly_modulus_degree == 8192
    assert choose_params(6).poly_modulus_degree == 16384
    assert choose_params(12).poly_modulus_degree == 32768
    assert choose_params(1, min_slots=5000).poly_modulus_degree == 16384


def test_too_deep_is_refused_with_what_to_do():
    deepest = max_depth()
    assert deepest == 17
    with pytest.raises(DepthError, match=r"depth 18.*deepest secure parameters give depth 17"):
        choose_params(deepest + 1)
    # lower precision buys depth
    assert max_depth(precision_bits=8) > deepest
    with pytest.raises(DepthError, match="lower the depth"):
        choose_params(40, precision_bits=8)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_bad_depth(bad):
    with pytest.raises(InputError, match="depth must be an integer"):
        choose_params(bad)


def test_params_validate_the_table():
    with pytest.raises(InputError, match="exceed the 218 bits"):
        CkksParams(8192, (60, 40, 40, 40, 60), 40)
    with pytest.raises(InputError, match="not in the 128-bit security table"):
        CkksParams(2048, (30, 30), 25)
    with pytest.raises(InputError, match="middle primes"):
        CkksParams(8192, (60, 40, 30, 60), 40)
    with pytest.raises(InputError, match="outside"):
        CkksParams(8192, (61, 40, 61), 40)


def test_json_round_trip_and_refusal():
    p = choose_params(3)
    assert CkksParams.from_json(p.to_json()) == p
    with pytest.raises(InputError):
        CkksParams.from_json({"poly_modulus_degree": "8192", "coeff_mod_bit_sizes": [], "scale_bits": 1})
    with pytest.raises(InputError):
        CkksParams.from_json({"poly_modulus_degree": 8192})
