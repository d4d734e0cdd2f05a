import gravel


def test_exported_members():
    assert set(gravel.__all__) == {
        "ArtifactError", "AsyncClient", "Client", "ClientModel", "DataError", "GravelError", "InputError", "KeyMismatchError",
        "ModelError", "QuantConfig", "SecretKeys", "ServerModel", "ServiceError", "__version__", "compile_model", "load_dataset",
        "BlobFormatError", "ClusterError", "ServerAnsweredError", "ServerUnreachableError",
    }
    for name in gravel.__all__:
        assert hasattr(gravel, name)
        assert not name.startswith("_") or name == "__version__"


def test_client_never_imports_server():
    import subprocess
    import sys

    code = "import sys, gravel.client; assert 'gravel.server' not in sys.modules and 'gravel.compiler' not in sys.modules and 'gravel.service' not in sys.modules and 'gravel.cluster' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_error_tree_keeps_old_names_catchable():
    """Each new error is a subclass of the one raised before it existed, so old handlers work."""
    from gravel import errors

    classes = {name for name in dir(errors) if isinstance(getattr(errors, name), type)
               and issubclass(getattr(errors, name), errors.GravelError)}
    assert set(errors.__all__) == classes
    assert issubclass(gravel.BlobFormatError, gravel.KeyMismatchError)
    assert issubclass(gravel.ServerUnreachableError, gravel.ServiceError)
    assert issubclass(gravel.ServerAnsweredError, gravel.ServiceError)
    assert issubclass(gravel.ClusterError, gravel.GravelError)
    assert gravel.ServerUnreachableError("no answer").status is None
    assert gravel.ServerAnsweredError("bad", 404).status == 404
    for name in errors.__all__:  # the docstring's tree names every class
        assert name in errors.__doc__
