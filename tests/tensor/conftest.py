import pytest


@pytest.fixture(scope="session")
def gt_ctx():
    """One depth-4 context (N=8192, power-of-two rotation keys) for the tensor tests: keys are
    the slow part."""
    import gravel.tensor as gt

    return gt.Context(depth=4)
