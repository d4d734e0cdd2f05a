import numpy as np
import pytest

from gravel.client import ClientModel, SecretKeys
from gravel.errors import BlobFormatError, InputError, KeyMismatchError
from gravel.protocol import Kind, frame


def test_input_validation(client_keys, digits):
    client, _keys = client_keys
    image = digits.x_test[0]
    assert client.quantize(image).shape == (1, 8, 8)
    assert client.quantize(image[0]).shape == (1, 8, 8)  # (8, 8) is accepted for one channel
    with pytest.raises(InputError, match=r"shape \(28, 28\).*expects \(1, 8, 8\)"):
        client.quantize(np.zeros((28, 28), np.float32))
    with pytest.raises(InputError, match=r"span \[0, 255\], far outside the range the model was calibrated on \[0, 1\]"):
        client.quantize(image * 255)
    with pytest.raises(InputError, match="dtype bool"):
        client.quantize(np.zeros((1, 8, 8), bool))
    assert client.quantize(np.ones((64,), np.int64)).max() == 3  # plain numbers, same element count
    assert np.array_equal(client.quantize(image * 1.2), client.quantize(np.clip(image * 1.2, 0, 1)))  # a little out: clipped
    bad = image.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        client.quantize(bad)
    u8 = (image * 255).astype(np.uint8)
    assert np.array_equal(client.quantize(u8), client.quantize(u8.astype(np.float32) / 255))


def test_secret_keys_round_trip_and_permissions(tmp_path, client_keys, digits):
    client, keys = client_keys
    path = tmp_path / "secret.key"
    keys.save(path)
    assert path.stat().st_mode & 0o777 == 0o600
    again = SecretKeys.load(path, client)
    ct = client.encrypt(keys, digits.x_test[0])
    assert len(ct) > 0
    assert again.evaluation_keys()[:38] == keys.evaluation_keys()[:38]


def test_keys_of_another_model_refused(tmp_path, client_keys):
    client, _keys = client_keys
    other = frame(Kind.SECRET_KEYS, b"\x01" * 32, b"payload")
    (tmp_path / "other.key").write_bytes(other)
    with pytest.raises(KeyMismatchError, match="made for another model") as err:
        SecretKeys.load(tmp_path / "other.key", client)
    assert not isinstance(err.value, BlobFormatError)  # well-formed, of another model
    (tmp_path / "trunc.key").write_bytes(b"GRV")
    with pytest.raises(BlobFormatError, match="missing header"):
        SecretKeys.load(tmp_path / "trunc.key", client)
    (tmp_path / "garbled.key").write_bytes(frame(Kind.SECRET_KEYS, client.digest, b"\x07" * 64))
    with pytest.raises(BlobFormatError, match="secret keys are corrupt"):
        SecretKeys.load(tmp_path / "garbled.key", client)


def test_decrypt_refuses_input_ciphertext(client_keys, digits):
    client, keys = client_keys
    ct = client.encrypt(keys, digits.x_test[0])
    with pytest.raises(KeyMismatchError, match="expected output ciphertext, got input ciphertext") as err:
        client.decrypt(keys, ct)
    assert not isinstance(err.value, BlobFormatError)
    with pytest.raises(BlobFormatError, match="corrupt or truncated"):
        client.decrypt(keys, frame(Kind.OUTPUT_CIPHERTEXT, client.digest, b"\x00" * 40))


def test_client_needs_only_manifest_and_spec(tmp_path, digits_artifact):
    import shutil

    d = tmp_path / "client-only"
    d.mkdir()
    for name in ("manifest.json", "client.specs.json"):
        shutil.copy(digits_artifact / name, d / name)
    assert ClientModel.load(d).input_shape == (1, 8, 8)
