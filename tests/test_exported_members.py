import gravel


def test_exported_members():
    assert set(gravel.__all__) == {
        "ArtifactError", "AsyncClient", "Client", "ClientModel", "DataError", "GravelError", "InputError", "KeyMismatchError",
        "ModelError", "QuantConfig", "SecretKeys", "ServerModel", "ServiceError", "__version__", "compile_model", "load_dataset",
    }
    for name in gravel.__all__:
        assert hasattr(gravel, name)
        assert not name.startswith("_") or name == "__version__"


def test_client_never_imports_server():
    import subprocess
    import sys

    code = "import sys, gravel.client; assert 'gravel.server' not in sys.modules and 'gravel.compiler' not in sys.modules and 'gravel.service' not in sys.modules and 'gravel.cluster' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
